"""Rendering for the reward: text → images with fixed per-index noise, and the reward models a
worker builds once (SD pipeline with the `reward.speed` switches, the configured scorers).

Shared by the reward workers (actors/reward_worker.py), `pag eval`'s workers and the run report.
Image i of *every* text starts from the same noise, randn(seed + i), so a rewrite and its plain prompt
are compared on identical noise and an item's images do not depend on what else is in its batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from common.config import Config
from common.formats import TEMPLATES

#: what the policy's input templates add after the prompt: " Rephrase:\n" (pag) and " Rephrase:" (promptist)
_TEMPLATE_SUFFIXES = tuple(TEMPLATES[name].replace("{prompt}", "") for name in ("pag", "promptist"))


def plain_text(prompt: str) -> str:
    """The user's prompt x, without the policy's " Rephrase:" template if a sampler left it on."""
    for suffix in _TEMPLATE_SUFFIXES:
        if prompt.endswith(suffix):
            return prompt[: -len(suffix)]
    return prompt


class Renderer:
    """Text → images with fixed per-index noise. `__call__(texts)` → (len(texts)·k, 3, H, W) in [0, 1],
    prompt-major (image i of text j at row j·k + i)."""

    def __init__(self, pipe, images_per_prompt: int, steps: int, guidance: float, seed: int, size: int,
                 max_prompts_per_call: int = 8) -> None:
        self.pipe = pipe
        self.k = images_per_prompt
        self.steps = steps
        self.guidance = guidance
        self.size = size
        self.max_prompts = max_prompts_per_call
        from common.models import denoiser

        net = denoiser(pipe)  # the UNet (SD v1.x, SDXL) or the transformer (SD3)
        device, dtype = net.device, net.dtype
        shape = (1, net.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        # one generator per image index: the noise of image i is the same for every prompt and batch
        self.noise = torch.cat([
            torch.randn(shape, generator=torch.Generator(device).manual_seed(seed + i), device=device, dtype=dtype)
            for i in range(images_per_prompt)
        ])  # (k, C, h, w)
        self.unet_calls = 0  # forward passes
        self.unet_rows = 0  # latents evaluated (×2 with classifier-free guidance)
        net.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        self.unet_calls += 1
        latents = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet / SD3 transformer
        self.unet_rows += int(latents.shape[0]) if latents is not None else 0

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.cat([images for _, images in self.chunks(texts)])

    @torch.no_grad()
    def chunks(self, texts: Sequence[str]) -> Iterator[tuple[slice, torch.Tensor]]:
        """One pipeline call per `max_prompts` texts: (slice of texts, (n·k, 3, H, W) images), lazily,
        so a caller can score one chunk while the next one denoises."""
        for start in range(0, len(texts), self.max_prompts):
            part = list(texts[start:start + self.max_prompts])
            out = self.pipe(
                part, num_inference_steps=self.steps, guidance_scale=self.guidance, num_images_per_prompt=self.k,
                latents=self.noise.repeat(len(part), 1, 1, 1), height=self.size, width=self.size, output_type="pt",
            )
            yield slice(start, start + len(part)), out.images.float()


@dataclass
class RewardModels:
    """The expensive part of a worker (SD pipeline, scorers), built once and shareable."""

    renderer: Optional[Renderer]  # None with reward.render=false (text scorers only)
    score_fn: Any  # scoring.scorers.ScoreFn
    score_keys: list[str]  # what a plain-cache entry must hold to be a hit
    device: torch.device
    dtype: torch.dtype
    speed: dict[str, Any] = field(default_factory=dict)  # the `reward.speed` switches applied (scoring.sd_speed)


def build_reward_models(cfg: Config, device: Optional[str] = None) -> RewardModels:
    """SD pipeline (fp16 on GPU when render.fp16, then the reward.speed switches) and the configured scorers."""
    from scoring.scorers import TEXT, build_scorers, score_keys
    from common.models import build_sd_pipeline, resolve_device
    from scoring.sd_speed import apply_speed

    dev = resolve_device(device or cfg.run.device)
    dtype = torch.float16 if (cfg.render.fp16 and dev.type == "cuda") else torch.float32
    r = cfg.reward
    if not r.render:
        score_keys(r.scorers)  # unknown names fail here, naming the known ones
        image_scorers = [n for n in r.scorers if n not in TEXT]
        if image_scorers or not r.scorers:
            raise ValueError(f"reward.render=false renders no images: reward.scorers = {r.scorers} may only hold "
                             f"text scorers ({', '.join(sorted(TEXT))}); remove {image_scorers} or set reward.render=true")
        return RewardModels(None, build_scorers(r.scorers, cfg.model, dev, dtype), score_keys(r.scorers), dev, dtype)
    missing = {"aesthetic", "clip"} - set(r.scorers)
    if missing:
        raise ValueError(f"reward.scorers = {r.scorers}: the paper's reward needs {sorted(missing)} too "
                         f"(or reward.render=false with text scorers only)")
    pipe = build_sd_pipeline(cfg.model, dev, dtype)
    speed = apply_speed(pipe, r.speed)
    renderer = Renderer(pipe, r.images.per_prompt, r.images.steps, cfg.render.guidance, r.images.seed,
                        cfg.model.image_size, r.speed.render_batch or r.batch_size)
    return RewardModels(renderer, build_scorers(r.scorers, cfg.model, dev, dtype), score_keys(r.scorers), dev, dtype,
                        speed)
