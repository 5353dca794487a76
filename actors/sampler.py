"""Sampler: the policy's side of data collection.

Holds a copy of the policy and the frozen reference; draws training prompts (shuffled, by
epoch), samples K rewrites per prompt at the annealed temperature (EOS forbidden at the first
step and before `min_len`), computes the per-token reference log-probs in one forward pass,
stamps the policy version and pushes the unscored trajectories to the `pending` stream. It
waits while `pending` is longer than `sampler.max_pending` (backpressure) and pulls newer
weights between batches.

`Sampler` is a plain class; `SamplerActor` is its Ray actor.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Optional

import torch

from actors.retry import Backoff
from common.config import Config
from common.data import load_train_prompts
from common.decoding import encode_prompts, ref_logprobs, sample, to_trajectories
from common.formats import PolicyFormat
from common.models import build_policy, build_reference, build_tokenizer, resolve_device
from common.schedules import sampling_temperature
from common.trajectory import Trajectory
from common.timing import PhaseClock
from common.weights import WeightsClient

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, cfg: Config, buffer, checkpoint: Optional[str] = None, weights=None,
                 index: int = 0, device: Optional[str] = None) -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.index = index
        self.device = resolve_device(device or cfg.run.device)
        self.tokenizer = build_tokenizer(cfg.model)
        self.format = PolicyFormat.from_config(cfg)
        self.policy = build_policy(cfg.model, self.tokenizer, checkpoint).to(self.device).eval()
        self.reference = build_reference(cfg.model, self.tokenizer, checkpoint).to(self.device)
        self.weights = WeightsClient(weights) if weights is not None else None
        self.clock = PhaseClock("sampler")  # time per phase, into the run's meta (common/timing.py)
        self.version = -1  # store version held; -1: nothing pulled yet, the starting (SFT) weights
        self.policy_step = 0  # learner step of the weights held: stamped on trajectories, drives the schedule
        self.prompts = load_train_prompts(cfg.sampler.datasets).prompts
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.run.seed * 1000 + index)
        self._epoch, self._order, self._cursor = 0, [], 0
        self.sampled = 0

    # ----------------------------------------------------------- prompts

    def next_prompts(self, n: int) -> list[str]:
        """Shuffled by epoch (seeded by run seed, sampler index and epoch): every prompt once per epoch."""
        out = []
        while len(out) < n:
            if self._cursor >= len(self._order):
                self._order = list(range(len(self.prompts)))
                random.Random(f"{self.cfg.run.seed}:{self.index}:{self._epoch}").shuffle(self._order)
                self._epoch, self._cursor = self._epoch + 1, 0
            out.append(self.prompts[self._order[self._cursor]])
            self._cursor += 1
        return out

    # ----------------------------------------------------------- weights

    def pull_weights(self) -> bool:
        """Load newer weights if the learner published some; True when the version changed."""
        if self.weights is None:
            return False
        answer = self.weights.fetch(self.version)
        if answer is None:
            return False
        version, step, state = answer
        self.policy.load_state_dict(state, strict=False)  # lm_head is tied to wte
        self.version, self.policy_step = version, step
        return True

    def temperature(self) -> float:
        s = self.cfg.sampler
        return sampling_temperature(self.policy_step, s.temp_start, s.temp_end, s.temp_anneal_steps)

    # ----------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_batch(self, prompts: Optional[list[str]] = None) -> list[Trajectory]:
        s = self.cfg.sampler
        prompts = prompts or self.next_prompts(s.prompts_per_batch)
        repeated = [p for p in prompts for _ in range(s.samples_per_prompt)]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, repeated, self.device, self.format)
        response_ids, response_mask = sample(self.policy, prompt_ids, prompt_mask, s.max_len, s.min_len,
                                             self.temperature(), self.tokenizer.eos_token_id, generator=self.generator)
        ref = ref_logprobs(self.reference, prompt_ids, prompt_mask, response_ids, response_mask)
        trajs = to_trajectories(self.tokenizer, repeated, prompt_ids, prompt_mask, response_ids, response_mask, ref,
                                policy_version=self.policy_step, run=self.buffer.run if self.buffer is not None else "",
                                fmt=self.format)
        self.sampled += len(trajs)
        return trajs

    def step(self) -> int:
        """One batch if the pipeline has room (`has_room`); returns trajectories pushed (0 when held back)."""
        with self.clock.phase("push"):
            room = self.has_room()
        if not room:
            return 0
        with self.clock.phase("weights"):
            self.pull_weights()
        with self.clock.phase("sample"):
            trajs = self.sample_batch()
        with self.clock.phase("push"):
            self.buffer.push_pending(trajs)
        self.clock.flush(self.buffer)
        return len(trajs)

    def has_room(self) -> bool:
        """Backpressure: the pending stream below `sampler.max_pending`, and the policy lag bounded."""
        s = self.cfg.sampler
        pending = self.buffer.pending_len()
        if pending >= s.max_pending:
            return False
        if s.max_lag_steps is None:
            return True
        queued = pending + self.buffer.fresh_len()
        return lag_room(queued, s.prompts_per_batch * s.samples_per_prompt, fresh_per_step(self.cfg), s.max_lag_steps)

    def run(self, stop_event: Optional[threading.Event] = None, max_batches: Optional[int] = None,
            idle_sleep: float = 0.2) -> int:
        """Loop until `stop_event` or the run's stop flag is set (or max_batches); returns trajectories pushed.
        Infrastructure errors (Redis restarting) are logged and retried with back-off."""
        pushed, batches = 0, 0
        backoff = Backoff(f"sampler {self.index}", log, self.buffer)
        while max_batches is None or batches < max_batches:
            if stop_event is not None and stop_event.is_set():
                break
            try:
                if stop_requested(self.buffer):  # in the try: an outage here killed the loop's thread
                    break
                n = self.step()
                backoff.ok()
            except Exception as exc:  # noqa: BLE001 — the sampler holds no acknowledged data; retry
                backoff.failed(exc)
                continue
            if n == 0:
                with self.clock.phase("wait"):
                    time.sleep(idle_sleep)
                continue
            pushed, batches = pushed + n, batches + 1
        return pushed

    def stats(self) -> dict:
        return {"sampled": self.sampled, "version": self.version, "policy_step": self.policy_step, "epoch": self._epoch}


def fresh_per_step(cfg: Config) -> int:
    """Fresh trajectories one learner step consumes (its online half, over all micro-batches)."""
    return cfg.derived()["fresh_per_micro_batch"] * cfg.learner.grad_accum


def lag_room(queued: int, batch: int, per_step: int, max_lag_steps: int) -> bool:
    """May a sampler push `batch` more trajectories behind `queued` ones (unscored + unread fresh)?

    The learner consumes `per_step` fresh trajectories a step, so the last of the new batch is read
    about (queued + batch) / per_step steps after it was sampled with the newest weights: that is
    its policy lag. Allowed while that stays ≤ max_lag_steps, and always while fewer than one
    step's worth is queued: a learner waiting for its fresh half must get it, even when a batch is
    larger than max_lag_steps · per_step. With per_step = 0 (a replay-only learner) the lag is not
    set by the learner and only max_pending holds."""
    if queued < per_step or per_step <= 0:
        return True
    return queued + batch <= max_lag_steps * per_step


def stop_requested(buffer) -> bool:
    """The run's stop flag (`pag:{run}:meta` field `stop`), set by the driver on exit or Ctrl-C."""
    return str(buffer.meta().get("stop", "0")) == "1"


class _SamplerActor(Sampler):
    """Ray actor: builds its own buffer client from the URL (connections do not cross processes) and
    runs its loop in a thread from construction on, so a restarted actor pulls the latest weights and
    resumes by itself while `stats`/`stop` still answer."""

    def __init__(self, cfg_dict: dict, redis_url: str, run: str, checkpoint: Optional[str], weights,
                 index: int, torch_threads: Optional[int] = None) -> None:
        from buffer import ReplayBuffer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = Config.model_validate(cfg_dict)
        super().__init__(cfg, ReplayBuffer.from_config(cfg.buffer, run, redis_url=redis_url), checkpoint,
                         weights, index)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), daemon=True, name=f"sampler-{index}")
        self._thread.start()

    def stats(self) -> dict:
        return {**super().stats(), "running": self._thread.is_alive()}

    def stop(self, timeout_s: float = 60.0) -> dict:
        self._stop.set()
        self._thread.join(timeout_s)
        return self.stats()


def sampler_actor_class(cfg: Config):
    import ray

    return ray.remote(num_cpus=1, num_gpus=cfg.sampler.num_gpus, max_restarts=cfg.run.max_restarts,
                      max_task_retries=0)(_SamplerActor)
