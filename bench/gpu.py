"""The whole speed suite of issue 12 in one call: JSON out, and a markdown table.

    python bench/gpu.py --preset tiny --out gpu.json                       # CPU, about a minute
    python bench/gpu.py --preset sd14-arch --device cuda --out gpu.json    # the real run (bench/gpu_device.md)
    python bench/gpu.py --preset tiny --quick --only learner,sampler       # a subset, smallest budget

Parts (each ratio measured side by side in this process and run):
  reward     reward worker vs a bare diffusers loop (same settings); batch sweep; images/s; MFU against
             a matmul measured here (bf16 on GPU, fp32 on CPU); each `reward.` speed switch
             (scoring/sd_speed.py) against the defaults, with its compile time and its image difference
  learner    one FL-DB step of GPT-2 (micro-batch 64 × 75): one teacher-forced pass vs a token-by-token
             loop like the official code's; equal to 1e-5; tokens/s, peak memory, bf16 autocast
  sampler    64 rewrites × 75 tokens: KV-cache sampling vs recomputing the prefix (bench/decoding.py's
             `run` when it is on main)
  broadcast  the policy's weights to 8 samplers on one node through the Ray object store
  e2e        Sampler + RewardWorker + Learner in one process against a local redis-server vs a loop
             like the official code's (plain prompt rendered again every step, token-by-token log-probs)
  ipgo       seconds and peak memory per IPGO iteration at 512², K = 2 (bench/ipgo.py)

`sd14-arch` has random weights: images are noise, compute and memory are the paper's. Every part
writes its result into --out as soon as it ends, so a run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

import gpu_common as G  # noqa: E402

PARTS = ("reward", "learner", "sampler", "broadcast", "e2e", "ipgo")
#: share of the time budget each part may use (the reward part has the most to measure)
SHARES = {"reward": 0.5, "learner": 0.1, "sampler": 0.07, "broadcast": 0.05, "e2e": 0.18, "ipgo": 0.1}


def _runner(name: str) -> Callable[..., dict[str, Any]]:
    if name == "reward":
        from gpu_reward import run
    elif name in ("learner", "sampler"):
        from gpu_learner import run_learner, run_sampler
        run = run_learner if name == "learner" else run_sampler
    elif name == "broadcast":
        from gpu_system import run_broadcast as run
    elif name == "e2e":
        from gpu_system import run_e2e as run
    else:
        from gpu_system import run_ipgo as run
    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny (CPU, seconds) or sd14-arch (full size, random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {','.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time for all parts (default: 480 on CUDA, 90 on CPU tiny, 60 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes and repeats (CI keeps the script working)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. reward.batch_size=4 (repeatable)")
    parser.add_argument("--out", default=None, help="write the JSON here (and the markdown table beside it, .md)")
    args = parser.parse_args(argv)

    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = G.resolve(args.device)
    budget = args.budget_s or (60.0 if args.quick else 480.0 if device.type == "cuda" else 90.0)
    env = G.describe_machine(device)
    result: dict[str, Any] = {
        "benchmark": "gpu", "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "preset": args.preset, "overrides": args.overrides, "quick": args.quick, "budget_s": budget, **env,
        "parts": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out) if args.out else None
    start = time.monotonic()
    ctx = G.Context(preset=args.preset, device=device, overrides=args.overrides, quick=args.quick)
    for i, name in enumerate(parts):
        left = budget - (time.monotonic() - start)
        part_budget = max(0.0, left * SHARES[name] / sum(SHARES[p] for p in parts[i:]))  # unused time flows on
        print(f"[gpu.py] {name}: budget {part_budget:.0f}s ({left:.0f}s left)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            part = _runner(name)(ctx, G.Deadline(part_budget))
        except G.Skip as exc:
            part = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 — one broken part must not lose the others' figures
            part = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        part.setdefault("status", "ok")
        part["wall_s"] = round(time.monotonic() - t0, 2)
        result["parts"][name] = part
        G.release(device)
        if out is not None:
            G.write(out, result)
    result["total_s"] = round(time.monotonic() - start, 2)
    result["markdown"] = G.markdown(result)
    if out is not None:
        G.write(out, result)
    print(json.dumps(result, indent=1, default=str))
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
