"""Scores of plain prompts, cached in Redis and shared by every run that renders the same way.

The reward compares a rewrite's images with the plain prompt's, so the plain prompt x would be
rendered again for every one of its K rewrites and every epoch. It is rendered once per
(model, seed, prompt) instead and kept as a readable HASH:

    HGETALL pag:plain:stable-diffusion-v1-4~3f9a0c2e:0:<sha256(prompt)>
    prompt "a cat on a sofa"   aes "5.12"   clip "0.301"   images "3"   steps "20"   …

The model part of the key is the SD name plus a short hash of everything else that changes the
score (render settings, scorer models, precision), so two runs share entries exactly when their
plain scores would be identical. No pickle: every field is text.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Sequence

import redis

from common.config import Config
from common.constants import plain_key

#: fields of the HASH that are not scores
INFO_FIELDS = ("prompt", "images", "steps", "guidance", "image_size", "created_at")


def prompt_sha(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def cache_model_id(cfg: Config, dtype_name: str = "float32") -> str:
    """`{sd name}~{hash}`: readable, and different whenever the plain scores would differ."""
    name = Path(cfg.model.sd.rstrip("/")).name if Path(cfg.model.sd).exists() else cfg.model.sd.split("/")[-1]
    name = "".join("_" if (c == ":" or c.isspace()) else c for c in name) or "sd"
    settings = {
        "sd": cfg.model.sd, "kind": cfg.model.kind, "tiny_seed": cfg.model.seed if cfg.model.kind == "tiny" else None,
        "clip": [cfg.model.clip_arch, cfg.model.clip_pretrained], "aesthetic": cfg.model.aesthetic_weights,
        "size": cfg.model.image_size, "steps": cfg.reward.images.steps, "guidance": cfg.render.guidance,
        "images": cfg.reward.images.per_prompt, "dtype": dtype_name,
    }
    text_scorers = sorted(s for s in cfg.reward.scorers if s in ("style", "relevance_text"))
    if text_scorers or not cfg.reward.render:  # only then, so image-only runs keep their keys
        from scoring.style import STYLE_VERSION

        settings.update(render=cfg.reward.render, text_scorers=text_scorers,
                        sentence_encoder=cfg.model.sentence_encoder, style_version=STYLE_VERSION)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}~{digest}"


class PlainCache:
    """get_many / put over `pag:plain:{model}:{seed}:{sha}` HASHes (see module doc)."""

    def __init__(self, client: redis.Redis, model_id: str, seed: int) -> None:
        self.client = client
        self.model_id = model_id
        self.seed = seed

    def key(self, prompt: str) -> str:
        return plain_key(self.model_id, self.seed, prompt_sha(prompt))

    def get_many(self, prompts: Sequence[str], needed: Sequence[str]) -> dict[str, dict[str, float]]:
        """prompt → scores for the prompts whose entry holds every `needed` score (finite)."""
        prompts = list(dict.fromkeys(prompts))
        if not prompts:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for prompt in prompts:
            pipe.hgetall(self.key(prompt))
        found: dict[str, dict[str, float]] = {}
        for prompt, raw in zip(prompts, pipe.execute()):
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if fields.get("prompt") != prompt:  # absent, or a (theoretical) sha collision
                continue
            try:
                scores = {k: float(v) for k, v in fields.items() if k not in INFO_FIELDS}
            except ValueError:
                continue
            if all(name in scores and math.isfinite(scores[name]) for name in needed):
                found[prompt] = scores
        return found

    def put(self, prompt: str, scores: dict[str, float], info: dict[str, str | int | float] | None = None) -> None:
        """Store finite scores only: a NaN is a failure to record, not a value to share."""
        if not all(math.isfinite(v) for v in scores.values()):
            raise ValueError(f"refusing to cache non-finite plain scores for {prompt!r}: {scores}")
        mapping: dict[str, str] = {k: repr(float(v)) for k, v in scores.items()}
        mapping.update({k: str(v) for k, v in (info or {}).items()})
        mapping["prompt"] = prompt
        mapping["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.client.hset(self.key(prompt), mapping=mapping)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
