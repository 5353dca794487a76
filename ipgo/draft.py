"""DRaFT-K sampling: an image whose gradient reaches the conditioning through the last K steps only.

The first S − K LMS steps run under `torch.no_grad` — no activations are kept; the reference notebook
runs them with autograd on and detaches the output, which stores every step's graph for nothing. The
last K UNet calls, their scheduler updates and the VAE decode are differentiated, so
∂reward/∂conditioning flows through x_{S−K} → … → x_0 → image while x_{S−K} itself is a constant
(Clark et al., 2023, "DRaFT-K"). `checkpointing=True` recomputes the K UNet calls and the decode in the
backward pass instead of storing their activations.

Classifier-free guidance: ε = ε_u + w (ε_c − ε_u), both halves in one UNet batch; the unconditional states
must have the conditioning's length (ipgo/conditioning.py makes them so).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


class DraftSampler:
    """LMS sampler over a frozen UNet and VAE; `__call__(cond, uncond, noise)` → images in [−1, 1]."""

    def __init__(self, unet, vae, scheduler_config, steps: int = 50, grad_steps: int = 2, guidance: float = 7.5,
                 checkpointing: bool = False) -> None:
        from diffusers import LMSDiscreteScheduler

        if not 1 <= grad_steps <= steps:
            raise ValueError(f"ipgo.grad_steps ({grad_steps}) must be in [1, ipgo.steps = {steps}]")
        self.unet, self.vae = unet, vae
        self.scheduler = LMSDiscreteScheduler.from_config(scheduler_config)
        self.steps, self.grad_steps, self.guidance, self.checkpointing = steps, grad_steps, guidance, checkpointing
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    #: context of the first S − K steps (bench/ipgo.py swaps it for the notebook's grad-on-then-detach baseline)
    _frozen = staticmethod(torch.no_grad)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def noise(self, seed: int, image_size: int, batch: int = 1) -> torch.Tensor:
        """The fixed initial latent noise for a seed, (batch, C, h, w), drawn on the CPU (the same on any device)."""
        side = image_size // self.vae_scale
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, self.unet.config.in_channels, side, side)
        return torch.randn(shape, generator=gen).to(self.device, next(self.unet.parameters()).dtype)

    def _eps(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, differentiated: bool) -> torch.Tensor:
        model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)

        def unet(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, encoder_hidden_states=c).sample

        if differentiated and self.checkpointing:
            out = checkpoint(unet, model_input, context, use_reentrant=False)
        else:
            out = unet(model_input, context)
        eps_uncond, eps_cond = out.chunk(2)
        return eps_uncond + self.guidance * (eps_cond - eps_uncond)

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """cond (B, T, d) (may require grad), uncond (1 or B, T, d), noise (B, C, h, w) → (B, 3, H, W)."""
        batch = cond.shape[0]
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"unconditional states {tuple(uncond.shape)} must match the conditioning {tuple(cond.shape)} "
                             "after the batch dimension (classifier-free guidance batches them together)")
        dtype = next(self.unet.parameters()).dtype
        context = torch.cat([uncond.expand(batch, -1, -1).to(dtype), cond.to(dtype)])  # (2B, T, d)
        self.scheduler.set_timesteps(self.steps, device=self.device)  # also clears LMS's derivative history
        latents = noise * self.scheduler.init_noise_sigma
        first_grad = self.steps - self.grad_steps
        for i, t in enumerate(self.scheduler.timesteps):
            differentiated = i >= first_grad
            with contextlib.nullcontext() if differentiated else self._frozen():
                eps = self._eps(latents, t, context, differentiated)
                latents = self.scheduler.step(eps, t, latents).prev_sample
        latents = latents / self.vae.config.scaling_factor

        def decode(z: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(z).sample

        self.scheduler.derivatives = []  # LMS keeps the last steps' derivatives: drop their graph with the call
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(decode, latents, use_reentrant=False)
        return decode(latents)
