"""The `reward.` speed switches (scoring/sd_speed.py): each one takes effect and leaves the images
unchanged beyond rounding (fp16 noise for the half-precision VAE), and overlapped scoring gives the
same scores as scoring after the render."""
from __future__ import annotations

import math

import pytest
import torch

from actors.reward_worker import RewardWorker
from scoring.render import build_reward_models
from common import models as M
from common.config import ConfigError, load_config
from scoring.sd_speed import apply_speed
from common.trajectory import Trajectory

torch.set_num_threads(1)
PROMPTS = ["a cat on a sofa", "a red car in the rain"]


def _render(overrides: list[str], dtype: torch.dtype = torch.float32):
    cfg = load_config("tiny", overrides=overrides)
    pipe = M.build_sd_pipeline(cfg.model, "cpu", dtype)
    info = apply_speed(pipe, cfg.reward.speed)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    images = pipe(PROMPTS, num_inference_steps=3, guidance_scale=7.5, latents=noise, height=32, width=32,
                  output_type="pt").images.float()
    return images, pipe, info


@pytest.fixture(scope="module")
def reference():
    return _render([])[0]


def test_channels_last(reference):
    images, pipe, info = _render(["reward.speed.channels_last=true"])
    assert info["channels_last"] and pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)


def test_classic_attention(reference):
    images, pipe, _ = _render(["reward.speed.attention=classic"])
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor"}
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)


def test_compile_unet_and_vae(monkeypatch, reference):
    """The compile path (dynamo tracing, graphs, the renderer's hook outside them) with the aot_eager
    backend: inductor's code generation costs about a minute per model on this CPU (docs/benchmarks.md)."""
    monkeypatch.setenv("PAG_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    calls = []
    images, pipe, info = _render(["reward.speed.compile_unet=true", "reward.speed.compile_vae=true"])
    assert info["compile_unet"] and info["compile_vae"] and info["compile_mode"] == "default"
    assert "_torchdynamo_orig_callable" in dir(pipe.unet.forward) and "_torchdynamo_orig_callable" in dir(pipe.vae.decoder.forward)
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="pt")
    assert calls == [2, 2]  # hooks still see every (CFG-doubled) call
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)
    torch._dynamo.reset()


def test_float32_vae_under_fp16_is_within_fp16_noise():
    half, pipe16, info16 = _render(["render.fp16=true"], torch.float16)
    full, pipe32, info32 = _render(["render.fp16=true", "reward.speed.vae_fp16=false"], torch.float16)
    assert (info16["vae_dtype"], info32["vae_dtype"], info32["unet_dtype"]) == ("float16", "float32", "float16")
    assert pipe32.vae.dtype == torch.float32
    assert float((half - full).abs().max()) < 2e-2  # fp16 rounding of the decode, nothing more


def test_cuda_graphs_need_compile():
    with pytest.raises(ConfigError, match="cuda_graphs needs compile_unet"):
        load_config("tiny", overrides=["reward.speed.cuda_graphs=true"])


def test_overlapped_scoring_gives_the_same_scores(redis_url, run_name):
    base = ["reward.images.steps=2", "reward.images.per_prompt=2", "reward.batch_size=4"]
    trajs = [Trajectory(prompt=p, response=f"{p}, {s}", prompt_ids=[1, 2], response_ids=[3, 4], ref_logprobs=[-1.0, -1.0])
             for p in ("a cat", "a dog", "a tree") for s in ("highly detailed", "oil painting")][:4]
    scores = {}
    for overlap in (False, True):
        speed = ["reward.speed.render_batch=2", f"reward.speed.overlap_scoring={overlap}"]
        cfg = load_config("tiny", overrides=base + speed)
        worker = RewardWorker(cfg, redis_url, f"{run_name}{int(overlap)}", "w0", models=build_reward_models(cfg, "cpu"))
        scored, failed = worker.score_batch(trajs)
        assert not failed and len(scored) == 4
        texts = 4 + worker.stats.plain_cache_misses  # the plain cache is shared: the second worker hits it
        assert worker.renderer.unet_calls == 2 * math.ceil(texts / 2)  # chunks of render_batch=2, 2 steps each
        assert (worker._scoring_pool is not None) == overlap
        scores[overlap] = [t.scores for t in scored]
        worker.close()
    for a, b in zip(scores[False], scores[True]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
