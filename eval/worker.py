"""Render and score texts (or conditioning) for `pag eval` with the reward workers' code: the same
`Renderer` (image i of every text starts from randn(eval.images.seed + i)), the same scorer registry
(aesthetic + clip, plus `eval.scorers`). A plain class; `ray_worker_class` wraps it as a Ray actor
with one GPU, so `pag eval` fans out over a cluster while the driver only gathers small records.

Work and results cross the process boundary as msgpack with a schema version (never pickle):

    item   {against, key, text, embeds?: {prompt, negative?, shape}, thumb: bool}
    result {against, key, record: bytes (eval.cache.encode_record) | None, error: str | None}
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Optional

import msgpack
import numpy as np
import torch

from common.config import Config
from common.images import png_bytes
from eval.cache import encode_record

log = logging.getLogger(__name__)

#: msgpack schema of a work batch and of its answer
WORK_SCHEMA = 1


def render_config(cfg: Config) -> Config:
    """The config the plain-cache id sees: the eval's images (`eval.images`) in the reward section."""
    reward = cfg.reward.model_copy(update={"images": cfg.eval.images, "scorers": ["aesthetic", "clip"]})
    return cfg.model_copy(update={"reward": reward})


def render_id(cfg: Config, dtype_name: str) -> str:
    """Identity of what a cached record holds: model, render settings, precision, extra scorers."""
    from scoring.plain_cache import cache_model_id

    rc = render_config(cfg)
    extra = {"scorers": sorted(cfg.eval.scorers), "against": cfg.eval.score_against if cfg.eval.scorers else None,
             "thumb": cfg.eval.thumb_size, "clip": [rc.reward.clip_threshold, rc.reward.clip_weight]}
    if cfg.eval.inception:  # records then hold Inception features too (a key only when on: old caches stay valid)
        extra["inception"] = True
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:6]
    return f"{cache_model_id(rc, dtype_name)}~{digest}"


def encode_items(items: list[dict[str, Any]]) -> bytes:
    return msgpack.packb({"v": WORK_SCHEMA, "items": items}, use_bin_type=True)


def _decode(blob: bytes, what: str) -> list[dict[str, Any]]:
    raw = msgpack.unpackb(blob, raw=False)
    if raw.get("v") != WORK_SCHEMA:
        raise ValueError(f"eval {what} of schema {raw.get('v')}, expected {WORK_SCHEMA} (driver and workers "
                         "run different code versions)")
    return raw[what]


def decode_results(blob: bytes) -> list[dict[str, Any]]:
    return _decode(blob, "results")


class EvalWorker:
    """Build once (SD pipeline, CLIP, aesthetic MLP, extra scorers), then `process(work) -> results`."""

    def __init__(self, cfg: dict[str, Any], device: Optional[str] = None, torch_threads: Optional[int] = None) -> None:
        from scoring.render import Renderer
        from scoring.scorers import SCORERS, ScorerContext, build_scorers
        from common.models import build_sd_pipeline, resolve_device
        from scoring.sd_speed import apply_speed

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = Config.model_validate(cfg)
        ev, images = self.cfg.eval, self.cfg.eval.images
        if device is None:
            device = "cuda" if torch.cuda.is_available() and self.cfg.reward.num_gpus > 0 else self.cfg.run.device
        self.device = resolve_device(device)
        self.dtype = torch.float16 if (self.cfg.render.fp16 and self.device.type == "cuda") else torch.float32
        pipe = build_sd_pipeline(self.cfg.model, self.device, self.dtype)
        apply_speed(pipe, self.cfg.reward.speed)
        self.renderer = Renderer(pipe, images.per_prompt, images.steps, self.cfg.render.guidance, images.seed,
                                 self.cfg.model.image_size, ev.batch_size)
        self.ctx = ScorerContext(model=self.cfg.model, device=self.device, dtype=self.dtype)
        self.aesthetic, self.clip = SCORERS["aesthetic"](self.ctx), SCORERS["clip"](self.ctx)
        self.extra = build_scorers(ev.scorers, self.cfg.model, self.device, self.dtype) if ev.scorers else None
        self.inception = None
        if ev.inception:
            from eval.inception import build_inception

            self.inception = build_inception(self.device)
        self.id = render_id(self.cfg, str(self.dtype).removeprefix("torch."))
        self.images = 0

    def render_id(self) -> str:
        return self.id

    @torch.no_grad()
    def _render_embeds(self, embeds: list[dict[str, Any]]) -> torch.Tensor:
        pipe, k = self.renderer.pipe, self.renderer.k

        def tensor(raw: bytes, shape) -> torch.Tensor:
            array = np.frombuffer(raw, dtype=np.float32).reshape(shape)
            return torch.from_numpy(array.copy()).to(self.device, self.dtype)

        prompt = torch.stack([tensor(e["prompt"], e["shape"]) for e in embeds])
        negative = None
        if all(e.get("negative") for e in embeds):
            negative = torch.stack([tensor(e["negative"], e["shape"]) for e in embeds])
        out = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=self.renderer.steps,
                   guidance_scale=self.renderer.guidance, num_images_per_prompt=k,
                   latents=self.renderer.noise.repeat(len(embeds), 1, 1, 1), height=self.renderer.size,
                   width=self.renderer.size, output_type="pt")
        return out.images.float()

    def _render(self, items: list[dict[str, Any]]) -> torch.Tensor:
        """(len(items)·k, 3, H, W), item-major, texts and conditioning rendered in their own calls."""
        k = self.renderer.k
        out: list[Optional[torch.Tensor]] = [None] * len(items)
        text_idx = [i for i, it in enumerate(items) if not it.get("embeds")]
        emb_idx = [i for i, it in enumerate(items) if it.get("embeds")]
        if text_idx:
            images = self.renderer([items[i]["text"] for i in text_idx])
            for j, i in enumerate(text_idx):
                out[i] = images[j * k:(j + 1) * k]
        for start in range(0, len(emb_idx), self.cfg.eval.batch_size):
            part = emb_idx[start:start + self.cfg.eval.batch_size]
            images = self._render_embeds([items[i]["embeds"] for i in part])
            for j, i in enumerate(part):
                out[i] = images[j * k:(j + 1) * k]
        return torch.cat(out)  # type: ignore[arg-type]

    def _records(self, items: list[dict[str, Any]]) -> list[bytes]:
        ev, k = self.cfg.eval, self.renderer.k
        images = self._render(items)
        against = [it["against"] for it in items for _ in range(k)]
        aes = self.aesthetic(images, against)["aes"].view(len(items), k)
        clip = self.clip(images, against)["clip"].view(len(items), k)
        emb = self.ctx.image_embeddings(images).float().cpu().view(len(items), k, -1)
        self.ctx._last = None
        extra: dict[str, torch.Tensor] = {}
        if self.extra is not None:
            judged = against if ev.score_against == "plain" else [it["text"] for it in items for _ in range(k)]
            extra = {name: v.view(len(items), k) for name, v in self.extra(images, judged).items()}
        inc = None
        if self.inception is not None:
            from eval.inception import official_features

            inc = official_features(self.inception, images).view(len(items), k, -1)
        self.images += images.shape[0]
        return [encode_record({"aes": aes[j].tolist(), "clip": clip[j].tolist(),
                               "extra": {n: v[j].tolist() for n, v in extra.items()}, "emb": emb[j].numpy(),
                               **({"inc": inc[j].numpy()} if inc is not None else {}),
                               "thumb": png_bytes(images[j * k], ev.thumb_size) if items[j].get("thumb") else None})
                for j in range(len(items))]

    def process(self, work: bytes) -> bytes:
        """Render and score a batch; a failing batch is retried one item at a time so one bad item
        fails alone (its result carries the error)."""
        items = _decode(work, "items")
        t0 = time.perf_counter()
        try:
            records: list[Any] = self._records(items)
            errors: list[Optional[str]] = [None] * len(items)
        except Exception as exc:  # noqa: BLE001 — isolate below
            if len(items) == 1:
                records, errors = [None], [f"{type(exc).__name__}: {exc}"]
            else:
                log.warning("eval worker: batch of %d failed (%s); retrying one by one", len(items), exc)
                records, errors = [], []
                for it in items:
                    one = decode_results(self.process(encode_items([it])))[0]
                    records.append(one["record"])
                    errors.append(one["error"])
        results = [{"against": it["against"], "key": it["key"], "record": rec, "error": err}
                   for it, rec, err in zip(items, records, errors)]
        return msgpack.packb({"v": WORK_SCHEMA, "results": results, "seconds": time.perf_counter() - t0},
                             use_bin_type=True)
