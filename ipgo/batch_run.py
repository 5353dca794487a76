"""`pag ipgo --mode prompt-batch`: one token set trained on a prompt set, then applied to held-out prompts.

The split is by a hash of the prompt text (`ipgo.heldout_fraction`, common/data.py's `in_eval_split`), so
a prompt is held out the same way on every run. Training is one job (a Ray task holding `ipgo.num_gpus`
GPUs, or this process). It saves its state after every epoch (batch/trainer.safetensors + .json), so a
rerun continues an interrupted training; a finished one (batch/result.json) is not repeated, and held-out
prompts already scored are skipped.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ipgo.jobs import RESULT_SCHEMA, append_result, write_json, finished, heldout_job, models_for, save_tokens, slug

log = logging.getLogger(__name__)


def split(prompts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by the prompt-text hash."""
    from common.data import in_eval_split

    held = [p for p in prompts if in_eval_split(p, fraction)]
    return [p for p in prompts if p not in set(held)], held


def train_job(cfg_dict: dict[str, Any], prompts: list[str], out: str) -> dict[str, Any]:
    """Train prompt-batch tokens on `prompts`; writes tokens.safetensors, curve.json, result.json under `out`."""
    from common.config import Config
    from ipgo.optimize import optimize_batch

    cfg = Config.model_validate(cfg_dict)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    result = optimize_batch(models_for(cfg), prompts, state=path / "trainer")  # resumes after the last epoch saved
    save_tokens(result.tokens, path / "tokens.safetensors",
                {"mode": "prompt-batch", "layout": cfg.ipgo.layout, "config_hash": cfg.hash(),
                 "train_prompts": str(len(prompts))})
    write_json(path / "curve.json", {"epoch_reward": result.epoch_reward, "reward": result.curve})
    line = {"schema": RESULT_SCHEMA, "train_prompts": len(prompts), "epochs": len(result.epoch_reward),
            "optimizer_steps": result.steps, "seconds": result.seconds,
            "peak_memory_bytes": result.peak_memory_bytes, "epoch_reward": result.epoch_reward}
    write_json(path / "result.json", line)
    return line


def run_batch(cfg, prompts: list[str], run_dir: Path, use_ray: bool = True) -> list[dict[str, Any]]:
    """Train (unless finished) and apply to the held-out prompts; returns the held-out result lines."""
    from tqdm import tqdm

    from common.cluster import init_ray

    train, held = split(prompts, cfg.ipgo.heldout_fraction)
    if not train:
        raise ValueError(f"prompt-batch: all {len(prompts)} prompt(s) fall in the held-out split "
                         f"(ipgo.heldout_fraction = {cfg.ipgo.heldout_fraction}); give more prompts or a smaller fraction")
    if not held:
        log.warning("prompt-batch: no prompt of %d falls in the held-out split (ipgo.heldout_fraction = %s): "
                    "the tokens are trained but applied to nothing", len(prompts), cfg.ipgo.heldout_fraction)
    batch_dir = run_dir / "batch"
    cfg_dict = cfg.to_dict()
    if (batch_dir / "result.json").is_file():
        log.info("prompt-batch training already finished in %s: applying its tokens", batch_dir)
    elif use_ray:
        import ray

        init_ray(cfg.run.ray_address)
        task = ray.remote(num_gpus=cfg.ipgo.num_gpus, max_retries=1)(train_job)
        ray.get(task.remote(cfg_dict, train, str(batch_dir)))
    else:
        train_job(cfg_dict, train, str(batch_dir))
    summary = json.loads((batch_dir / "result.json").read_text())
    log.info("prompt-batch: %d training prompts, reward per epoch %s", len(train),
             ", ".join(f"{r:.4f}" for r in summary["epoch_reward"]))
    done = finished(run_dir)
    tokens = str(batch_dir / "tokens.safetensors")
    for i, prompt in enumerate(tqdm(held, desc="ipgo held-out", unit="prompt")):
        key = slug(i, prompt)
        if key in done:
            continue
        line = heldout_job(cfg_dict, i, prompt, str(run_dir / "prompts" / key), tokens)
        append_result(run_dir, line)
    by_dir = finished(run_dir)
    return [by_dir[slug(i, p)] for i, p in enumerate(held) if slug(i, p) in by_dir]
