"""The `sd14-arch` preset: the paper's architectures at full size, random weights, no download.

Built on the `meta` device (no memory, about a second each) and checked against published counts:
  UNet 859,520,964, VAE 83,653,863, CLIP text encoder 123,060,480 — diffusers' ModelMixin.num_parameters
    docstring (SD v1.5's UNet, the same architecture as v1.4) and microsoft/DeepSpeed-MII's README
    ("SD param count");
  GPT-2 small 124,439,808 — karpathy/llm.c README (`num_parameters: 124439808`);
  CLIP ViT-L/14 427,616,513 — KerasCV's `clip-vit-large-patch14` preset and MTEB's openai/clip-vit-large-patch14 metadata.
and the FLOPs of one UNet forward (64×64 latents, 77-token conditioning, batch 1): 0.803 TFLOP.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import clip as C
from common import models as M
from common.config import load_config

PUBLISHED = {"policy": 124_439_808, "unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480,
             "clip": 427_616_513}


@pytest.fixture(scope="module")
def arch():
    cfg = load_config("sd14-arch").model
    tok = M.build_tokenizer(cfg)
    return {"cfg": cfg, "tok": tok, "policy": M.build_policy(cfg, tok, device="meta"),
            "pipe": M.build_sd_pipeline(cfg, device="meta"), "clip": C.build_clip(cfg, device="meta")}


def test_preset_is_the_paper_at_full_size():
    cfg = load_config("sd14-arch")
    assert cfg.model.kind == "arch" and cfg.model.image_size == 512
    r = cfg.reward.images
    assert (r.steps, cfg.render.guidance, r.per_prompt, cfg.render.fp16) == (20, 7.5, 3, True)
    assert (cfg.learner.batch_size, cfg.sampler.max_len) == (64, 75)


def test_parameter_counts_match_the_published_ones(arch):
    pipe = arch["pipe"]
    counts = {"policy": M.count_parameters(arch["policy"]), "unet": M.count_parameters(pipe.unet),
              "vae": M.count_parameters(pipe.vae), "text_encoder": M.count_parameters(pipe.text_encoder),
              "clip": M.count_parameters(arch["clip"].model)}
    assert counts == PUBLISHED
    assert next(pipe.unet.parameters()).device.type == "meta"  # nothing was allocated
    assert len(arch["tok"]) == 50257 and arch["clip"].image_size == 224


def test_pipeline_uses_the_paper_sampler(arch):
    sched = arch["pipe"].scheduler
    assert type(sched).__name__ == "DPMSolverMultistepScheduler" and sched.config.algorithm_type == "dpmsolver++"
    assert (sched.config.beta_start, sched.config.beta_end, sched.config.beta_schedule, sched.config.steps_offset) == \
        (0.00085, 0.012, "scaled_linear", 1)
    assert arch["pipe"].vae_scale_factor == 8 and arch["pipe"].unet.config.cross_attention_dim == 768


@pytest.mark.parametrize("batch", [1, 2])
def test_unet_forward_flops(arch, batch):
    unet = arch["pipe"].unet
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        unet(torch.empty(batch, 4, 64, 64), torch.tensor([500] * batch), encoder_hidden_states=torch.empty(batch, 77, 768))
    assert counter.get_total_flops() == pytest.approx(batch * 0.80327e12, rel=1e-4)


def test_arch_needs_no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: a from_pretrained would fail
    cfg = load_config("sd14-arch").model
    tok = M.build_tokenizer(cfg)
    assert M.count_parameters(M.build_policy(cfg, tok, checkpoint=cfg.policy, device="meta")) == PUBLISHED["policy"]


def test_arch_policy_is_seeded_and_loads_a_local_checkpoint(tmp_path):
    """Real (CPU) weights: the same seed gives the same policy; a checkpoint directory wins over random."""
    cfg = load_config("sd14-arch").model
    tok = M.build_tokenizer(cfg)
    a, b = M.build_policy(cfg, tok), M.build_policy(cfg, tok)
    assert torch.equal(a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight)
    with torch.no_grad():
        a.transformer.wpe.weight.fill_(0.5)
    a.save_pretrained(tmp_path / "ckpt")
    loaded = M.build_policy(cfg, tok, checkpoint=str(tmp_path / "ckpt"))
    assert torch.equal(loaded.transformer.wpe.weight, a.transformer.wpe.weight)
