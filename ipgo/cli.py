"""`pag ipgo`: learn injected tokens for prompts (prompt-wise) or for a prompt set (prompt-batch).

    pag ipgo "a red car" "a cat on a sofa"                     # prompt-wise, one Ray task per prompt
    pag ipgo --dataset coco_all --limit 64 --reward hps        # prompt-wise over a dataset
    pag ipgo --dataset coco_all --mode prompt-batch            # one token set; applied to the held-out prompts

Outputs under runs/<name>/ (ipgo/jobs.py): per prompt tokens.safetensors, best.png, initial.png, curve.json;
results.jsonl with the initial and best reward of each prompt. Rerunning with the same --run-name resumes:
finished prompts (and a finished prompt-batch training) are skipped.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from common.presets import PRESET_HELP, default_preset

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("ipgo", help="IPGO: optimise injected prompt tokens by reward gradients through SD",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="*", help="plain prompts (or give --dataset); key=value config overrides may follow")
    p.add_argument("--dataset", help="a packaged prompt set (`pag datasets`) or a .txt/.jsonl file")
    p.add_argument("--limit", type=int, help="first N prompts of the dataset")
    p.add_argument("--mode", choices=["prompt-wise", "prompt-batch"], default="prompt-wise")
    p.add_argument("--reward", help="comma-separated differentiable scorers (ipgo.reward): aesthetic, clip, hps")
    p.add_argument("--iterations", type=int, help="prompt-wise iterations (ipgo.iterations)")
    p.add_argument("--epochs", type=int, help="prompt-batch epochs (ipgo.epochs)")
    p.add_argument("--preset", default=default_preset(), help=PRESET_HELP)
    p.add_argument("--config", dest="config_file", help="YAML file layered over the preset")
    p.add_argument("--run-name", help="run directory name (default ipgo__{preset}__{seed}__{time}); reuse it to resume")
    p.add_argument("--runs-dir", help="where run directories go (run.runs_dir)")
    p.add_argument("--no-ray", action="store_true", help="run the prompts one after another in this process")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run)


def _split_args(args) -> tuple[list[str], list[str]]:
    """Positional words with '=' before any space are config overrides; the rest are prompts."""
    overrides = [a for a in args.prompts if "=" in a.split(" ")[0] and "." in a.split("=")[0]]
    prompts = [a for a in args.prompts if a not in overrides]
    return prompts, overrides


def _config(args, overrides: list[str]):
    from common.config import load_config

    extra = [f"{key}={value}" for key, value in (
        ("ipgo.iterations", args.iterations), ("ipgo.epochs", args.epochs), ("run.runs_dir", args.runs_dir),
        ("run.ray_address", args.ray_address),
        ("ipgo.reward", f"[{args.reward}]" if args.reward else None)) if value is not None]
    return load_config(args.preset, args.config_file, [*extra, *overrides])


def _prompts(args, positional: list[str]) -> list[str]:
    from common.config import ConfigError
    from common.data import load_prompts

    if bool(positional) == bool(args.dataset):
        raise ConfigError("give prompts or --dataset (exactly one of them)")
    prompts = positional if positional else load_prompts(args.dataset).prompts
    return list(prompts[:args.limit] if args.limit is not None else prompts)


def run(args) -> int:
    from common.config import ConfigError

    positional, overrides = _split_args(args)
    cfg = _config(args, overrides)
    prompts = _prompts(args, positional)
    name = args.run_name or f"ipgo__{cfg.preset}__{cfg.ipgo.seed}__{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.run.runs_dir) / name
    saved = run_dir / "config.yaml"
    if saved.is_file():
        import yaml

        before = yaml.safe_load(saved.read_text())
        if before.get("ipgo") != cfg.to_dict()["ipgo"] or before.get("model") != cfg.to_dict()["model"]:
            raise ConfigError(f"{saved}: this run was made with another model/ipgo config; use a new --run-name "
                              "or the same settings to resume")
    cfg.save(saved)
    if args.mode == "prompt-batch":
        from ipgo.batch_run import run_batch

        lines = run_batch(cfg, prompts, run_dir, use_ray=not args.no_ray)
    else:
        lines = run_prompt_wise(cfg, prompts, run_dir, use_ray=not args.no_ray)
    _summary(lines, run_dir)
    return 0


def _summary(lines: list[dict[str, Any]], run_dir: Path) -> None:
    if not lines:
        print(f"no prompts run; outputs in {run_dir}")
        return
    gain = sum(line["best_reward"] - line["initial_reward"] for line in lines) / len(lines)
    print(f"{len(lines)} prompt(s): mean reward gain {gain:+.4f}; results in {run_dir / 'results.jsonl'}")


def run_prompt_wise(cfg, prompts: list[str], run_dir: Path, use_ray: bool = True) -> list[dict[str, Any]]:
    """Every prompt not yet finished in `run_dir`, as Ray tasks (one per prompt, `ipgo.num_gpus` GPUs each)
    or in this process; results.jsonl gets a line per prompt as it finishes. Returns all lines, in order."""
    from tqdm import tqdm

    from common.cluster import init_ray
    from ipgo.jobs import append_result, finished, prompt_job, slug

    run_dir.mkdir(parents=True, exist_ok=True)
    done = finished(run_dir)
    logged = set()
    if (run_dir / "results.jsonl").is_file():
        logged = {json.loads(l)["dir"] for l in (run_dir / "results.jsonl").read_text().splitlines() if l.strip()}
    for key, line in done.items():  # finished after the last line was written (interrupted in between)
        if key not in logged:
            append_result(run_dir, line)
    todo = [(i, p) for i, p in enumerate(prompts) if slug(i, p) not in done]
    if len(todo) < len(prompts):
        log.info("resuming: %d of %d prompt(s) already finished in %s", len(prompts) - len(todo), len(prompts), run_dir)
    cfg_dict = cfg.to_dict()
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="ipgo", unit="prompt")
    if use_ray and todo:
        import ray

        init_ray(cfg.run.ray_address)
        task = ray.remote(num_gpus=cfg.ipgo.num_gpus, max_retries=1)(prompt_job)
        pending = [task.remote(cfg_dict, i, p, str(run_dir / "prompts" / slug(i, p))) for i, p in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            line = ray.get(ready[0])
            append_result(run_dir, line)
            bar.update(1)
            bar.set_postfix(gain=f"{line['best_reward'] - line['initial_reward']:+.3f}")
    else:
        for i, p in todo:
            line = prompt_job(cfg_dict, i, p, str(run_dir / "prompts" / slug(i, p)))
            append_result(run_dir, line)
            bar.update(1)
            bar.set_postfix(gain=f"{line['best_reward'] - line['initial_reward']:+.3f}")
    bar.close()
    by_dir = finished(run_dir)
    return [by_dir[slug(i, p)] for i, p in enumerate(prompts) if slug(i, p) in by_dir]
