"""Issue 20: the paper's two tables in the miniature world -- every method, every ablation, with pictures.

    python bench/claim.py --preset mini      # runs/claim-mini/; docs/results-mini.md + .json, 76 min on 2 cores

1. The SFT reference (`pag sft`'s cache, `model.sft_steps`) is every trained method's start and the `sft` row.
2. PPO's sweep, on the first seed only: `learner.ppo.kl_coef` over `--ppo-kl` × `learner.lr` over `--ppo-lr`; the
   best by held-out sampled reward is PPO for every seed (said in the report). No other method is tuned, and no
   seed on its own.
3. `pag train --preset mini --method M --steps N run.seed=S` for pag, pag-no-reset, pag-no-prt, pag-no-fl, gfn-tb
   and ppo: the same steps, batches and seeds. `mini` turns flow reactivation off (120-step runs); the methods that
   keep it get it every N/5 steps, the official schedule's proportion (every 2,000 of 10,000 steps), re-drawing the
   flow head's last layer with PyTorch's init (`learner.reactivation_init=default`) instead of the official N(0, 1):
   measured at 60 steps, N(0, 1) every 12 steps threw the FL-DB loss from 141 to 190,520 and it stayed above 3,600
   to the end -- the official run has 2,000 steps to absorb each reset, these have 12 (docs/results-mini.md).
4. `pag eval --preset mini --scorers world` per seed, `--decode sample` and `--decode beam` (16 groups): plain,
   rule, sft and the seed's runs on the first P held-out prompts × R rewrites. Reward, text and image diversity are
   eval's; **mode coverage** is how many of the world's five taste modes a prompt's rewrites reach, read from their
   pictures by the world's attribute reader (the `world` scorer) and, apart, from their words (all three of a
   mode's values named, world.corpus.named_values).
5. The flow head's τ-dormant ratio over each run (metrics.jsonl, `plasticity/flow_dormant`).

Everything lands in --out (runs, evals, the shared eval cache; a rerun reuses finished runs and evals); the report,
its JSON and pictures go to --docs. The last line printed is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bench.claim_mini_tables import (ABLATION_ROWS, dormant, histogram_plot, method_stats, read_eval, render_grid,
                                     targets, write_report)

TRAINED = ("pag", "pag-no-reset", "pag-no-prt", "pag-no-fl", "gfn-tb", "ppo")
FIXED = ("plain", "rule", "sft")  # no training: one row whatever the seed
DECODES = ("sample", "beam")


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    # a private local Ray per run, even where a `ray start` cluster is up; short, absolute (Ray's socket paths under
    # it must stay within the 107 characters of a Unix socket name, and a relative one fails to start)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="pag-claim-")
    return env


def _run(cmd: list[str], log: Path) -> None:
    env = _env()
    try:
        with open(log, "w") as fh:
            result = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {result.returncode}); its log: {log}\n"
                           + log.read_text()[-3000:])


def reactivates(method: str) -> bool:
    """Whether the method keeps flow reactivation (its tree does not switch it off), and trains a flow head."""
    from common.methods import METHODS

    learner = METHODS[method].overrides.get("learner", {})
    return learner.get("reactivation_every", None) != 0


def train_overrides(method: str, steps: int) -> list[str]:
    """The claim's overrides of one method's run: reactivation every steps/5, with PyTorch's init, where the method
    keeps it."""
    if not reactivates(method):
        return []
    return [f"learner.reactivation_every={max(1, steps // 5)}", "learner.reactivation_init=default"]


def train(label: str, method: str, seed: int, args, extra: Sequence[str] = ()) -> Path:
    """One `pag train` run, reused when it already finished; returns its run directory."""
    run_dir = args.out / "runs" / f"{label}-s{seed}"
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_dir
    cmd = [sys.executable, "-m", "pag.cli", "train", "--preset", "mini", "--method", method, "--steps", str(args.steps),
           "--run-name", run_dir.name, "--runs-dir", str(args.out / "runs"), "--no-report", f"run.seed={seed}",
           *train_overrides(method, args.steps), *extra, *args.set]
    print(f"[claim] train {run_dir.name}", file=sys.stderr, flush=True)
    _run(cmd, args.out / "logs" / f"train-{run_dir.name}.log")
    return run_dir


def evaluate(name: str, runs: dict[str, Path], decode: str, args) -> Path:
    """`pag eval` of the fixed methods and `runs` (label → run dir); returns its output directory."""
    out_dir = args.out / f"eval-{name}"
    if (out_dir / "results.json").is_file():
        return out_dir
    methods = ",".join([*FIXED, *(f"{label}:{path}" for label, path in runs.items())])
    cmd = [sys.executable, "-m", "pag.cli", "eval", "--preset", "mini", "--methods", methods, "--scorers", "world",
           "--limit", str(args.prompts), "--rewrites", str(args.rewrites), "--decode", decode, "--name", name,
           "--runs-dir", str(args.out), "--no-progress", *args.set]
    print(f"[claim] eval {name}", file=sys.stderr, flush=True)
    _run(cmd, args.out / "logs" / f"eval-{name}.log")
    return out_dir


def ppo_settings(kl: float, lr: float) -> tuple[str, list[str]]:
    """A PPO sweep point's label and overrides."""
    return f"ppo-kl{kl:g}-lr{lr:g}", [f"learner.ppo.kl_coef={kl:g}", f"learner.lr={lr:g}"]


def train_all(args) -> tuple[dict[int, dict[str, Path]], dict[str, Any]]:
    """Every seed's runs (label → run dir) and PPO's sweep on the first seed (setting → reward, the best)."""
    runs: dict[int, dict[str, Path]] = {}
    grid = [(kl, lr) for kl in args.ppo_kl for lr in args.ppo_lr]
    sweep: dict[str, Any] = {"seed": args.seeds[0], "grid": grid, "reward": {}, "best": list(grid[0])}
    for seed in args.seeds:
        runs[seed] = {}
        for method in args.methods:
            if method != "ppo":
                runs[seed][method] = train(method, method, seed, args)
                continue
            if seed == args.seeds[0] and len(grid) > 1:
                setting = {ppo_settings(kl, lr)[0]: (kl, lr) for kl, lr in grid}
                tried = {label: train(label, "ppo", seed, args, ppo_settings(*kl_lr)[1])
                         for label, kl_lr in setting.items()}
                results, _ = read_eval(evaluate(f"ppo-sweep-s{seed}", tried, "sample", args))
                for label in tried:
                    sweep["reward"][label] = next(iter(results["table"][label].values()))["reward"]["mean"]
                sweep["best"] = list(setting[max(sweep["reward"], key=sweep["reward"].get)])
            label, extra = ppo_settings(*sweep["best"])
            runs[seed]["ppo"] = train(label, "ppo", seed, args, extra)
    return runs, sweep


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/claim.py --preset mini", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (default 1 2 3)")
    p.add_argument("--steps", type=int, default=60, help="learner steps of every training run (default 60)")
    p.add_argument("--methods", default=",".join(TRAINED), help=f"trained methods (default {','.join(TRAINED)})")
    p.add_argument("--ppo-kl", default="0.2,0.05",
                   help="PPO's KL coefficients (learner.ppo.kl_coef) swept on the first seed with --ppo-lr, the best "
                        "by held-out reward used for every seed (default 0.2,0.05; 0.2 is Promptist's)")
    p.add_argument("--ppo-lr", default="5e-5,3e-4",
                   help="PPO's learning rates in the sweep (default 5e-5,3e-4: Promptist's, and mini's own for PAG); "
                        "one KL and one lr: no sweep")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (the first N of world_heldout.txt)")
    p.add_argument("--rewrites", type=int, default=16, help="rewrites per prompt (default 16)")
    p.add_argument("--decodes", default="sample,beam", help="eval decodes (default sample,beam)")
    p.add_argument("--grid-prompts", type=int, default=2, help="held-out prompts in the picture grid (0: no pictures)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every train and eval (e.g. model.sft_steps=200)")
    p.add_argument("--out", type=Path, default=Path("runs/claim-mini"),
                   help="runs, evals, logs (default runs/claim-mini)")
    p.add_argument("--docs", type=Path, default=Path("docs"),
                   help="where results-mini.md, results-mini.json and results-mini/*.png go (default docs)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in TRAINED]
    if unknown:
        p.error(f"--methods: unknown {unknown[0]!r}; choose from {', '.join(TRAINED)}")
    for flag in ("ppo_kl", "ppo_lr"):
        try:
            setattr(args, flag, [float(x) for x in getattr(args, flag).split(",") if x.strip()])
        except ValueError:
            p.error(f"--{flag.replace('_', '-')}: expected comma-separated numbers, got {getattr(args, flag)!r}")
    args.decodes = [d.strip() for d in args.decodes.split(",") if d.strip()]
    if not set(args.decodes) <= set(DECODES) or not args.decodes:
        p.error(f"--decodes: choose from {', '.join(DECODES)}, got {args.decodes}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out, args.docs = args.out.resolve(), args.docs.resolve()
    start = time.perf_counter()
    for folder in (args.out / "logs", args.docs / "results-mini"):
        folder.mkdir(parents=True, exist_ok=True)
    runs, sweep = train_all(args)
    evals = {decode: {seed: read_eval(evaluate(f"s{seed}-{decode}", runs[seed], decode, args)) for seed in args.seeds}
             for decode in args.decodes}
    labels = [*FIXED, *args.methods]
    stats = {decode: {label: method_stats(per_seed if label not in FIXED else {args.seeds[0]: per_seed[args.seeds[0]]},
                                          label) for label in labels}
             for decode, per_seed in evals.items()}
    flow = {}
    for method in args.methods:
        found = [d for d in (dormant(runs[seed][method]) for seed in args.seeds) if d]
        if found:
            flow[method] = {k: float(np.mean([d[k] for d in found])) for k in ("first", "last", "max")}
    first = args.decodes[0]
    summary: dict[str, Any] = {
        "command": " ".join(["python bench/claim.py --preset mini", *(sys.argv[1:] if argv is None else argv)]),
        "seconds": round(time.perf_counter() - start, 1), "seeds": args.seeds, "steps": args.steps,
        "prompts": args.prompts, "rewrites": args.rewrites, "ppo_sweep": sweep, "flow_dormant": flow,
        "results": stats,
        "targets": targets(stats[first]) if {"pag", "ppo", *ABLATION_ROWS} <= set(labels) else None,
    }
    if args.grid_prompts:
        render_grid(args.set, evals[first][args.seeds[0]][1], labels[1:], args.grid_prompts, 8,
                    args.docs / "results-mini" / "grid.png")
        histogram_plot(stats[first], labels, args.docs / "results-mini" / "modes.png")
    (args.docs / "results-mini.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_report(summary, labels, args)
    short = {label: {k: round(stats[first][label][k]["mean"], 4)
                     for k in ("reward", "text_diversity", "image_diversity", "modes_pictures", "modes_text")}
             for label in labels}
    print(json.dumps({"decode": first, "seconds": summary["seconds"], "methods": short}))
    return summary
