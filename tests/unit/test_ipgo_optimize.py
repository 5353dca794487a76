"""IPGO's DRaFT-K sampler and its two loops on the tiny models (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch

from common.config import load_config
from ipgo.conditioning import inject
from ipgo.optimize import build_models, optimize_batch, optimize_prompt, render
from ipgo.tokens import PromptTokens


@pytest.fixture(scope="module")
def models():
    return build_models(load_config("tiny", overrides=["ipgo.lr=1e-2"]))


def _grad_enabled_calls(models, fn) -> list[bool]:
    seen: list[bool] = []
    handle = models.sampler.unet.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_only_the_last_k_steps_are_differentiated(models):
    sampler = models.sampler
    enc = models.encoder.encode("a red car")
    tokens = PromptTokens.from_config(models.cfg.ipgo, models.dim)
    cond = inject(enc.states, *tokens())
    noise = sampler.noise(0, models.cfg.model.image_size)
    out = {}
    calls = _grad_enabled_calls(models, lambda: out.setdefault("image", sampler(cond, enc.uncond, noise)))
    steps, k = models.cfg.ipgo.steps, models.cfg.ipgo.grad_steps
    assert calls == [False] * (steps - k) + [True] * k
    image = out["image"]
    assert image.shape == (1, 3, models.cfg.model.image_size, models.cfg.model.image_size)
    image.mean().backward()
    for p in tokens.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_checkpointing_gives_the_same_gradient(models):
    enc = models.encoder.encode("a red car")
    noise = models.sampler.noise(0, models.cfg.model.image_size)
    grads = []
    for flag in (False, True):
        models.sampler.checkpointing = flag
        cond = inject(enc.states, torch.zeros(10, models.dim), torch.zeros(10, models.dim)).requires_grad_(True)
        models.sampler(cond, enc.uncond, noise).square().mean().backward()
        grads.append(cond.grad)
    models.sampler.checkpointing = False
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fixed_noise_is_deterministic(models):
    image_a, scores_a = render(models, "a red car")
    image_b, scores_b = render(models, "a red car")
    assert torch.equal(image_a, image_b) and scores_a == scores_b
    image_c, _ = render(models, "a red car", seed=7)
    assert not torch.equal(image_a, image_c)


def test_training_reward_rises_over_20_iterations(models):
    result = optimize_prompt(models, "a red car", iterations=20)
    curve = result.curve
    assert len(curve) == 20 and all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-5:]) / 5 > sum(curve[:5]) / 5
    assert result.best_reward == max(curve) and result.best_reward > curve[0]
    # the kept tokens are the best iterate's: injecting them reproduces its training reward
    _, scores = render(models, "a red car", result.tokens)
    assert scores["reward"] == pytest.approx(result.best_reward, abs=1e-4)
    assert result.tokens["prefix"].shape == (10, models.dim) and result.tokens["suffix"].shape == (10, models.dim)


def test_prompt_batch_tokens_apply_to_an_unseen_prompt(models):
    train = ["a red car", "a dog on a beach", "a house in the snow"]
    result = optimize_batch(models, train, epochs=1)
    assert result.steps == 1 and len(result.curve) == 3  # 3 prompts, accumulation 4: one (short) group
    plain_image, plain = render(models, "a purple elephant")
    image, scores = render(models, "a purple elephant", result.tokens)
    assert image.shape == plain_image.shape and torch.isfinite(torch.tensor(scores["reward"]))
    assert not torch.allclose(image, plain_image)


def test_nopad_layout_runs(models):
    cfg = load_config("tiny", overrides=["ipgo.layout=nopad"])
    m = build_models(cfg)
    result = optimize_prompt(m, "a red car", iterations=2)
    assert len(result.curve) == 2


def test_bench_measures_every_variant():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "ipgo.py"
    spec = importlib.util.spec_from_file_location("bench_ipgo", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.run("tiny", "cpu", quick=True, overrides=["ipgo.steps=4"], budget_s=30)
    assert set(out["variants"]) == {"ours", "notebook_like", "checkpointing"}
    for variant in out["variants"].values():
        assert variant["s_per_iteration"] > 0 and variant["peak_memory_mib"] > 0, variant  # an iteration allocates
    assert out["rows"][0]["ratio"] > 0


def test_prompt_batch_resumes_after_an_epoch_as_if_uninterrupted(models, tmp_path):
    train = ["a red car", "a dog on a beach", "a house in the snow", "a bowl of fruit", "a tall tower"]
    whole = optimize_batch(models, train, epochs=2)
    state = tmp_path / "trainer"
    first = optimize_batch(models, train, epochs=1, state=state)  # "interrupted" after epoch 1
    assert state.with_suffix(".safetensors").is_file() and first.steps == 2
    resumed = optimize_batch(models, train, epochs=2, state=state)
    assert resumed.steps == whole.steps == 4
    assert resumed.epoch_reward == pytest.approx(whole.epoch_reward, abs=1e-6)
    for key in ("prefix", "suffix"):
        assert torch.allclose(resumed.tokens[key], whole.tokens[key], atol=1e-6)
    with pytest.raises(ValueError, match="another prompt set"):
        optimize_batch(models, train[:2], epochs=2, state=state)
