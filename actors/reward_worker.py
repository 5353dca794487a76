"""Reward worker: pending stream → render with Stable Diffusion → score → replay buffer → ack.

    worker = RewardWorker(cfg, redis_url, run, name="reward-0")
    worker.run(stop_event)          # or worker.step() for one batch

The reward is the paper's (Promptist / PAG), for a rewrite y of a plain prompt x, over the
`images_per_prompt` images of each prompt (`scoring.reward`, shared with `pag eval`):

    r(x, y) = mean_i aes(img_i(y)) − mean_i aes(img_i(x)) + mean_i w · min(0, max(0, clip(x, img_i(y))) − c)
    log R   = r / β                                                    (w = 20, c = 0.28: the hinge per image)

Image i of *every* prompt starts from the same noise, randn(seed + i), so a rewrite and its plain
prompt are compared on identical noise and a trajectory's images do not depend on what else is in
its batch. The plain prompt's scores come from `PlainCache` (rendered once per model, seed and
prompt, shared across runs). Delivery is at-least-once: `add` before `ack`; a worker that dies
leaves its entries to be reclaimed by another after `reclaim_idle_ms`, and the buffer's
idempotent `add` keeps a re-scored trajectory from being stored twice.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from actors.retry import Backoff
from common.timing import PhaseClock
from common.config import Config
from scoring.reward import PENALTIES, baseline_text, per_text_scores, reward_parts
from common.trajectory import Trajectory
from scoring.render import RewardModels, build_reward_models, plain_text

log = logging.getLogger(__name__)

@dataclass
class WorkerStats:
    items: int = 0
    scored: int = 0
    failed: int = 0
    already_stored: int = 0
    plain_cache_hits: int = 0
    plain_cache_misses: int = 0
    images: int = 0
    steps_with_errors: int = 0
    render_s: float = 0.0
    score_s: float = 0.0
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RewardWorker:
    """One consumer of the run's `pending` stream (consumer group `scorers`, consumer `name`)."""

    def __init__(self, cfg: Config, redis_url: str, run: str, name: str = "reward-0", *,
                 device: Optional[str] = None, reclaim_idle_ms: int = 30_000, block_ms: int = 1000,
                 models: Optional[RewardModels] = None, buffer: Any = None) -> None:
        from scoring.plain_cache import PlainCache, cache_model_id
        from buffer.connection import connect

        self.cfg, self.run_name, self.name = cfg, run, name
        self.reclaim_idle_ms, self.block_ms = reclaim_idle_ms, block_ms
        self.models = models or build_reward_models(cfg, device)
        self.renderer, self.score_fn = self.models.renderer, self.models.score_fn
        self.device, self.dtype = self.models.device, self.models.dtype
        if buffer is None:
            from buffer.replay import ReplayBuffer

            buffer = ReplayBuffer.from_config(cfg.buffer, run, redis_url=redis_url)
        self.buffer = buffer
        self._redis = connect(redis_url)
        self.cache = PlainCache(self._redis, cache_model_id(cfg, str(self.dtype).removeprefix("torch.")),
                                 cfg.reward.images.seed)
        self.stats = WorkerStats()
        self.clock = PhaseClock("reward")  # time per phase, into the run's meta (common/timing.py)
        self._scoring_pool: Any = None  # reward.speed.overlap_scoring: one scorer thread, made on first use
        self._scoring_stream: Any = None

    # ------------------------------------------------------------------ one batch

    def step(self, max_items: Optional[int] = None) -> int:
        """Read up to batch_size entries (reclaiming dead consumers' first), score, store, ack.
        Returns the number of entries handled (0 when the stream stayed empty for block_ms)."""
        count = self.cfg.reward.batch_size if max_items is None else max(1, min(max_items, self.cfg.reward.batch_size))
        clock = self.clock
        with clock.phase("read"):
            entries = self.buffer.read_pending(self.name, count, block_ms=self.block_ms,
                                               min_idle_ms=self.reclaim_idle_ms)
        if not entries:
            clock.flush(self.buffer)
            return 0
        entry_ids = [entry_id for entry_id, _ in entries]
        todo = []
        start, rendered, judged = time.perf_counter(), self.stats.render_s, self.stats.score_s
        for _, traj in entries:  # reclaimed after a crash between add and ack: already done
            if self.buffer.get(traj.id) is not None:
                self.stats.already_stored += 1
            else:
                todo.append(traj)
        scored, failed = self.score_batch(todo)
        rendered, judged = self.stats.render_s - rendered, self.stats.score_s - judged
        clock.add("render", rendered)
        clock.add("score", judged)
        clock.add("other", time.perf_counter() - start - rendered - judged)
        with clock.phase("store"):
            if scored:
                self.buffer.add(scored)
            for traj, reason in failed:
                log.warning("reward worker %s: trajectory %s failed: %s", self.name, traj.id, reason)
                self.buffer.record_failed(traj, reason)
            self.buffer.ack_pending(entry_ids)
            self._count("reward_scored", len(scored))
        clock.flush(self.buffer)
        self.stats.items += len(entries)
        self.stats.scored += len(scored)
        self.stats.failed += len(failed)
        return len(entries)

    def score_batch(self, trajs: Sequence[Trajectory]) -> tuple[list[Trajectory], list[tuple[Trajectory, str]]]:
        """Render and score a batch (no stream I/O): (scored trajectories, [(trajectory, reason)])."""
        if not trajs:
            return [], []
        r = self.cfg.reward
        k = self.renderer.k if self.renderer is not None else 0
        plains = [baseline_text(self.cfg, plain_text(t.prompt)) for t in trajs]  # what the baseline renders
        cached = self.cache.get_many(plains, self.models.score_keys)
        missing = [p for p in dict.fromkeys(plains) if p not in cached]
        hits = sum(p in cached for p in plains)
        self.stats.plain_cache_hits += hits
        self.stats.plain_cache_misses += len(missing)
        self._count("plain_cache_hits", hits)
        self._count("plain_cache_misses", len(missing))

        # rewrites first, then the plain prompts nobody has rendered yet, in one render
        texts = [t.response for t in trajs] + missing
        judged_against = plains + missing  # relevance is always measured against the baseline text
        results = self._render_and_score(texts, judged_against)

        plain_scores: dict[str, dict[str, float] | str] = dict(cached)
        for j, prompt in enumerate(missing):
            result = results[len(trajs) + j]
            if isinstance(result, dict):
                for penalty in PENALTIES:  # the plain prompt's own relevance is not part of any reward
                    result.pop(penalty, None)
            if isinstance(result, dict) and _bad(result) is None:
                info = {"images": k, "steps": r.images.steps, "guidance": self.cfg.render.guidance,
                        "image_size": self.renderer.size if k else 0}
                self.cache.put(prompt, result, info)
            plain_scores[prompt] = result

        scored, failed = [], []
        for j, traj in enumerate(trajs):
            mine, plain = results[j], plain_scores[plains[j]]
            reason = _failure(mine, plain)
            if reason:
                failed.append((traj, reason))
                continue
            scores = dict(mine)
            scores.update({f"{name}_plain": value for name, value in plain.items()})
            scores.update(reward_parts(mine, plain))
            if not math.isfinite(scores["reward"]):
                failed.append((traj, f"non-finite reward {scores['reward']}"))
                continue
            scored.append(traj.replace(scores=scores, log_reward=scores["reward"] / r.beta, run=traj.run or self.run_name))
        return scored, failed

    def _render_and_score(self, texts: list[str], prompts: list[str]) -> list[dict[str, float] | str]:
        """Per text: its mean scores, or the error that stopped it. A batch that fails is retried one
        text at a time, so one bad item cannot fail its neighbours."""
        try:
            return self._render_and_score_batch(texts, prompts)
        except Exception as exc:  # noqa: BLE001 — isolate below
            if len(texts) == 1:
                return [f"{type(exc).__name__}: {exc}"]
            log.warning("reward worker %s: batch of %d failed (%s); retrying one by one", self.name, len(texts), exc)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return [self._render_and_score([t], [p])[0] for t, p in zip(texts, prompts)]

    def _render_and_score_batch(self, texts: list[str], prompts: list[str]) -> list[dict[str, float]]:
        if self.renderer is None:  # reward.render=false: text scorers on the rewrites themselves
            t0 = time.perf_counter()
            k, scores = 1, self.score_fn(None, prompts, texts)
            self.stats.score_s += time.perf_counter() - t0
        else:
            k = self.renderer.k
            judged = [p for p in prompts for _ in range(k)]
            rewrites = [t for t in texts for _ in range(k)]  # for text scorers, if any
            if self.cfg.reward.speed.overlap_scoring:
                scores = self._render_and_score_overlapped(texts, judged, rewrites)
            else:
                t0 = time.perf_counter()
                images = self.renderer(texts)  # (len(texts)·k, 3, H, W)
                t1 = time.perf_counter()
                scores = self.score_fn(images, judged, rewrites)
                self.stats.render_s += t1 - t0
                self.stats.score_s += time.perf_counter() - t1
                self.stats.images += images.shape[0]
        means = per_text_scores(scores, len(texts), k, self.cfg.reward)
        return [{name: float(m[j]) for name, m in means.items()} for j in range(len(texts))]

    def _render_and_score_overlapped(self, texts: list[str], judged: list[str],
                                     rewrites: list[str]) -> dict[str, torch.Tensor]:
        """`reward.speed.overlap_scoring`: chunk i is scored in a side thread (its own CUDA stream) while chunk
        i+1 denoises; the same scores as rendering everything first (tests/test_sd_speed.py)."""
        if self._scoring_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._scoring_pool = ThreadPoolExecutor(1, thread_name_prefix=f"score-{self.name}")
            self._scoring_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        k, futures = self.renderer.k, []
        t0 = time.perf_counter()
        for part, images in self.renderer.chunks(texts):
            rows = judged[part.start * k:part.stop * k]
            done = torch.cuda.Event() if self._scoring_stream is not None else None
            if done is not None:
                done.record()  # the scorer's stream waits for this chunk's last kernel, not for the next chunk
            futures.append(self._scoring_pool.submit(self._score_chunk, images, rows, done,
                                                     rewrites[part.start * k:part.stop * k]))
            self.stats.images += images.shape[0]
        t1 = time.perf_counter()
        chunks = [future.result() for future in futures]
        self.stats.render_s += t1 - t0  # includes the scoring that overlapped it
        self.stats.score_s += time.perf_counter() - t1  # only the scoring left after the last chunk
        return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}

    def _score_chunk(self, images: torch.Tensor, judged: list[str], ready,
                     rewrites: list[str]) -> dict[str, torch.Tensor]:
        if self._scoring_stream is None:
            return self.score_fn(images, judged, rewrites)
        with torch.cuda.stream(self._scoring_stream):
            self._scoring_stream.wait_event(ready)
            images.record_stream(self._scoring_stream)  # the allocator must not reuse it under the scorer
            return self.score_fn(images, judged, rewrites)

    def _count(self, name: str, n: int) -> None:
        """Counters in the run's `meta` HASH (readable with redis-cli)."""
        if n:
            self.buffer.incr_counter(name, n)

    # ------------------------------------------------------------------ loop

    def run(self, stop_event: Optional[threading.Event] = None, max_items: Optional[int] = None,
            idle_timeout_s: Optional[float] = None) -> int:
        """Process batches until stop_event is set, max_items entries are handled, or the stream has
        been empty for idle_timeout_s. Infrastructure errors (Redis down) are logged and retried."""
        done, idle_since = 0, time.monotonic()
        backoff = Backoff(f"reward worker {self.name}", log, self.buffer)
        while not (stop_event is not None and stop_event.is_set()):
            if max_items is not None and done >= max_items:
                break
            try:
                n = self.step(None if max_items is None else max_items - done)
                backoff.ok()
            except Exception as exc:  # noqa: BLE001 — un-acked entries are reclaimed; the worker lives on
                self.stats.steps_with_errors += 1
                backoff.failed(exc)
                continue
            done += n
            if n:
                idle_since = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                break
        return done

    def close(self) -> None:
        if self._scoring_pool is not None:
            self._scoring_pool.shutdown(wait=True)
        self.buffer.close()
        self._redis.close()


def _failure(mine: dict[str, float] | str, plain: dict[str, float] | str) -> Optional[str]:
    """Why a trajectory cannot get a reward, or None."""
    if isinstance(mine, str):
        return f"render/score: {mine}"
    if isinstance(plain, str):
        return f"plain prompt render/score: {plain}"
    if _bad(plain):
        return f"plain prompt: {_bad(plain)}"
    return _bad(mine)


def _bad(scores: dict[str, float]) -> Optional[str]:
    for name, value in scores.items():
        if not math.isfinite(value):
            return f"non-finite score {name!r} ({value})"
    return None


class RewardWorkerActor:
    """The Ray face of a RewardWorker (wrapped with ray.remote in actors.scaling): the loop runs in a
    thread from construction on, so a restarted actor resumes work by itself, and `stats`/`stop`
    answer while it runs."""

    def __init__(self, cfg: dict[str, Any], redis_url: str, run: str, name: str, *,
                 reclaim_idle_ms: int = 30_000, torch_threads: Optional[int] = None, autostart: bool = True) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._spec = {"cfg": cfg, "redis_url": redis_url, "run": run, "reclaim_idle_ms": reclaim_idle_ms,
                      "torch_threads": torch_threads}
        config = Config.model_validate(cfg)
        # with a Ray GPU the actor sees exactly its device; without one, run.device decides
        device = "cuda" if torch.cuda.is_available() and config.reward.num_gpus > 0 else None
        self.worker = RewardWorker(config, redis_url, run, name, device=device, reclaim_idle_ms=reclaim_idle_ms)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if autostart:
            self.start()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self.worker.run, args=(self._stop,), daemon=True,
                                            name=f"reward-{self.worker.name}")
            self._thread.start()

    def spec(self) -> dict[str, Any]:
        """What it takes to start another worker like this one (used to scale from another driver)."""
        return dict(self._spec)

    def stats(self) -> dict[str, Any]:
        import ray

        return {"name": self.worker.name, "running": bool(self._thread and self._thread.is_alive()),
                "device": str(self.worker.device), "node_id": ray.get_runtime_context().get_node_id(),
                **self.worker.stats.as_dict()}

    def stop(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Finish the current batch (so its entries are acknowledged), then stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.stats()
