"""Where render/score work runs: in this process (`LocalPool`, the tiny default) or on Ray actors
(`RayPool`, one GPU each on GPU presets). Both take msgpack work batches and yield msgpack results
as they finish, so the driver only gathers small records (no images: scores, embeddings, a thumbnail
where the grid needs one)."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional

from common.config import Config

log = logging.getLogger(__name__)


class LocalPool:
    """One EvalWorker in the driver's process."""

    def __init__(self, cfg: Config) -> None:
        from eval.worker import EvalWorker

        self.worker = EvalWorker(cfg.to_dict())
        self.size = 1

    def render_id(self) -> str:
        return self.worker.render_id()

    def map(self, works: list[bytes]) -> Iterator[bytes]:
        for work in works:
            yield self.worker.process(work)

    def close(self) -> None:
        self.worker = None  # type: ignore[assignment]


class RayPool:
    """`n` EvalWorker actors (`reward.num_gpus` GPUs each), each kept `depth` batches busy."""

    def __init__(self, cfg: Config, n: int, depth: int = 2, torch_threads: Optional[int] = None,
                 start_timeout_s: float = 900.0) -> None:
        import ray

        from eval.worker import EvalWorker

        self.ray, self.size, self.depth = ray, n, depth
        remote = ray.remote(EvalWorker)
        gpus = cfg.reward.num_gpus if _cluster_gpus() > 0 else 0.0
        device = None if gpus > 0 else "cpu"
        self.actors = [remote.options(num_gpus=gpus, num_cpus=1, max_restarts=cfg.run.max_restarts,
                                      max_task_retries=2).remote(cfg.to_dict(), device, torch_threads)
                       for _ in range(n)]
        try:
            ids = ray.get([a.render_id.remote() for a in self.actors], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise RuntimeError(f"{n} eval workers (num_gpus={gpus}, num_cpus=1 each) did not start within "
                               f"{start_timeout_s:.0f}s: does the cluster have the resources? (`ray status`)") from exc
        if len(set(ids)) != 1:
            raise RuntimeError(f"eval workers disagree on what they compute (render ids {sorted(set(ids))}): "
                               "mixed GPU and CPU workers give different numbers; give every worker the same device")
        self.id = ids[0]

    def render_id(self) -> str:
        return self.id

    def map(self, works: list[bytes]) -> Iterator[bytes]:
        ray = self.ray
        queue = list(reversed(works))
        running: dict[Any, Any] = {}  # ObjectRef → actor
        load = {i: 0 for i in range(len(self.actors))}
        owner: dict[Any, int] = {}

        def submit() -> None:
            for i, actor in enumerate(self.actors):
                while queue and load[i] < self.depth:
                    ref = actor.process.remote(queue.pop())
                    running[ref] = actor
                    owner[ref] = i
                    load[i] += 1

        submit()
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            running.pop(ref)
            load[owner.pop(ref)] -= 1
            submit()
            yield ray.get(ref)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def make_pool(cfg: Config, workers: Optional[int]) -> Any:
    """`workers` (or eval.workers): None → one actor per cluster GPU when Ray is up with GPUs, else local.
    A number > 1, or any count on a running Ray cluster, → Ray actors; 1 without Ray → local."""
    import importlib.util

    n = workers or cfg.eval.workers
    ray_up = False
    if importlib.util.find_spec("ray") is not None:
        import ray

        ray_up = ray.is_initialized()
    if n is None:
        gpus = _cluster_gpus() if ray_up else 0.0
        n = max(1, int(gpus // max(cfg.reward.num_gpus, 1e-9))) if gpus > 0 else 1
        if gpus <= 0:
            return LocalPool(cfg)
    if n == 1 and not ray_up:
        return LocalPool(cfg)
    # CPU workers split this machine's cores; a GPU worker needs few CPU threads
    threads = None if _cluster_gpus() > 0 else max(1, (os.cpu_count() or 1) // n)
    return RayPool(cfg, n, torch_threads=threads)
