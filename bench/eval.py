"""Benchmark of `pag eval`'s render+score fan-out; prints one JSON object.

    python bench/eval.py                                  # tiny preset, CPU: 1 and 2 workers
    python bench/eval.py --preset sd14 --workers 1,2,4 --texts 64 --ray-address auto

Measures images/s of `eval.runner.render_missing` (render with the eval's Renderer, score aesthetic +
CLIP, encode the records, write them into a fresh SQLite cache) for the in-process worker and for
Ray pools of 1, 2, … actors, in the same process, interleaved `--repeats` times so that load from
other processes hits every variant alike; medians are reported, and each variant's ratio against
the 1-actor Ray pool. Actor start-up (model building) is timed separately and excluded. On a CPU
machine each of n actors gets cores // n torch threads, so the comparison is at equal total threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.config import load_config  # noqa: E402
from eval.cache import ResultsCache  # noqa: E402
from eval.methods import MethodOutput, Rewrite  # noqa: E402
from eval.pool import LocalPool, RayPool  # noqa: E402
from eval.runner import render_missing, work_items  # noqa: E402

PROMPTS = ROOT / "common" / "assets" / "prompts" / "coco_prompts.txt"


def items_for(cfg, n: int, tag: str):
    lines = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()][:n]
    sets = {"bench": lines}
    outputs = {"rule": {"bench": [MethodOutput(p, [Rewrite(f"{p}, {tag}")]) for p in lines]}}
    return [it for it in work_items(cfg, sets, outputs) if it["key"] != it["against"]]  # the rewrites only


def measure(cfg, pool, items) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cache = ResultsCache(Path(tmp) / "c.sqlite")
        t0 = time.perf_counter()
        _, errors, stats = render_missing(cfg, items, cache, pool, pool.render_id(), progress=False)
        seconds = time.perf_counter() - t0
        cache.close()
    if errors:
        raise RuntimeError(f"{len(errors)} items failed: {next(iter(errors.values()))}")
    return stats["images"] / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workers", default="1,2", help="Ray pool sizes to compare (the first is the baseline)")
    ap.add_argument("--texts", type=int, default=24, help="distinct texts rendered per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-local", action="store_true", help="skip the in-process worker")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import ray

    cfg = load_config(args.preset, None, args.overrides)
    sizes = [int(x) for x in args.workers.split(",")]
    cores = os.cpu_count() or 1
    ray.init(address=args.ray_address or "local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"], "TOKENIZERS_PARALLELISM": "false"}},
             **({} if args.ray_address else {"num_cpus": sum(sizes) + 1}))  # every pool's actors live at once
    gpus = ray.cluster_resources().get("GPU", 0)
    pools, startup = {}, {}
    for n in sizes:
        t0 = time.perf_counter()
        pools[f"ray_{n}"] = RayPool(cfg, n, torch_threads=None if gpus else max(1, cores // n))
        startup[f"ray_{n}"] = time.perf_counter() - t0
    if not args.no_local:
        t0 = time.perf_counter()
        pools["local"] = LocalPool(cfg)
        startup["local"] = time.perf_counter() - t0
    runs: dict[str, list[float]] = {name: [] for name in pools}
    for r in range(args.repeats):
        for name, pool in pools.items():
            runs[name].append(measure(cfg, pool, items_for(cfg, args.texts, f"repeat {r}")))
    base = f"ray_{sizes[0]}"
    median = {name: statistics.median(v) for name, v in runs.items()}
    for pool in pools.values():
        pool.close()
    ray.shutdown()
    print(json.dumps({
        "bench": "eval_render_score", "preset": args.preset, "texts": args.texts,
        "images_per_text": cfg.eval.images.per_prompt, "steps": cfg.eval.images.steps,
        "image_size": cfg.model.image_size,
        "cores": cores, "gpus": gpus, "machine": platform.processor() or platform.machine(),
        "images_per_s_median": median, "images_per_s_runs": runs, "startup_s": startup,
        "ratio_vs_" + base: {name: v / median[base] for name, v in median.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
