"""Reward workers as named Ray actors, scaled while a run goes on.

Each worker is a detached actor named `pag:{run}:reward:{i}` in the Ray namespace `pag`, so any
driver attached to the same cluster — the run's own, a `ray job submit`, or the CLI — finds, adds
and removes them by name:

    pag workers scale 4 --run demo [--ray-address auto]     # start or stop workers to reach 4
    pag workers list --run demo

Scaling up copies the spec (config, Redis URL) of a running worker, so only the number is needed;
from zero workers pass `--redis-url` and `--preset`/`--config`. Scaling down asks the highest-
numbered workers to finish their batch and stop, then kills them; a worker that dies instead
(killed, out of memory) leaves its un-acknowledged entries in the `pending` stream, where another
worker reclaims them after `reclaim_idle_ms`. The queue lives in Redis, so workers started from
another node or job by any other means join the same consumer group and share the work.

Workers are detached (they outlive the driver that started them, which is what lets a short-lived
CLI scale a run); the run's driver calls `stop_workers(run)` when it ends.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any, Optional

from common.config import Config, load_config
from common.cluster import NAMESPACE, init_ray, list_reward_workers, reward_worker_index, reward_worker_name

log = logging.getLogger(__name__)

def _actor_class():
    import ray

    from actors.reward_worker import RewardWorkerActor

    return ray.remote(RewardWorkerActor)


def get_worker(name: str):
    import ray

    return ray.get_actor(name, namespace=NAMESPACE)


def _spec_from_running(run: str) -> Optional[dict[str, Any]]:
    import ray

    for name in list_reward_workers(run):
        try:
            return ray.get(get_worker(name).spec.remote(), timeout=60)
        except Exception as exc:  # noqa: BLE001 — a dying worker; try the next one
            log.warning("could not read the spec of %s: %s", name, exc)
    return None


def scale_workers(run: str, n: int, *, cfg: Config | None = None, redis_url: str | None = None,
                  reclaim_idle_ms: int | None = None, torch_threads: int | None = None,
                  wait: bool = True, stop_timeout_s: float = 120.0) -> list[str]:
    """Start or stop named reward-worker actors until the run has `n`; returns their names.

    New workers use `cfg`/`redis_url` when given, else the spec of a running worker. `wait`
    blocks until new workers have built their models (their first call answers)."""
    import ray

    if n < 0:
        raise ValueError(f"number of reward workers must be >= 0, got {n}")
    current = list_reward_workers(run)
    if len(current) > n:
        _stop(current[n:], stop_timeout_s)
    elif len(current) < n:
        spec = _spec_from_running(run) if (cfg is None or redis_url is None) else None
        if spec is None and (cfg is None or redis_url is None):
            raise ValueError(f"run {run!r} has no reward worker to copy settings from: give cfg and redis_url "
                             "(CLI: --redis-url and --preset/--config)")
        spec = spec or {}
        cfg_dict = cfg.to_dict() if cfg is not None else spec["cfg"]
        url = redis_url or spec["redis_url"]
        idle = reclaim_idle_ms if reclaim_idle_ms is not None else spec.get("reclaim_idle_ms", 30_000)
        threads = torch_threads if torch_threads is not None else spec.get("torch_threads")
        config = Config.model_validate(cfg_dict)
        taken = {reward_worker_index(run, name) for name in current}
        free = (i for i in range(n + len(current)) if i not in taken)
        cls = _actor_class()
        started = []
        for _ in range(n - len(current)):
            name = reward_worker_name(run, next(free))
            cls.options(
                name=name, namespace=NAMESPACE, lifetime="detached",
                num_gpus=config.reward.num_gpus, num_cpus=1, max_restarts=config.run.max_restarts,
                resources=dict(config.reward.resources) or None,
            ).remote(cfg_dict, url, run, name, reclaim_idle_ms=idle, torch_threads=threads)
            started.append(name)
        if wait:
            wait_ready(started)
    return list_reward_workers(run)


def start_workers(cfg: Config, redis_url: str, run: str, n: int | None = None, **kwargs: Any) -> list[str]:
    """Start the run's workers (`reward.num_workers` unless `n` is given); see scale_workers."""
    return scale_workers(run, cfg.reward.num_workers if n is None else n, cfg=cfg, redis_url=redis_url, **kwargs)


def wait_ready(names: list[str]) -> None:
    """Block until each named worker has built its models (its first call answers); a failed constructor
    raises here."""
    import ray

    ray.get([get_worker(name).stats.remote() for name in names])


def stop_workers(run: str, timeout_s: float = 120.0) -> int:
    """Stop every reward worker of the run (finishing their batches); returns how many."""
    names = list_reward_workers(run)
    _stop(names, timeout_s)
    return len(names)


def worker_stats(run: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    import ray

    out = []
    for name in list_reward_workers(run):
        try:
            out.append(ray.get(get_worker(name).stats.remote(), timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 — report, do not fail the listing
            out.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    return out


def _stop(names: list[str], timeout_s: float) -> None:
    """Graceful stop (the batch in hand is stored and acknowledged), then kill without restart."""
    import ray

    handles = [get_worker(name) for name in names]
    refs = [h.stop.remote(timeout_s) for h in handles]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for handle in handles:
        ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # names are released asynchronously; free them before reuse
        live = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
        if not live & set(names):
            return
        time.sleep(0.1)


# ------------------------------------------------------------------ CLI: pag workers …

def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `workers scale` and `workers list` to the `pag` command."""
    workers = subparsers.add_parser("workers", help="scale and list a run's reward workers (Ray actors)")
    sub = workers.add_subparsers(dest="workers_command", required=True)

    scale = sub.add_parser("scale", help="start or stop reward workers to reach N")
    scale.add_argument("n", type=int, help="number of reward workers wanted")
    _common_args(scale)
    scale.add_argument("--redis-url", help="only needed when the run has no worker yet")
    scale.add_argument("--preset", default=None, help="only needed when the run has no worker yet")
    scale.add_argument("--config", default=None, help="YAML config, when the run has no worker yet")
    scale.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    scale.add_argument("--reclaim-idle-ms", type=int, default=None,
                       help="take over a dead worker's entries after this idle time (default 30000)")
    scale.set_defaults(func=_cmd_scale)

    listing = sub.add_parser("list", help="the run's reward workers and their counters")
    _common_args(listing)
    listing.set_defaults(func=_cmd_list)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name")
    parser.add_argument("--ray-address", default="auto", help="Ray cluster address (default: auto = RAY_ADDRESS or local)")


def _cmd_scale(args: argparse.Namespace) -> int:
    init_ray(args.ray_address, log_to_driver=False, namespace=NAMESPACE)
    cfg = None
    if args.preset or args.config or args.overrides:
        cfg = load_config(args.preset or "sd14", args.config, args.overrides)
    names = scale_workers(args.run, args.n, cfg=cfg, redis_url=args.redis_url, reclaim_idle_ms=args.reclaim_idle_ms)
    print(json.dumps({"run": args.run, "workers": names}))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    init_ray(args.ray_address, log_to_driver=False, namespace=NAMESPACE)
    for row in worker_stats(args.run):
        print(json.dumps(row, default=str))
    return 0
