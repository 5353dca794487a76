"""The eval's numbers, as pure functions (tested in tests/test_eval_metrics.py).

Per prompt x with rewrites y_1..y_n, each rendered k times from the same noise as x:

    aes_gain(y) = mean_i aes(img_i(y)) − mean_i aes(img_i(x))
    rel(y)      = mean_i 20 · min(0, max(0, cos(img_i(y), text_x)) − 0.28)      (scoring.reward.relevance)
    reward(y)   = aes_gain(y) + rel(y);      the prompt's value: the mean over its n rewrites
    text diversity  = 1 − mean off-diagonal cosine of the n rewrites' sentence embeddings
    image diversity = 1 − mean off-diagonal cosine of the n·k images' CLIP image embeddings

then mean ± 95 % CI over prompts (normal approximation: 1.96 · sd / √N). A set of one element
(a method that writes one rewrite) has no pairs: its diversity is reported as 0, not undefined.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from scoring.reward import relevance

Z95 = 1.959963984540054


def diversity(embeddings: np.ndarray) -> float:
    """1 − mean off-diagonal cosine similarity of the rows (normalised here); 0 for fewer than 2 rows."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be (n, D), got shape {e.shape}")
    n = e.shape[0]
    if n < 2:
        return 0.0
    e = e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
    sim = e @ e.T
    off = (sim.sum() - np.trace(sim)) / (n * (n - 1))
    return float(1.0 - off)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % CI) over finite values; half-width 0 for one value, NaN for none."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(Z95 * v.std(ddof=1) / math.sqrt(v.size))


def rewrite_scores(plain: dict[str, Any], rewrite: dict[str, Any], threshold: float, weight: float,
                   metric: str = "aesthetic") -> dict[str, float]:
    """One rewrite's aes, aes_gain, clip, rel, reward (+ each extra scorer's mean and its gain over the baseline's
    images) from the two cached records. `metric` (eval.reward_metric) is the reward's image term: the aesthetic
    gain, or `imagereward`: ImageReward's gain (NaN when either record lacks the score)."""
    aes = float(np.mean(rewrite["aes"]))
    rel = float(relevance(torch.tensor(rewrite["clip"], dtype=torch.float64), threshold, weight))
    out = {"aes": aes, "aes_gain": aes - float(np.mean(plain["aes"])), "clip": float(np.mean(rewrite["clip"])),
           "rel": rel}
    out["reward"] = out["aes_gain"] + rel
    plain_extra = plain.get("extra") or {}
    for name, v in (rewrite.get("extra") or {}).items():
        out[name] = float(np.mean(v))
        if name in plain_extra:  # the official report: the gain over the baseline's images (eval.py:193-212)
            out[f"{name}_gain"] = out[name] - float(np.mean(plain_extra[name]))
    if metric == "imagereward":  # the official eval.py --reward_metric imagereward (eval.py:166-169, 193-212)
        out["reward"] = out.get("imagereward_gain", float("nan")) + rel
    return out


def prompt_metrics(per_rewrite: list[dict[str, float]], text_emb: np.ndarray, image_emb: np.ndarray,
                   inception: Optional[np.ndarray] = None) -> dict[str, float]:
    """A prompt's row: the mean over its rewrites of every score, and its text and image diversity.
    `image_emb` (n·k, D): every image of every rewrite; `inception` (n·k, 2048), when given: the official
    `image_similarity_inception`, the mean pairwise cosine *similarity* (eval/inception.py)."""
    if not per_rewrite:
        raise ValueError("a prompt with no scored rewrite has no metrics")
    out = {name: float(np.mean([r[name] for r in per_rewrite])) for name in per_rewrite[0]}
    out["text_diversity"] = diversity(text_emb)
    out["image_diversity"] = diversity(image_emb)
    if inception is not None and len(inception) > 1:
        out["image_similarity_inception"] = 1.0 - diversity(inception)
    return out


def summarize(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: mean, ci95 (half-width) and n over the prompts' rows with a finite value (a NaN row,
    e.g. a prompt whose renders all failed, is left out of n as it is of the mean)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    out = {}
    for name in names:
        values = [row[name] for row in rows if name in row and math.isfinite(row[name])]
        mean, half = mean_ci(values)
        out[name] = {"mean": mean, "ci95": half, "n": len(values)}
    return out
