"""IPGO's token parametrisation, conditioning layouts and the differentiable scorer path (tiny, CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from ipgo.conditioning import PromptEncoder, conformity, inject
from ipgo.tokens import InjectedTokens, PromptTokens, rotate, wrap_angle


def _step(module: torch.nn.Module, loss_fn, steps: int = 5, lr: float = 0.5) -> None:
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_full_size_parameter_count_is_the_papers():
    tokens = PromptTokens(768, prefix=10, suffix=10, rank=300, angles=2)
    count = sum(p.numel() for p in tokens.parameters())
    assert count == 2 * (768 * 300 + 768 + 10 * 300 + 10 * 2)
    assert 0.46e6 < count < 0.48e6


def test_gradients_reach_E_z_theta_and_b():
    tokens = InjectedTokens(4, dim=32, rank=16, angles=2)
    target = torch.randn(4, 32)
    ((tokens() - target) ** 2).sum().backward()
    grads = {name: p.grad for name, p in tokens.named_parameters()}
    assert set(grads) == {"raw_z", "theta", "basis.bias", "basis.parametrizations.weight.original"}
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("bound", ["tanh", "clamp"])
def test_constraints_hold_after_steps(bound):
    tokens = InjectedTokens(4, dim=32, rank=16, angles=2, bound=bound)
    target = 50 * torch.randn(4, 32)  # far away: pushes z to its bounds and rotates hard
    _step(tokens, lambda: ((tokens() - target) ** 2).sum(), steps=20)
    tokens.wrap_()
    E = tokens.E
    assert torch.allclose(E.T @ E, torch.eye(16), atol=1e-5)
    z = tokens.z()
    assert z.abs().max() <= 1.0 and z.abs().max() > 0.5
    assert tokens.theta.abs().max() <= math.pi


def test_clamp_freezes_a_coefficient_outside_the_box_and_tanh_does_not():
    for bound, frozen in (("clamp", True), ("tanh", False)):
        tokens = InjectedTokens(1, dim=8, rank=4, angles=0, bound=bound)
        with torch.no_grad():
            tokens.raw_z.fill_(3.0)
        tokens().sum().backward()
        assert (tokens.raw_z.grad.abs().sum() == 0) == frozen, bound


def test_rotation_preserves_norms_changes_output_and_passes_gradient():
    x = torch.randn(5, 32)
    theta = torch.full((5, 2), 0.7, requires_grad=True)
    y = rotate(x, theta, offset=3)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-3)
    y[:, 0].sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0
    # θ = 0 is the identity; one angle equals the explicit Givens matrix on its planes
    assert torch.allclose(rotate(x, torch.zeros(5, 1)), x)
    t = 0.3
    g = torch.eye(4)
    for a, b in ((0, 1), (2, 3)):
        g[a, a] = g[b, b] = math.cos(t)
        g[a, b], g[b, a] = -math.sin(t), math.sin(t)
    v = torch.randn(4)
    assert torch.allclose(rotate(v, torch.tensor([t])), g @ v, atol=1e-6)


def test_rotation_is_part_of_the_token():
    tokens = InjectedTokens(3, dim=16, rank=8, angles=2)
    flat = tokens.basis(tokens.z())
    out = tokens()
    assert torch.allclose(out.norm(dim=-1), flat.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(out, flat, atol=1e-3)


def test_wrap_angle_range():
    theta = torch.linspace(-20, 20, 101)
    wrapped = wrap_angle(theta)
    assert wrapped.min() >= -math.pi and wrapped.max() < math.pi
    assert torch.allclose(torch.cos(wrapped), torch.cos(theta), atol=1e-5)


def test_rank_above_width_names_the_key():
    with pytest.raises(ValueError, match="ipgo.rank"):
        InjectedTokens(2, dim=32, rank=300)


def test_conformity_is_zero_without_displacement_and_l1_otherwise():
    states = torch.randn(1, 7, 8)
    assert conformity(states, states) == 0
    prefix, suffix = torch.ones(2, 8), torch.ones(2, 8)
    cond = inject(states, prefix, suffix)
    expected = ((cond.mean(1) - states.mean(1)).abs().sum() / 8)
    assert torch.isclose(conformity(cond, states), expected)


@pytest.fixture(scope="module")
def tiny_text():
    from common.config import load_config
    from common.models import build_sd_pipeline

    pipe = build_sd_pipeline(load_config("tiny").model)
    return pipe.tokenizer, pipe.text_encoder


def test_layouts_shapes_and_truncation(tiny_text, caplog):
    tokenizer, text_encoder = tiny_text
    pad = PromptEncoder(tokenizer, text_encoder, "pad77", prefix=10, suffix=10)
    nopad = PromptEncoder(tokenizer, text_encoder, "nopad", prefix=10, suffix=10)
    dim = text_encoder.config.hidden_size
    prompt = "a red car"
    length = len(tokenizer(prompt).input_ids)
    enc = pad.encode(prompt)
    assert enc.states.shape == (1, 57, dim) and enc.uncond.shape == (1, 77, dim)
    enc = nopad.encode(prompt)
    assert enc.states.shape == (1, length, dim) and enc.uncond.shape == (1, length + 20, dim)
    tokens = PromptTokens(dim, rank=16)
    assert inject(enc.states, *tokens()).shape == enc.uncond.shape
    # the plain prompt, as SD encodes it: pad77 equals the diffusers tokenisation at 77
    plain = pad.encode(prompt, injected=False)
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.allclose(plain.states, text_encoder(ids)[0], atol=1e-6)
    long = " ".join(["word"] * 70)
    with caplog.at_level("WARNING"):
        enc = nopad.encode(long)
    assert enc.truncated and nopad.truncated == 1 and enc.states.shape[1] == 57 and "truncated" in caplog.text
    assert not nopad.encode(prompt).truncated and nopad.truncated == 1


@pytest.mark.parametrize("names", [["aesthetic"], ["clip"], ["aesthetic", "clip"]])
def test_differentiable_scorers_pass_gradient_and_match_no_grad(names):
    from scoring.scorers import build_scorers
    from common.config import load_config

    model = load_config("tiny").model
    grad_fn = build_scorers(names, model, differentiable=True, pixels="signed")
    plain_fn = build_scorers(names, model)
    images = (torch.rand(2, 3, 32, 32) * 1.6 - 0.8).requires_grad_(True)
    scores = grad_fn(images, ["a red car", "a dog"])
    total = sum(v.sum() for v in scores.values())
    total.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    reference = plain_fn((images.detach() / 2 + 0.5).clamp(0, 1), ["a red car", "a dog"])
    for key, value in reference.items():
        assert not value.requires_grad
        assert torch.allclose(scores[key].detach(), value, atol=1e-5)


def test_non_differentiable_scorer_is_refused():
    from scoring.scorers import UnknownScorerError, build_scorers
    from common.config import load_config

    with pytest.raises(UnknownScorerError, match="no differentiable path"):
        build_scorers(["imagereward"], load_config("tiny").model, differentiable=True)


def test_same_seed_same_tokens_whatever_the_global_rng():
    torch.manual_seed(1)
    a = PromptTokens(32, rank=16, seed=3)
    torch.manual_seed(2)
    b = PromptTokens(32, rank=16, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert not torch.equal(PromptTokens(32, rank=16, seed=4)()[0], a()[0])


def test_differentiable_hps_without_its_package_names_it():
    import importlib.util

    from scoring.scorers import ScorerUnavailableError, build_scorers
    from common.config import load_config

    if importlib.util.find_spec("hpsv2") is not None:
        pytest.skip("hpsv2 is installed here")
    with pytest.raises(ScorerUnavailableError, match="hpsv2"):
        build_scorers(["hps"], load_config("tiny").model, differentiable=True)


def test_defaults_are_the_configs_and_from_config_passes_every_field():
    from common.sections_eval import IpgoConfig

    cfg = IpgoConfig()  # the notebook's: 10 + 10 tokens, rank 300, 2 rotation angles, seed 0
    default, configured = PromptTokens(320).state_dict(), PromptTokens.from_config(cfg, 320).state_dict()
    assert default.keys() == configured.keys()
    assert all(torch.equal(default[k], configured[k]) for k in default)
    seeded = PromptTokens.from_config(cfg.model_copy(update={"seed": 5, "rank": 8}), 320)()
    assert all(torch.equal(x, y) for x, y in zip(seeded, PromptTokens(320, rank=8, seed=5)()))
