"""What a person sees at the end of a run: report.md, curves.png, samples.png — and `pag adapt`.

The held-out table samples 4 rewrites for each of 8 prompts from the eval split of the training
sets (never trained on) with the final policy, and scores them with the same RewardWorker code as
training (same renderer, scorers, plain cache). Rendering runs in a Ray task with the reward
workers' GPU request when Ray is up, in-process otherwise.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml

from common.config import Config, read_saved
from common.constants import (BUFFER_SIZE, FLOW_DORMANT, FRESH_FRACTION, FRESH_FRACTION_RUN, FRESH_PER_S, LAG_MAX,
                              LAG_MEAN, LOG_REWARD, LOSS_ENTROPY, LOSS_TOTAL, NS_REWARD, POLICY_DORMANT, REWARD,
                              TEXT_DIVERSITY, meta_key, metric)
from common.images import image_grid
from common.timing import role_times, time_table
from common.trajectory import Trajectory

log = logging.getLogger(__name__)

N_PROMPTS, N_REWRITES = 8, 4
CURVES = [(REWARD, "reward r (fresh)"), (metric(NS_REWARD, "aes_gain"), "aesthetic gain"),
          (TEXT_DIVERSITY, "text diversity"), (LOSS_TOTAL, "FL-DB loss")]


# ---------------------------------------------------------------------- policy side

def load_run_policy(cfg: Config, checkpoint_dir: Path):
    from common.models import build_policy, build_tokenizer

    tok = build_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tok, str(checkpoint_dir / "policy")).eval()
    return tok, policy


def sample_rewrites(cfg: Config, tok, policy, prompts: Sequence[str], n: int, temperature: float, seed: int):
    """n rewrites of each prompt (unscored trajectories, no reference log-probs)."""
    from common.decoding import encode_prompts, sample, to_trajectories
    from common.formats import PolicyFormat

    fmt = PolicyFormat.from_config(cfg)
    repeated = [p for p in prompts for _ in range(n)]
    ids, mask = encode_prompts(tok, repeated, torch.device("cpu"), fmt)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        resp, rmask = sample(policy, ids, mask, cfg.sampler.max_len, cfg.sampler.min_len, temperature,
                             tok.eos_token_id, generator=gen)
    return to_trajectories(tok, repeated, ids, mask, resp, rmask, fmt=fmt)


# ---------------------------------------------------------------------- reward side

def _score_and_render(cfg_dict: dict, redis_url: str, run: str, trajs_blobs: list[bytes], render_texts: list[str]):
    """Scores for each trajectory (or a failure reason) and image 0 of each render text, as uint8 arrays."""
    from actors.reward_worker import RewardWorker
    from common.trajectory import decode

    cfg = Config.model_validate(cfg_dict)
    device = "cuda" if torch.cuda.is_available() and cfg.reward.num_gpus > 0 else "cpu"
    worker = RewardWorker(cfg, redis_url, run, "report", device=device)
    trajs = [decode(b) for b in trajs_blobs]
    scored, failed = worker.score_batch(trajs)
    results = {t.id: t.scores for t in scored}
    results.update({t.id: reason for t, reason in failed})
    rendering = render_texts and worker.renderer is not None  # reward.render=false: no images
    images = worker.renderer(render_texts)[:: worker.renderer.k] if rendering else []  # image 0 of each
    arrays = [(img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8) for img in images]
    worker.close()
    return results, arrays


def score_and_render(cfg: Config, redis_url: str, run: str, trajs, render_texts: list[str]):
    from common.trajectory import encode

    blobs = [encode(t) for t in trajs]
    try:
        import ray

        # a GPU run scores on a GPU node; a CPU run here, with every thread (a Ray task would get one,
        # OMP_NUM_THREADS=1, in a fresh process that imports everything again)
        if ray.is_initialized() and cfg.reward.num_gpus > 0:
            task = ray.remote(num_gpus=cfg.reward.num_gpus, num_cpus=1)(_score_and_render)
            return ray.get(task.remote(cfg.to_dict(), redis_url, run, blobs, render_texts))
    except ImportError:
        pass
    return _score_and_render(cfg.to_dict(), redis_url, run, blobs, render_texts)


# ---------------------------------------------------------------------- pictures

def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES):
        pts = [(m["step"], m[key]) for m in history if key in m and math.isfinite(m[key])]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, lw=0.8, alpha=0.5)
            if len(y) >= 5:
                w = max(2, len(y) // 10)
                smooth = np.convolve(y, np.ones(w) / w, mode="valid")
                ax.plot(x[w - 1:], smooth, lw=1.8)
        ax.set_title(title)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- report

def run_times(redis_url: str, run: str) -> dict[str, dict[str, float]]:
    """Seconds per role and phase from the run's meta hash (common/timing.py); {} when Redis cannot say."""
    from buffer.connection import connect

    try:
        client = connect(redis_url)
        try:
            meta = client.hgetall(meta_key(run))
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 — a report without this table beats no report
        log.warning("report: no phase times (%s)", exc)
        return {}
    return role_times({k.decode(): v.decode() for k, v in meta.items()})


def _window_mean(history: list[dict[str, float]], key: str, first: bool) -> float:
    values = [m[key] for m in history if key in m and math.isfinite(m[key])]
    if not values:
        return float("nan")
    k = max(1, len(values) // 10)
    return float(np.mean(values[:k] if first else values[-k:]))


def reward_columns(cfg: Config) -> list[str]:
    """The reward components a person reads beside the reward: the paper's, or the offline text reward's."""
    return ["aes_gain", "clip"] if cfg.reward.render else ["style_gain", "text_cos"]


def _balance_line(cfg: Config, history: list[dict[str, float]]) -> str:
    """The realised online/replay balance over the whole run (the last step's run-long counter)."""
    runs = [m[FRESH_FRACTION_RUN] for m in history if FRESH_FRACTION_RUN in m]
    lags = [m[LAG_MAX] for m in history if LAG_MAX in m]
    target = 1 - cfg.learner.replay_ratio
    realised = f"{runs[-1]:.3f}" if runs and math.isfinite(runs[-1]) else "n/a"
    lag = f"{max(lags):.0f}" if lags else "n/a"
    return (f"Realised fresh fraction **{realised}** (target {target:.2f}, `learner.fresh_policy="
            f"{cfg.learner.fresh_policy}`); largest policy lag {lag} steps (`sampler.max_lag_steps="
            f"{cfg.sampler.max_lag_steps}`).")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report_prompts(cfg: Config) -> list[str]:
    """Up to N_PROMPTS held-out plain prompts: the eval split of sampler.datasets (plain sets first), or, when
    those were split beforehand (the world's train file has no eval part), eval.datasets."""
    from common.data import ENGINEERED_SETS, load_prompts

    held_out: list[str] = []
    plain_first = sorted(cfg.sampler.datasets, key=lambda name: str(name) in ENGINEERED_SETS)
    for name in plain_first:
        held_out += [p for p in load_prompts(name, split="eval").prompts if p not in held_out]
    if not held_out:
        for name in cfg.eval.datasets:
            held_out += [p for p in load_prompts(name).prompts if p not in held_out]
    if not held_out:
        raise ValueError(f"no held-out prompts for the report: sampler.datasets {cfg.sampler.datasets} have no eval "
                         f"split and eval.datasets {cfg.eval.datasets} are empty")
    return held_out[:N_PROMPTS]


def write_report(cfg: Config, run_dir: Path, history: list[dict[str, float]], redis_url: str,
                 sft: Optional[str]) -> Path:
    from common.runs import latest_checkpoint
    from driver.runfiles import redacted_config

    run_dir = Path(run_dir)
    if not history and (run_dir / "metrics.jsonl").exists():
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    plot_curves(history, run_dir / "curves.png")

    held_out = report_prompts(cfg)
    ckpt = latest_checkpoint(run_dir)
    tok, policy = load_run_policy(cfg, ckpt)
    trajs = sample_rewrites(cfg, tok, policy, held_out, N_REWRITES, cfg.sampler.temp_end, cfg.run.seed)
    render = list(held_out) + [t.response for t in trajs]
    scores, images = score_and_render(cfg, redis_url, cfg.run.name, trajs, render)

    parts = reward_columns(cfg)
    reward_keys = ["aes", "aes_gain", "clip"] if cfg.reward.render else ["style", "style_gain", "text_cos", "rel_text"]
    keys = [LOSS_TOTAL, REWARD, *(metric(NS_REWARD, k) for k in reward_keys), LOG_REWARD, TEXT_DIVERSITY,
            LOSS_ENTROPY, FLOW_DORMANT, POLICY_DORMANT, LAG_MEAN, LAG_MAX, FRESH_FRACTION, BUFFER_SIZE, FRESH_PER_S]
    lines = [f"# Run `{cfg.run.name}`", "",
             f"Preset `{cfg.preset}`, {len(history)} learner steps recorded, checkpoint `{ckpt}`, "
             f"starting policy `{sft}`.", "", _balance_line(cfg, history), "", "![curves](curves.png)", "",
             "## Metrics (mean of the first and last 10 % of steps)", "", "| metric | first 10 % | last 10 % |",
             "|---|---|---|"]
    for key in keys:
        lines.append(f"| {key} | {_window_mean(history, key, True):.4g} | {_window_mean(history, key, False):.4g} |")
    lines += ["", "## Where the time went (every process of each role, the whole run)", "",
              *time_table(run_times(redis_url, cfg.run.name))]
    lines += ["", f"## Held-out prompts: {N_REWRITES} sampled rewrites each (T = {cfg.sampler.temp_end})", "",
              f"| plain prompt | rewrite | reward | {' | '.join(p.replace('_', ' ') for p in parts)} |",
              "|---|---|---|---|---|"]
    for t in trajs:
        s = scores.get(t.id)
        if isinstance(s, dict):
            cells = " | ".join(f"{s[p]:.3f}" if p in s else "" for p in parts)
            lines.append(f"| {_md(t.prompt)} | {_md(t.response)} | {s['reward']:.3f} | {cells} |")
        else:
            lines.append(f"| {_md(t.prompt)} | {_md(t.response)} | failed: {_md(str(s))} | | |")
    lines += ["", "![samples](samples.png)" if images else "(reward.render=false: no images)", "", "## Resolved config", "", "```yaml",
              yaml.safe_dump(redacted_config(cfg), sort_keys=False).rstrip(), "```", ""]
    (run_dir / "report.md").write_text("\n".join(lines))

    rows = []
    for i, prompt in enumerate(held_out if images else []):
        rewrites = images[len(held_out) + i * N_REWRITES: len(held_out) + (i + 1) * N_REWRITES]
        rows.append((prompt, [images[i]] + rewrites))
    if rows:
        image_grid(rows, run_dir / "samples.png")
    log.info("report: %s", run_dir / "report.md")
    return run_dir / "report.md"


# ---------------------------------------------------------------------- pag adapt

def adapt(prompt: str, path: Path, n: int = 8, temperature: float = 1.0, seed: int = 0,
          score: bool = True, decode: str = "sample") -> list[str]:
    """n rewrites of `prompt` from a run's checkpoint, decoded as `pag eval` and `pag serve` do (common/rewriting.py:
    `sample` seeded by (seed, prompt), or diverse beam search); scored lines "[r=… parts] text", best first."""
    from common.formats import PolicyFormat
    from common.redis_server import RedisServer
    from common.rewriting import Decoding, PromptRewriter
    from common.runs import resolve_checkpoint

    try:
        run_dir, ckpt = resolve_checkpoint(Path(path))
    except ValueError as exc:
        raise SystemExit(f"pag adapt: {exc}") from exc
    cfg = Config.model_validate(read_saved(run_dir / "config.yaml"))
    tok, policy = load_run_policy(cfg, ckpt)
    fmt = PolicyFormat.from_config(cfg)
    decoding = Decoding.from_eval(cfg.eval, decode=decode, temperature=temperature, seed=seed)
    texts = PromptRewriter(policy, tok, fmt).rewrite([prompt], n, decoding)[0]
    if not score:
        return texts
    prompt_ids = tok(fmt.policy_input(prompt))["input_ids"]
    trajs = []
    for text in texts:  # what the reward worker reads: the prompt and the rewrite text
        ids = tok(text)["input_ids"]
        trajs.append(Trajectory(prompt=prompt, response=text, prompt_ids=prompt_ids, response_ids=ids,
                                ref_logprobs=[0.0] * len(ids)))
    with tempfile.TemporaryDirectory() as tmp, RedisServer(tmp) as server:
        results, _ = score_and_render(cfg, server.url, "adapt", trajs, [])
    lines = []
    for t in sorted(trajs, key=lambda t: -(results[t.id]["reward"] if isinstance(results[t.id], dict) else -1e9)):
        s: Any = results[t.id]
        parts = " ".join(f"{k}={s[k]:+.3f}" for k in reward_columns(cfg) if k in s) if isinstance(s, dict) else ""
        head = f"[r={s['reward']:+.3f} {parts}]" if isinstance(s, dict) else f"[failed: {s}]"
        lines.append(f"{head} {t.response}")
    return lines
