"""An offline text reward on real sentence embeddings (issue 13, preset `tiny-proxy`): no images needed.

style           a logistic regression on L2-normalised sentence embeddings (the packaged all-MiniLM-L6-v2)
                telling engineered prompts (label 1: `ENGINEERED_SETS`) from plain captions (label 0:
                `PLAIN_SETS`), fitted on the TRAIN split of those sets (common/data.py's hash split),
                classes weighted equally, L2 penalty `L2`. score = its logit; the reward uses
                style_gain = style(rewrite) − style(plain).
relevance_text  cos(emb(plain), emb(rewrite)), hinged like the paper's CLIP term:
                rel_text = w · min(0, cos − c)  (reward.text_weight w = 20, reward.text_threshold c = 0.45),
                so a rewrite that drops the subject is penalised.

The threshold is calibrated on the data with `python bench/text_reward.py` (JSON): cosines of matched
(plain, engineered) SFT pairs against mismatched ones (each plain with another pair's engineered
prompt); c sits between the matched pairs' 5th and the mismatched pairs' 99th percentile (the numbers
are in docs/benchmarks.md).

The fit takes seconds (embedding ~1.6k prompts) and is cached as safetensors + JSON under
``$PAG_CACHE/style/<hash>`` (default ``~/.cache/pag``), the hash covering `STYLE_VERSION`, the encoder,
the exact training texts and labels and the penalty; the JSON records the held-out (EVAL split)
accuracy.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from common.data import ENGINEERED_SETS, PLAIN_SETS, cache_root, load_prompts

log = logging.getLogger(__name__)

#: bump when the data rule or the fit changes meaning: it is part of the cache key
STYLE_VERSION = 1
L2 = 1e-3
#: calibrated with bench/text_reward.py (docs/benchmarks.md)
TEXT_THRESHOLD = 0.45
TEXT_WEIGHT = 20.0

Encode = Callable[[Sequence[str]], np.ndarray]


def style_data(split: str) -> tuple[list[str], np.ndarray]:
    """(texts, labels 1 = engineered / 0 = plain) of one split; a text in both kinds is dropped."""
    kinds: dict[str, set[int]] = {}
    for label, names in ((1, ENGINEERED_SETS), (0, PLAIN_SETS)):
        for name in names:
            for text in load_prompts(name, split).prompts:
                kinds.setdefault(text, set()).add(label)
    texts = [t for t, k in kinds.items() if len(k) == 1]
    return texts, np.array([next(iter(kinds[t])) for t in texts], dtype=np.int64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = 200) -> tuple[np.ndarray, float]:
    """Class-balanced L2-penalised logistic regression, full-batch L-BFGS in float64 → (w (D,), b)."""
    X, Y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if X.ndim != 2 or Y.shape != (X.shape[0],) or len(set(y.tolist())) != 2:
        raise ValueError(f"need x (N, D) and y (N,) with both labels, got {tuple(X.shape)} and {tuple(Y.shape)}")
    pos = float(Y.mean())
    weight = torch.where(Y > 0, 0.5 / pos, 0.5 / (1 - pos))  # each class weighs half
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, Y, reduction="none")).mean()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().copy(), float(b.detach())


@dataclass
class StyleModel:
    """logit(text) = w · emb(text) + b; `meta` holds the fit's data sizes and held-out accuracy."""

    w: np.ndarray
    b: float
    meta: dict

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return embeddings.astype(np.float64) @ self.w + self.b

    def accuracy(self, embeddings: np.ndarray, labels: np.ndarray) -> float:
        return float(((self.logits(embeddings) > 0).astype(np.int64) == labels).mean())


def style_key(encoder_id: str, texts: Sequence[str], labels: np.ndarray, l2: float = L2) -> str:
    part = {"version": STYLE_VERSION, "encoder": encoder_id, "l2": l2,
            "data": hashlib.sha256(json.dumps([list(texts), labels.tolist()]).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


def load_or_fit_style(encode: Encode, encoder_id: str, root: Path | None = None) -> StyleModel:
    """The cached fit for this encoder and data, fitted (and its held-out accuracy measured) if missing."""
    from safetensors.numpy import load_file, save_file

    texts, labels = style_data("train")
    directory = (root or cache_root()) / "style" / style_key(encoder_id, texts, labels)
    weights, meta_path = directory / "style.safetensors", directory / "style.json"
    if meta_path.is_file() and weights.is_file():
        tensors = load_file(str(weights))
        return StyleModel(tensors["w"].astype(np.float64), float(tensors["b"][0]), json.loads(meta_path.read_text()))
    w, b = fit_logistic(encode(texts), labels)
    model = StyleModel(w, b, {})
    eval_texts, eval_labels = style_data("eval")
    model.meta = {"version": STYLE_VERSION, "encoder": encoder_id, "l2": L2, "n_train": len(texts),
                  "n_train_engineered": int(labels.sum()), "n_eval": len(eval_texts),
                  "train_accuracy": round(model.accuracy(encode(texts), labels), 4),
                  "heldout_accuracy": round(model.accuracy(encode(eval_texts), eval_labels), 4)}
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    save_file({"w": w.astype(np.float64), "b": np.array([b], dtype=np.float64)}, str(tmp / "style.safetensors"))
    (tmp / "style.json").write_text(json.dumps(model.meta, indent=2) + "\n")
    try:
        tmp.rename(directory)  # atomic; a concurrent fit that won the race is just as good
    except OSError:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    log.info("style classifier: held-out accuracy %.3f on %d prompts (cached in %s)",
             model.meta["heldout_accuracy"], len(eval_texts), directory)
    return model


def text_relevance(cos: torch.Tensor, threshold: float = TEXT_THRESHOLD, weight: float = TEXT_WEIGHT) -> torch.Tensor:
    """w · min(0, cos − c) ≤ 0: the relevance hinge on the plain prompt / rewrite sentence cosine."""
    return weight * torch.clamp(cos - threshold, max=0)
