"""IPGO jobs and their outputs: one prompt-wise job per prompt (a Ray task with `ipgo.num_gpus` GPUs, or
in-process), the prompt-batch job, and the files they leave behind.

A run directory holds

    config.yaml                 the resolved config
    results.jsonl               one line per finished prompt: initial / best reward, cost (schema below)
    prompts/<i>_<slug>/         tokens.safetensors (prefix, suffix), best.png, initial.png, curve.json, result.json
    batch/                      prompt-batch only: tokens.safetensors, curve.json (per-epoch and per-prompt reward)

`result.json` is written last, atomically: a prompt directory without it is unfinished, and a rerun with
the same run name skips every prompt that has one (resume after an interrupt).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ipgo.optimize import (IpgoModels, PromptResult, Tokens, build_models, heldout_seeds, mean_reward,
                           optimize_prompt, render)

#: version of the results.jsonl / result.json line
RESULT_SCHEMA = 1
_MODELS: dict[str, IpgoModels] = {}  # per process: a Ray worker reuses its models across tasks


def slug(index: int, prompt: str) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
    return f"{index:04d}_{text}"


def append_result(run_dir: Path, line: dict[str, Any]) -> None:
    """One finished prompt's line in the run's results.jsonl."""
    with (run_dir / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def save_image(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def save_tokens(tokens: Tokens, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tokens.items()}, str(path), metadata=metadata)


def load_tokens(path: str | Path) -> Tokens:
    """{"prefix": (P, d), "suffix": (S, d)} from a tokens.safetensors file."""
    from safetensors.torch import load_file

    tokens = load_file(str(path))
    if set(tokens) != {"prefix", "suffix"}:
        raise ValueError(f"{path}: expected tensors 'prefix' and 'suffix' (an IPGO tokens file), found {sorted(tokens)}")
    return tokens


def models_for(cfg) -> IpgoModels:
    """This process's models for a config (built once, reused by later tasks in the same worker)."""
    from common.models import resolve_device

    key = cfg.hash() + json.dumps(cfg.ipgo.model_dump(mode="json"), sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = build_models(cfg, resolve_device(cfg.run.device))
    return _MODELS[key]


def write_prompt_result(out: Path, index: int, result: PromptResult, cfg) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"prompt": result.prompt, "layout": cfg.ipgo.layout, "config_hash": cfg.hash(),
            "best_iteration": str(result.best_iteration)}
    save_tokens(result.tokens, out / "tokens.safetensors", meta)
    save_image(result.best_image, out / "best.png")
    save_image(result.initial_image, out / "initial.png")
    write_json(out / "curve.json", {"reward": result.curve, "conformity": result.conformity})
    line = {"schema": RESULT_SCHEMA, "index": index, "prompt": result.prompt, "initial_reward": result.initial_reward,
            "best_reward": result.best_reward, "best_iteration": result.best_iteration,
            "iterations": len(result.curve), "seconds": result.seconds,
            "seconds_per_iteration": result.seconds / max(1, len(result.curve)),
            "peak_memory_bytes": result.peak_memory_bytes, "truncated": result.truncated, "dir": out.name}
    write_json(out / "result.json", line)
    return line


def prompt_job(cfg_dict: dict[str, Any], index: int, prompt: str, out: str) -> dict[str, Any]:
    """One prompt-wise IPGO run, outputs written under `out`; returns its results.jsonl line.
    Plain function: called in-process or as a Ray task (the config travels as a plain dict)."""
    from common.config import Config

    cfg = Config.model_validate(cfg_dict)
    result = optimize_prompt(models_for(cfg), prompt)
    return write_prompt_result(Path(out), index, result, cfg)


def finished(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Prompt directory name → its result line, for every finished prompt of a run."""
    done = {}
    for path in sorted((run_dir / "prompts").glob("*/result.json")):
        try:
            done[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # an unreadable result counts as unfinished: the prompt runs again
    return done


def heldout_job(cfg_dict: dict[str, Any], index: int, prompt: str, out: str, tokens_path: str,
                seed: Optional[int] = None) -> dict[str, Any]:
    """Apply prompt-batch tokens to a (held-out) prompt: its reward with and without the tokens, on the training
    noise and (mean over `ipgo.heldout_seeds` seeds) on held-out noise."""
    from common.config import Config

    cfg = Config.model_validate(cfg_dict)
    models = models_for(cfg)
    tokens = load_tokens(tokens_path)
    plain_image, plain = render(models, prompt, None, seed)
    image, scores = render(models, prompt, tokens, seed)
    seeds = heldout_seeds(cfg.eval.images.seed, cfg.ipgo.heldout_seeds, cfg.ipgo.seed)  # neither prompt nor noise seen
    held: dict[str, Any] = {"heldout_seeds": seeds}
    if seeds:
        held["heldout_seed_initial_reward"] = mean_reward(models, prompt, None, seeds)
        held["heldout_seed_best_reward"] = mean_reward(models, prompt, tokens, seeds)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    save_image(image, path / "best.png")
    save_image(plain_image, path / "initial.png")
    line = {"schema": RESULT_SCHEMA, "index": index, "prompt": prompt, "initial_reward": plain["reward"],
            "best_reward": scores["reward"], "heldout": True, "dir": path.name,
            "truncated": models.encoder.encode(prompt).truncated, **held}
    write_json(path / "result.json", line)
    return line
