"""`pag eval`: every method on the paper's prompt sets, one command (registered by pag/cli.py).

    pag eval --methods plain,rule,sft,pag:runs/<name> --limit 8 --rewrites 4 --decode sample
    pag eval --preset sd14 --methods plain,sft,pag:runs/a,tb:runs/b --workers 8 --ray-address auto

Writes runs/eval-<name>/ (report.md, results.json, rewrites.jsonl, scatter.png, grid_<set>.png).
Results are cached (eval.cache): re-running the same command, or after Ctrl-C, renders only what is
missing; adding a method renders only its rewrites.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

from common.presets import PRESET_HELP, default_preset

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate methods (plain, rule, sft, trained runs, promptist) with the paper's protocol",
        description="Rewrite the paper's prompt sets with every method, render each text with Stable Diffusion "
                    "(fixed noise per image index), score aesthetic gain, relevance, text and image diversity, and "
                    "write report.md / results.json / rewrites.jsonl / scatter.png / grid_<set>.png into "
                    "runs/eval-<name>/.",
        epilog="Methods: plain, rule (fixed suffix eval.rule_suffix), sft (the reference policy; sft:DIR for another), "
               "LABEL:RUN_DIR for a trained run or checkpoint (pag:runs/a, tb:runs/b, ppo:runs/c), promptist:DIR "
               "(a local copy of microsoft/Promptist). Every protocol setting is an `eval.` config key "
               "(`pag config --list`).")
    p.add_argument("--methods", required=True, help="comma-separated, e.g. plain,rule,sft,pag:runs/a")
    p.add_argument("--preset", help="the preset of the trained runs in --methods (from their config.yaml; runs of "
                                     "different presets are refused), else " + PRESET_HELP.replace("default: ", ""))
    p.add_argument("--config", dest="config_file", help="YAML file with config sections (eval, model, reward, …)")
    p.add_argument("--datasets", help="comma-separated prompt sets or .jsonl/.txt files (eval.datasets)")
    p.add_argument("--limit", type=int, help="first N prompts per set (eval.limit)")
    p.add_argument("--rewrites", type=int, help="rewrites per prompt (eval.rewrites, default 16)")
    p.add_argument("--decode", choices=["beam", "sample"], help="diverse beam search (default) or i.i.d. samples")
    p.add_argument("--temperature", type=float, help="sampling temperature for --decode sample")
    p.add_argument("--workers", type=int, help="render/score actors (default: one per cluster GPU, else 1 in-process)")
    p.add_argument("--target-model", metavar="ID_OR_DIR",
                   help="render with another diffusers text-to-image pipeline than the policies were trained with "
                        "(model.sd): a hub id or a saved directory of SD v1.x, SDXL or SD3 -- the paper's zero-shot "
                        "transfer (e.g. stabilityai/stable-diffusion-3-medium-diffusers); scoring is unchanged")
    p.add_argument("--scorers", help="extra scorers, e.g. imagereward,hps (eval.scorers)")
    p.add_argument("--score-against", choices=["plain", "rewrite"], help="what the extra scorers judge against")
    p.add_argument("--reward-metric", choices=["aesthetic", "imagereward"],
                   help="the reward column's image term (eval.reward_metric): the aesthetic gain (default), or "
                        "ImageReward's gain as the official eval.py --reward_metric imagereward "
                        "(with --scorers imagereward)")
    p.add_argument("--name", help="output runs/eval-<name>/ (default: <preset>__<time>); reuse it to resume")
    p.add_argument("--runs-dir", help="where eval-<name>/ goes (run.runs_dir)")
    p.add_argument("--ray-address", help="Ray cluster to fan out on (run.ray_address; 'auto' for the current one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.images.seed=42")
    p.set_defaults(func=cmd_eval)


def _flag_overrides(args) -> list[str]:
    def listed(text):
        return None if text is None else "[" + ",".join(x.strip() for x in text.split(",") if x.strip()) + "]"

    pairs = [("eval.datasets", listed(args.datasets)), ("eval.limit", args.limit), ("eval.rewrites", args.rewrites),
             ("eval.decode", args.decode), ("eval.temperature", args.temperature), ("eval.workers", args.workers),
             ("eval.scorers", listed(args.scorers)), ("eval.score_against", args.score_against),
             ("eval.reward_metric", args.reward_metric),
             ("run.runs_dir", args.runs_dir), ("run.ray_address", args.ray_address), ("model.sd", args.target_model)]
    return [f"{k}={v}" for k, v in pairs if v is not None]


def check_scorers(names: list[str]) -> None:
    """Unknown scorer or missing package → ConfigError (exit 2) before anything loads."""
    import importlib.util

    from scoring.scorers import SCORERS
    from common.config import ConfigError

    # scorer: (module it imports, pip package, pag extra)
    packages = {"imagereward": ("ImageReward", "image-reward", "imagereward"),
                "imagereward-package": ("ImageReward", "image-reward", "imagereward"), "hps": ("hpsv2", "hpsv2", "hps")}
    for name in names:
        if name not in SCORERS:
            raise ConfigError(f"eval.scorers: unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
        if name in packages and importlib.util.find_spec(packages[name][0]) is None:
            module, package, extra = packages[name]
            raise ConfigError(f"eval.scorers: {name!r} needs the pip package {package!r} (import {module}), which is "
                              f"not installed: `pip install {package}` (or `pip install 'pag[{extra}]'`)")


def _start_ray(cfg) -> bool:
    """Ray when asked for (an address, or more than one worker); returns whether this call started it."""
    if not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or (cfg.eval.workers or 1) > 1):
        return False
    from common.cluster import init_ray

    return init_ray(cfg.run.ray_address, log_to_driver=False)


def eval_preset(asked: Optional[str], specs) -> str:
    """The preset to evaluate with: the trained runs' own (their saved config.yaml), which must agree with
    each other and with --preset when both are given; else --preset, $PAG_PRESET, the default."""
    from common.config import ConfigError, read_saved

    found = {}
    for spec in specs:
        saved = Path(spec.run_dir) / "config.yaml" if spec.run_dir else None
        if saved is not None and saved.is_file():
            found[spec.raw or spec.label] = read_saved(saved).get("preset")
    presets = sorted({p for p in found.values() if p})
    if len(presets) > 1 or (asked and presets and presets != [asked]):
        given = ", ".join(f"{entry} ({preset})" for entry, preset in found.items())
        raise ConfigError(f"--methods mixes presets: {given}" + (f" and --preset {asked}" if asked else "")
                          + "; a policy is only comparable on the models it was trained with: evaluate each "
                            "preset's runs on their own (drop --preset to take it from the runs)")
    return presets[0] if presets else asked or default_preset()


def cmd_eval(args) -> int:
    from common.config import load_config
    from common.models import ModelLoadError
    from eval.report import write_report
    from eval.runner import run_eval
    from eval.spec import parse_methods

    specs = parse_methods(args.methods)
    cfg = load_config(eval_preset(args.preset, specs), args.config_file, list(args.overrides) + _flag_overrides(args))
    check_scorers(cfg.eval.scorers)
    cfg.run.name = f"eval-{args.name or f'{cfg.preset}__{datetime.now():%Y%m%d-%H%M%S}'}"
    out_dir = Path(cfg.run.runs_dir) / cfg.run.name
    started = _start_ray(cfg)
    try:
        data = run_eval(cfg, specs, out_dir, progress=not args.no_progress, log_fn=print)
        report = write_report(data, out_dir)
    except ModelLoadError as exc:
        print(f"pag eval: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"pag eval: wrote {report} (results.json, rewrites.jsonl, scatter.png, grids) in {out_dir}")
    return 0
