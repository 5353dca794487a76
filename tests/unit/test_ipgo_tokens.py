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


# ------------------------------------------------------------------ from the mutation pass (docs/mutation.md)

def test_givens_pairs_are_the_documented_planes():
    from ipgo.tokens import givens_pairs

    a, b = givens_pairs(8, 0)
    assert a.tolist() == [0, 2, 4, 6] and b.tolist() == [1, 3, 5, 7]
    a, b = givens_pairs(8, 3)  # ((2j + 3) mod 8, (2j + 4) mod 8)
    assert a.tolist() == [3, 5, 7, 1] and b.tolist() == [4, 6, 0, 2]
    with pytest.raises(ValueError, match="^Givens rotations pair coordinates: the text dimension must be even, got 7$"):
        givens_pairs(7, 0)


def _rotation_matrix(dim: int, angle: float, shift: int) -> torch.Tensor:
    """The Givens rotation of the module docstring, built coordinate by coordinate."""
    r = torch.eye(dim, dtype=torch.float64)
    for j in range(dim // 2):
        a, b = (2 * j + shift) % dim, (2 * j + 1 + shift) % dim
        r[a, a], r[a, b], r[b, a], r[b, b] = math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)
    return r


def test_each_token_rotates_the_planes_its_index_starts():
    tokens = InjectedTokens(2, dim=8, rank=4, angles=1, bound="clamp", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens.theta.copy_(torch.tensor([[0.7], [-1.1]]))
        flat = tokens.basis(tokens.z()).double()
        out = tokens().double()
    # token 1 rotates the odd pairs (1, 2), (3, 4), … — the notebook's start_dim
    for i, angle in enumerate((0.7, -1.1)):
        assert torch.allclose(out[i], _rotation_matrix(8, angle, i) @ flat[i], atol=1e-5), i


@pytest.mark.parametrize("num_tokens, angles", [(1, 1), (3, 1), (2, 2)])
def test_any_rotation_angle_changes_the_tokens(num_tokens, angles):
    tokens = InjectedTokens(num_tokens, dim=8, rank=4, angles=angles, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens.theta.fill_(0.9)
        assert not torch.allclose(tokens(), tokens.basis(tokens.z()), atol=1e-3)
        tokens.theta.zero_()
        assert torch.allclose(tokens(), tokens.basis(tokens.z()), atol=1e-6)


def test_injected_tokens_defaults_and_messages():
    tokens = InjectedTokens(2, dim=768)
    assert (tokens.rank, tokens.theta.shape, tokens.bound) == (300, (2, 2), "tanh")
    assert InjectedTokens(1, dim=16, rank=16).E.shape == (16, 16)  # rank = width is allowed
    with pytest.raises(ValueError, match=r"^ipgo.rank \(17\) must be at most the text encoder's width \(16\): "
                                         r"E has orthonormal columns$"):
        InjectedTokens(1, dim=16, rank=17)
    with pytest.raises(ValueError, match="^ipgo.bound must be 'tanh' or 'clamp', not 'sigmoid'$"):
        InjectedTokens(1, dim=16, rank=4, bound="sigmoid")


@pytest.mark.parametrize("bound", ["tanh", "clamp"])
def test_start_is_the_notebooks_uniform_draws(bound):
    """z ~ U(−1, 1) (kept inside ±0.99 under tanh), θ ~ U(−π, π), b ~ U(−1/√r, 1/√r)."""
    rank = 16
    tokens = InjectedTokens(64, dim=32, rank=rank, angles=8, bound=bound, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z, theta, b = tokens.z(), tokens.theta, tokens.b
    edge = 0.99 if bound == "tanh" else 1.0
    assert z.min() >= -edge - 1e-6 and z.max() <= edge + 1e-6
    assert z.min() < -0.9 and z.max() > 0.9 and abs(float(z.mean())) < 0.1
    assert float((z.abs() >= edge - 1e-6).float().mean()) < 0.05  # a U(−1, 1) draw, not values piled at the edges
    if bound == "tanh":
        assert z.min() == pytest.approx(-0.99, abs=1e-5) and z.max() == pytest.approx(0.99, abs=1e-5)
    assert theta.min() >= -math.pi and theta.max() < math.pi and theta.min() < -2.5 and theta.max() > 2.5
    assert b.abs().max() <= 1 / math.sqrt(rank) and b.min() < -0.5 / math.sqrt(rank) and b.max() > 0.5 / math.sqrt(rank)


def test_the_generator_alone_decides_e_z_theta_and_b():
    """The default generator is seeded 0; the global RNG never reaches E, z, θ or b (PromptTokens seeds it as well,
    for the orthogonal parametrisation's own use of it)."""
    def draws(tokens):
        return [t.detach().clone() for t in (tokens.E, tokens.raw_z, tokens.theta, tokens.b)]

    torch.manual_seed(5)
    default_a = draws(InjectedTokens(3, dim=16, rank=8))
    torch.manual_seed(6)
    default_b = draws(InjectedTokens(3, dim=16, rank=8))
    torch.manual_seed(7)
    seeded = draws(InjectedTokens(3, dim=16, rank=8, generator=torch.Generator().manual_seed(0)))
    for x, y, s in zip(default_a, default_b, seeded):
        assert torch.equal(x, y) and torch.equal(x, s)
    torch.manual_seed(5)
    other = draws(InjectedTokens(3, dim=16, rank=8, generator=torch.Generator().manual_seed(1)))
    assert not any(torch.equal(x, y) for x, y in zip(default_a, other))


def test_prompt_tokens_draw_prefix_then_suffix_from_one_generator_and_export_both():
    tokens = PromptTokens(16, prefix=2, suffix=3, rank=8, seed=4)
    gen = torch.Generator().manual_seed(4)
    prefix = InjectedTokens(2, 16, 8, 2, "tanh", gen)
    suffix = InjectedTokens(3, 16, 8, 2, "tanh", gen)  # continues the prefix's generator
    assert torch.equal(tokens.prefix.raw_z, prefix.raw_z) and torch.equal(tokens.suffix.raw_z, suffix.raw_z)
    assert torch.equal(tokens.suffix.theta, suffix.theta) and torch.equal(tokens.suffix.b, suffix.b)
    exported = tokens.export()
    assert sorted(exported) == ["prefix", "suffix"]
    with torch.no_grad():
        assert torch.equal(exported["prefix"], tokens.prefix()) and torch.equal(exported["suffix"], tokens.suffix())
    assert exported["suffix"].shape == (3, 16) and exported["suffix"].dtype == torch.float32


def test_a_side_with_no_tokens_is_empty():
    """ipgo.prefix_tokens or suffix_tokens may be 0 (tokens on one side only): that side is a (0, d) tensor."""
    assert InjectedTokens(0, dim=8, rank=4, angles=2)().shape == (0, 8)
    assert PromptTokens(8, prefix=0, suffix=2, rank=4)()[0].shape == (0, 8)
