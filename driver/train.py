"""`pag train` — the thin driver: start Redis and Ray, launch the roles as actors, drive the
learner, show progress, stop cleanly, write the report. Data never passes through here: samplers,
reward workers and the learner talk through Redis keys and Ray object references.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from buffer.connection import REDIS_URL_ENV
from common.presets import PRESET_HELP, default_preset
from common.config import Config
from common.constants import BUFFER_SIZE, FRESH_PER_S, LAG_MEAN, LOSS_TOTAL, REWARD, TEXT_DIVERSITY
from common.errors import RunFailedError
from common.methods import METHODS
from driver.outage import OUTAGE, is_outage, wait_for_redis
from driver.runfiles import PROGRESS_FILES, REPORT_FILES, START_FILES, resolve_run, save_config

log = logging.getLogger("pag.train")


class RunFailed(RunFailedError):
    """A role could not come back; the message names it."""


# ---------------------------------------------------------------------- CLI

def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train the policy (embedded default: tiny preset, local Ray, private redis-server)",
        description="Train a PAG policy. With no flags: the tiny preset on a local Ray with a private "
                    "redis-server (AOF in runs/<name>/redis/), one sampler, one reward worker and the learner. "
                    "On a cluster: ray job submit --working-dir . -- pag train --preset sd14 --redis-url redis://…",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=default_preset(), help=PRESET_HELP)
    p.add_argument("--method", choices=list(METHODS), help="a named method or ablation (common/methods.py): its "
                   "overrides go over the preset, under --config and key=value; stored as run.method")
    p.add_argument("--config", dest="config_file", help="YAML file layered over the preset")
    p.add_argument("--steps", type=int, help="learner steps (learner.steps)")
    p.add_argument("--samplers", type=int, help="sampler actors (sampler.num_samplers)")
    p.add_argument("--reward-workers", type=int, help="reward workers at start (reward.num_workers); "
                                                      "change later with `pag workers scale`")
    p.add_argument("--run-name", help="run name (default {preset}__{seed}__{time})")
    p.add_argument("--runs-dir", help="where run directories go (run.runs_dir)")
    p.add_argument("--storage-path", help="copy the run directory to this URI, which outlives a node: file:///shared, "
                   "s3://bucket/prefix, gs://bucket/prefix (run.storage_path)")
    p.add_argument("--redis-url", help="use this Redis instead of a private redis-server (buffer.redis_url; default "
                   f"${REDIS_URL_ENV} when set). Required on a Ray cluster, and not a loopback address there")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--resume", action="store_true",
                   help="continue --run-name (or the newest run) from its last checkpoint with the same buffer")
    p.add_argument("--no-report", action="store_true", help="skip report.md and samples.png at the end")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. learner.lr=3e-5")
    p.set_defaults(func=cmd_train)

    a = sub.add_parser("adapt", help="print diverse rewrites of a prompt from a trained run",
                       description="Sample rewrites of a plain prompt with a trained policy and score them.")
    a.add_argument("prompt", help="the plain prompt, e.g. 'a cat on a sofa'")
    a.add_argument("--checkpoint", required=True, help="a run directory (runs/<name>) or a checkpoint directory")
    a.add_argument("-n", type=int, default=8, help="number of rewrites")
    a.add_argument("--decode", choices=["sample", "beam"], default="sample",
                   help="i.i.d. samples (default), or the paper's diverse beam search (deterministic, best first)")
    a.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--decode sample)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed and prompt, the same rewrites")
    a.add_argument("--no-score", action="store_true", help="do not render and score the rewrites")
    a.set_defaults(func=cmd_adapt)


def cmd_train(args) -> int:
    """Errors (config, data, Redis, cluster, a role that died) reach pag/cli.py, which prints one line."""
    from sft.cache import require_sft

    cfg, run_dir = resolve_run(args)
    require_sft(cfg)  # before the run directory, Redis or Ray: sd14 needs an SFT reference
    trainer = Trainer(cfg, run_dir, resume=args.resume, report=not args.no_report)
    trainer.prepare()  # before the run directory exists: a run that cannot start leaves nothing behind
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")  # URLs with their password redacted
    if trainer.storage is not None:  # a storage path that cannot be written stops the run here
        trainer.storage.push(run_dir, *START_FILES)
    return trainer.run()


# ---------------------------------------------------------------------- driver

class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, report: bool = True) -> None:
        self.cfg, self.run_dir, self.resume, self.want_report = cfg, Path(run_dir), resume, report
        self.run_name = cfg.run.name
        from common.storage import RunStorage

        self.storage = RunStorage.from_config(cfg)
        self.redis_server = None
        self.started_ray = False
        self.history: list[dict[str, float]] = []

    # -------------------------------------------------------------- set-up

    def _start_redis(self) -> str:
        if self.cfg.buffer.redis_url:
            return self.cfg.buffer.redis_url
        from common.redis_server import RedisServer

        self.redis_server = RedisServer(self.run_dir / "redis").start()
        log.info("private redis-server on %s (AOF in %s)", self.redis_server.url, self.run_dir / "redis")
        return self.redis_server.url

    def prepare(self) -> None:
        """Join Ray (job-aware), check every role can reach Redis, the cluster can host the roles and the
        prompt sets load; raises ConfigError / ClusterError / DatasetError with what to do, and leaves Ray
        as it found it on failure."""
        import ray

        from common.data import load_train_prompts
        from common.cluster import check_redis_reach, cluster_reason, init_ray, local_cpus, preflight

        load_train_prompts(self.cfg.sampler.datasets)  # a bad prompt file fails here, not in a sampler
        url, allow, address = self.cfg.buffer.redis_url, self.cfg.buffer.allow_loopback, self.cfg.run.ray_address
        check_redis_reach(url, None)  # empty: an unset variable expanded by a shell; before anything starts
        if self.cfg.buffer.redis_url:  # an unreachable --redis-url fails in seconds, before SFT and Ray
            from buffer.connection import connect

            from common.cluster import hash_layout_hint

            client = connect(self.cfg.buffer.redis_url, retries=2)
            try:
                client.ping()
                hint = hash_layout_hint(client)
                if hint:
                    log.warning(hint)
            finally:
                client.close()
        self.started_ray = init_ray(self.cfg.run.ray_address, num_cpus=local_cpus(self.cfg)) or self.started_ray
        try:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            check_redis_reach(url, cluster_reason(address, os.environ, nodes), allow_loopback=allow)
            preflight(self.cfg)
        except BaseException:
            if self.started_ray:
                ray.shutdown()
                self.started_ray = False
            raise

    def _launch(self, redis_url: str, sft: Optional[str]) -> None:
        import ray

        from actors.sampler import sampler_actor_class
        from actors.scaling import start_workers, wait_ready
        from learner.learner import learner_actor_class
        from common.cluster import NAMESPACE, weight_store_name
        from common.weights import WeightStore

        cfg_dict = self.cfg.to_dict()
        threads = 1 if self.started_ray and (os.cpu_count() or 2) <= 4 else None
        store = weight_store_name(self.run_name)  # by name: a handle argument would not survive an actor restart
        self.store = ray.remote(num_cpus=0)(WeightStore).options(name=store, namespace=NAMESPACE).remote()
        self.learner = learner_actor_class(self.cfg).remote(cfg_dict, redis_url, self.run_name, str(self.run_dir.resolve()),
                                                            sft, store, True)
        # reward workers need no weights: they build their models while the learner builds its own
        workers = start_workers(self.cfg, redis_url, self.run_name, torch_threads=threads, wait=False)
        ray.get(self.learner.ping.remote())  # the first weights are published before samplers start
        self.samplers = [sampler_actor_class(self.cfg).remote(cfg_dict, redis_url, self.run_name, sft, store, i, threads)
                         for i in range(self.cfg.sampler.num_samplers)]
        wait_ready(workers)  # named, detached: `pag workers scale`

    # -------------------------------------------------------------- the loop

    def run(self) -> int:
        import ray

        from buffer import ReplayBuffer
        from sft.cache import ensure_sft

        sft = ensure_sft(self.cfg)
        redis_url = self._start_redis()
        self.buffer = ReplayBuffer.from_config(self.cfg.buffer, self.run_name, redis_url=redis_url)
        self.buffer.set_meta(stop="0", config_hash=self.cfg.hash(), run_dir=str(self.run_dir.resolve()))
        interrupted = False
        previous = signal.getsignal(signal.SIGTERM)
        previous_int = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        # explicitly: a run started from a background job (`pag train &`, nohup, some CI runners) inherits
        # SIGINT *ignored*, and Ctrl-C / `kill -INT` would be lost
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            if not ray.is_initialized():
                self.prepare()
            self._launch(redis_url, sft)
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
            print("\npag train: interrupted — writing a checkpoint and stopping", file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
            self._shutdown(final_report=not interrupted, sft=sft, redis_url=redis_url)
        return 130 if interrupted else 0

    def _loop(self) -> None:
        import ray
        from tqdm import tqdm

        from torch.utils.tensorboard import SummaryWriter

        from learner.fresh import FreshTimeoutError

        writer = SummaryWriter(str(self.run_dir / "tb"))
        total = self.cfg.learner.steps
        step = ray.get(self.learner.get_step.remote())
        bar = tqdm(total=total, initial=step, desc=f"pag train {self.run_name}", unit="step", dynamic_ncols=True)
        metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        failures = 0
        try:
            while step < total:
                ref = self.learner.train_step.remote()
                try:
                    metrics = ray.get(ref)
                except KeyboardInterrupt:
                    # the step goes on in the actor and the checkpoint written at shutdown includes it, so
                    # its metrics belong in metrics.jsonl too, or a resumed run would skip that step's line
                    finished = _finish(ref)
                    if finished is not None:
                        self._record(finished, metrics_file, writer, bar)
                    raise
                except FreshTimeoutError as exc:  # raised in the actor: Ray's error is also an instance of it
                    raise RunFailed(str(getattr(exc, "cause", None) or exc)) from None
                except OUTAGE as exc:
                    self._ride_out(exc)
                    continue
                except ray.exceptions.RayActorError as exc:
                    failures += 1
                    if failures > self.cfg.run.max_restarts:
                        raise RunFailed(f"the learner actor died {failures} times and cannot come back: {exc}") from exc
                    log.warning("learner actor died (%s); Ray restarts it from the last checkpoint", exc)
                    step = self._wait_for(self.learner, "learner")
                    continue
                step = self._record(metrics, metrics_file, writer, bar)
                if step % 10 == 0:
                    self._check_roles()
                if step % self.cfg.learner.checkpoint_every == 0:
                    metrics_file.flush()
                    writer.flush()
                    self._persist(*PROGRESS_FILES)
        finally:
            bar.close()
            metrics_file.close()
            writer.close()
            self._persist(*PROGRESS_FILES)

    def _ride_out(self, exc: BaseException) -> None:
        if not is_outage(exc):
            raise exc
        wait_for_redis(self.buffer, self.cfg.buffer.max_outage_s, exc, self.run_name, self.redis_server)

    def _record(self, metrics: dict[str, float], metrics_file, writer, bar) -> int:
        """One learner step's metrics into the history, metrics.jsonl, TensorBoard and the progress bar."""
        step = int(metrics["step"])
        self.history.append(metrics)
        metrics_file.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step":
                writer.add_scalar(key, value, step)
        bar.n = step
        bar.set_postfix_str(_postfix(metrics), refresh=False)
        bar.refresh()
        return step

    def _persist(self, *rels: str) -> None:
        """Copy run files to run storage, if any; a failure is logged (the files stay in run_dir)."""
        if self.storage is not None:
            try:
                self.storage.push(self.run_dir, *rels)
            except Exception:  # noqa: BLE001 — storage is a copy: a failed one must not end the run
                log.exception("could not copy %s to %s", ", ".join(rels), self.storage.uri)

    def _wait_for(self, actor, name: str, timeout_s: float = 300.0) -> int:
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(actor.ping.remote(), timeout=30)
                return ray.get(self.learner.get_step.remote())
            except ray.exceptions.ActorDiedError as exc:
                raise RunFailed(f"the {name} actor died and will not restart: {exc}") from exc
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(2)
        raise RunFailed(f"the {name} actor did not come back within {timeout_s:.0f}s")

    def _check_roles(self) -> None:
        """A sampler or reward worker that Ray could not restart ends the run, named."""
        import ray

        for i, actor in enumerate(self.samplers):
            try:
                ray.get(actor.stats.remote(), timeout=60)
            except ray.exceptions.ActorDiedError as exc:
                raise RunFailed(f"sampler {i} died and Ray could not restart it: {exc}") from exc
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # restarting: it resumes with the latest weights by itself

    # -------------------------------------------------------------- tear-down

    def _shutdown(self, final_report: bool, sft: Optional[str], redis_url: str) -> None:
        import ray

        try:
            self.buffer.set_meta(stop="1")
        except Exception:  # noqa: BLE001 — Redis may be what failed
            log.exception("could not set the stop flag")
        if ray.is_initialized() and getattr(self, "learner", None) is not None:
            try:
                path = ray.get(self.learner.save.remote(), timeout=300)
                log.info("checkpoint %s", path)
            except Exception:  # noqa: BLE001
                log.exception("final checkpoint failed; the last periodic one stands")
            from actors.scaling import stop_workers

            try:
                ray.get([a.stop.remote() for a in getattr(self, "samplers", [])], timeout=120)
            except Exception:  # noqa: BLE001
                log.warning("a sampler did not stop in time")
            if final_report and self.want_report:
                try:
                    from driver.report import write_report

                    if self.storage is not None:  # the learner may have written it on another node
                        self.storage.pull_checkpoint(self.run_dir)
                    write_report(self.cfg, self.run_dir, self.history, redis_url, sft)
                    self._persist(*REPORT_FILES)
                except Exception:  # noqa: BLE001 — a report failure must not lose the run
                    log.exception("report failed")
            try:
                stop_workers(self.run_name)  # each finishes and acknowledges its batch first
            except Exception:  # noqa: BLE001
                log.warning("some reward workers did not stop in time; their unacknowledged entries stay "
                            "in the stream for the next run or worker")
            for actor in getattr(self, "samplers", []) + [self.learner, self.store]:
                ray.kill(actor, no_restart=True)
        self.buffer.close()
        if self.started_ray:
            ray.shutdown()
        if self.redis_server is not None:
            self.redis_server.stop()


def _finish(ref, timeout_s: float = 120.0) -> Optional[dict[str, float]]:
    """The result of a learner step already under way, or None if it fails or takes too long."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception:  # noqa: BLE001 — stopping anyway: the checkpoint and the other lines stand
        log.warning("the learner step under way at the interrupt did not finish; its metrics line is missing")
        return None


def _raise_interrupt(signum, frame) -> None:
    """SIGTERM (a job being cancelled) stops as cleanly as Ctrl-C."""
    raise KeyboardInterrupt


def _postfix(m: dict[str, float]) -> str:
    parts = [f"loss={m.get(LOSS_TOTAL, float('nan')):.3g}"]
    if REWARD in m:
        parts.append(f"r={m[REWARD]:.3g}")
    if TEXT_DIVERSITY in m:
        parts.append(f"div={m[TEXT_DIVERSITY]:.3f}")
    parts.append(f"buf={m.get(BUFFER_SIZE, 0):.0f}")  # NaN when Redis was out at the step's end: "buf=nan"
    parts.append(f"lag={m.get(LAG_MEAN, 0):.1f}")
    parts.append(f"traj/s={m.get(FRESH_PER_S, 0):.1f}")
    return " ".join(parts)


# ---------------------------------------------------------------------- adapt

def cmd_adapt(args) -> int:
    from driver.report import adapt

    for line in adapt(args.prompt, Path(args.checkpoint), n=args.n, temperature=args.temperature, seed=args.seed,
                      score=not args.no_score, decode=args.decode):
        print(line)
    return 0
