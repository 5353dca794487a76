"""Speed switches for a Stable Diffusion pipeline, each a `reward.speed.` config key (issue 12).

    pipe = build_sd_pipeline(cfg.model, "cuda", torch.float16)
    info = apply_speed(pipe, cfg.reward.speed)  # after building, before the first render

| key | what it changes | images |
|---|---|---|
| `attention` | `sdpa`: torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA); `classic`: matmul + softmax | same maths, rounding differs |
| `channels_last` | UNet and VAE weights and activations in NHWC, which cuDNN's tensor-core convolutions prefer | same maths, rounding differs |
| `compile_unet`, `compile_vae` | `torch.compile` of the UNet's and the VAE decoder's `forward` (the first call of each shape compiles) | fused kernels, rounding differs |
| `cuda_graphs` | compile with mode `reduce-overhead`: each shape is replayed as one CUDA graph, no launch gaps | as compile |
| `vae_fp16` | with `render.fp16`: decode in half precision (True, today's behaviour) or keep the VAE float32 | float32 decode is the reference |

Classifier-free guidance already runs as one batch of 2·N latents in diffusers' pipeline, so there is no
switch for it. Defaults are today's behaviour; a switch becomes a default of `sd14` only when a GPU
measurement (bench/gpu.py) shows it helps without changing the images beyond fp16 noise.
Compilation is lazy: `compile_s` of a first render is reported by bench/gpu.py, separately from steady state.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from common.config import SpeedConfig

log = logging.getLogger(__name__)

#: compile mode per `cuda_graphs`
COMPILE_MODES = {False: None, True: "reduce-overhead"}


def set_attention(pipe, kind: str) -> None:
    """`sdpa` or `classic` attention processors on the UNet and the VAE."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind not in ("sdpa", "classic"):
        raise ValueError(f"reward.speed.attention = {kind!r}: choose sdpa or classic")
    processor = AttnProcessor2_0 if kind == "sdpa" else AttnProcessor
    if getattr(pipe, "unet", None) is None:  # SD3's transformer: its own joint-attention processors (SDPA)
        if kind == "classic":
            raise ValueError(f"reward.speed.attention = classic is for UNet pipelines; {type(pipe).__name__} keeps "
                             "its own SDPA processors: use sdpa")
    else:
        pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())


def keep_vae_float32(pipe) -> None:
    """Decode in float32 while the UNet runs in half precision: the VAE is upcast and its `decode`
    casts the latents it receives (the pipeline hands it the UNet's dtype)."""
    vae = pipe.vae.to(torch.float32)
    decode = vae.decode

    def decode_float32(latents: torch.Tensor, *args: Any, **kwargs: Any):
        return decode(latents.to(torch.float32), *args, **kwargs)

    vae.decode = decode_float32


def _compile_forward(module: torch.nn.Module, mode: str | None) -> None:
    """Compile `module.forward` in place; hooks (the renderer's UNet counter) stay outside the graph.

    PAG_COMPILE_BACKEND (default inductor) picks torch.compile's backend: `aot_eager` traces the same
    graphs without generating kernels, to tell a tracing problem from a code-generation one."""
    backend = os.environ.get("PAG_COMPILE_BACKEND", "inductor")
    module.forward = torch.compile(module.forward, mode=mode if backend == "inductor" else None, backend=backend,
                                   dynamic=False)


def apply_speed(pipe, speed: SpeedConfig) -> dict[str, Any]:
    """Apply the `reward.speed` switches to `pipe` in place; returns what was applied (for bench JSON)."""
    from common.models import denoiser

    r, net = speed, denoiser(pipe)  # the UNet, or SD3's transformer: `compile_unet` and the rest apply to it
    cuda = net.device.type == "cuda"
    set_attention(pipe, r.attention)
    if not r.vae_fp16 and pipe.vae.dtype == torch.float16:  # a half-precision pipeline (render.fp16 on GPU)
        keep_vae_float32(pipe)
    if r.channels_last:
        net.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if r.cuda_graphs and not cuda:
        log.warning("reward.speed.cuda_graphs is CUDA only: compiling without CUDA graphs on %s", net.device)
    mode = COMPILE_MODES[bool(r.cuda_graphs and cuda)]
    if r.compile_unet:
        _compile_forward(net, mode)
    if r.compile_vae:
        _compile_forward(pipe.vae.decoder, mode)
    return {
        "attention": r.attention, "channels_last": r.channels_last, "compile_unet": r.compile_unet,
        "compile_vae": r.compile_vae, "compile_mode": (mode or "default") if (r.compile_unet or r.compile_vae) else None,
        "vae_dtype": str(pipe.vae.dtype).removeprefix("torch."), "unet_dtype": str(net.dtype).removeprefix("torch."),
    }


def reset_speed(pipe, dtype: torch.dtype) -> None:
    """Undo `apply_speed` (benchmarks switch variants on one pipeline): SDPA, contiguous NCHW, eager
    forwards, the VAE in the pipeline's dtype."""
    from common.models import denoiser

    compiled = False
    for module in (denoiser(pipe), pipe.vae.decoder):
        compiled |= module.__dict__.pop("forward", None) is not None
    pipe.vae.__dict__.pop("decode", None)
    pipe.vae.to(dtype)
    set_attention(pipe, "sdpa")
    denoiser(pipe).to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)
    if compiled:
        torch._dynamo.reset()
