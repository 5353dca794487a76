"""PPO maths as properties: the clip is inactive inside the trust region, the KL term vanishes when
the policy is the reference, GAE matches brute force (λ = 1: return minus value; λ = 0: TD error),
whitening, the value clip, the adaptive KL controller, the value head and block freezing."""
import math

import pytest
import torch

from learner import ppo

torch.manual_seed(0)
B, T = 4, 6


def _mask(lengths=(6, 3, 1, 4)) -> torch.Tensor:
    return torch.arange(T) < torch.tensor(lengths)[:, None]


def _brute_gae(rewards, values, lengths, gamma, lam):
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                v_next = float(values[b, k + 1]) if k + 1 < n else 0.0
                delta = float(rewards[b, k]) + gamma * v_next - float(values[b, k])
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.9, 0.5), (1.0, 0.0)])
def test_gae_matches_brute_force(gamma, lam):
    lengths = (6, 3, 1, 4)
    mask = _mask(lengths)
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    expected = _brute_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-10)
    assert torch.allclose(ret, torch.where(mask, expected + values, torch.zeros_like(values)), atol=1e-10)
    assert bool((adv[~mask] == 0).all())


def test_gae_with_lambda_one_is_return_minus_value():
    mask = _mask()
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = torch.where(mask, rewards, torch.zeros_like(rewards)).flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(adv, torch.where(mask, to_go - values, torch.zeros_like(values)), atol=1e-10)
    assert torch.allclose(ret, torch.where(mask, to_go, torch.zeros_like(to_go)), atol=1e-10)


def test_padding_garbage_reaches_nothing():
    mask = _mask()
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    dirty_r, dirty_v = rewards.masked_fill(~mask, float("nan")), values.masked_fill(~mask, 1e6)
    assert torch.equal(ppo.gae(rewards, values, mask)[0], ppo.gae(dirty_r, dirty_v, mask)[0])
    log_pf = torch.randn(B, T, requires_grad=True)
    adv = ppo.whiten(torch.randn(B, T), mask)
    loss, _ = ppo.policy_loss(log_pf, log_pf.detach().masked_fill(~mask, float("nan")), adv, mask)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(log_pf.grad).all())


def test_token_rewards_kl_is_zero_when_policy_is_reference():
    mask = _mask()
    ref = -torch.rand(B, T) * 3
    score = torch.tensor([1.0, -2.0, 0.5, 3.0])
    rewards, kl = ppo.token_rewards(score, ref.clone(), ref, mask, kl_coef=0.7)
    assert bool((kl == 0).all())
    last = mask.sum(-1) - 1
    expected = torch.zeros(B, T)
    expected[torch.arange(B), last] = score
    assert torch.equal(rewards, expected), "only the sequence reward, at the last valid step"


def test_token_rewards_penalise_each_token_by_its_kl():
    mask = _mask()
    ref, log_pf = -torch.rand(B, T) * 3, -torch.rand(B, T) * 3
    rewards, kl = ppo.token_rewards(torch.zeros(B), log_pf, ref, mask, kl_coef=0.2)
    assert torch.allclose(kl, torch.where(mask, log_pf - ref, torch.zeros(B, T)))
    assert torch.allclose(rewards, -0.2 * kl)


def test_clip_inactive_inside_the_trust_region_equals_the_unclipped_surrogate():
    mask = _mask()
    old = -torch.rand(B, T) * 3
    log_pf = (old + (torch.rand(B, T) - 0.5) * 0.3).requires_grad_(True)  # |log ρ| ≤ 0.15 → ρ ∈ (0.86, 1.17)
    adv = torch.randn(B, T)
    loss, info = ppo.policy_loss(log_pf, old, adv, mask, clip=0.2)
    (grad,) = torch.autograd.grad(loss, log_pf)
    ref_logpf = log_pf.detach().clone().requires_grad_(True)
    ratio = (ref_logpf - old).exp()
    unclipped = -(adv * ratio)[mask].mean()
    (ref_grad,) = torch.autograd.grad(unclipped, ref_logpf)
    assert loss.item() == pytest.approx(unclipped.item(), abs=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-7)
    assert float(info["clipfrac"]) == 0.0


def test_at_ratio_one_the_gradient_is_the_policy_gradient():
    mask = _mask()
    log_pf = (-torch.rand(B, T)).requires_grad_(True)
    adv = torch.randn(B, T)
    loss, _ = ppo.policy_loss(log_pf, log_pf.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, log_pf)
    expected = torch.where(mask, -adv / mask.sum(), torch.zeros(B, T))  # −mean_t Â_t ∇ log π
    assert torch.allclose(grad, expected, atol=1e-7)


def test_clip_binds_outside_the_trust_region():
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.zeros(1, 2)
    log_pf = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])  # both moved past the clip in the direction the advantage favours
    loss, info = ppo.policy_loss(log_pf, old, adv, mask, clip=0.2)
    (grad,) = torch.autograd.grad(loss, log_pf)
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2)
    assert torch.equal(grad, torch.zeros_like(grad)), "no push beyond the trust region"
    assert float(info["clipfrac"]) == 1.0
    adv_against = -adv  # moved the wrong way: the unclipped (larger) loss stands and has a gradient
    loss2, info2 = ppo.policy_loss(log_pf, old, adv_against, mask, clip=0.2)
    assert loss2.item() == pytest.approx((1.5 - 0.5) / 2) and float(info2["clipfrac"]) == 0.0


def test_value_loss_clip_inactive_near_old_values_and_active_far():
    mask = _mask()
    old, ret = torch.randn(B, T), torch.randn(B, T)
    near = old + (torch.rand(B, T) - 0.5) * 0.3
    loss, info = ppo.value_loss(near, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(float(0.5 * ((near - ret) ** 2)[mask].mean()), abs=1e-6)
    assert float(info["value_clipfrac"]) == 0.0
    far = torch.tensor([[5.0]], requires_grad=True)  # moved past the clip, towards a return of 5
    loss, info = ppo.value_loss(far, torch.zeros(1, 1), torch.full((1, 1), 5.0), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.5 * (0.2 - 5.0) ** 2) and float(info["value_clipfrac"]) == 1.0


def test_ppo_loss_combines_with_the_value_coefficient():
    mask = _mask()
    log_pf, old = -torch.rand(B, T), -torch.rand(B, T)
    v, v_old, adv, ret = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    loss, info = ppo.ppo_loss(log_pf, v, old, v_old, adv, ret, mask, value_coef=2.3)
    assert loss.item() == pytest.approx(float(info["policy_loss"] + 2.3 * info["value_loss"]), abs=1e-6)


def test_whiten_has_zero_mean_unit_std_over_valid_tokens():
    mask = _mask()
    values = (torch.randn(B, T) * 5 + 3).masked_fill(~mask, float("nan"))
    out = ppo.whiten(values, mask)
    assert float(out[mask].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out[mask].std()) == pytest.approx(1.0, abs=1e-4)
    assert bool((out[~mask] == 0).all())
    kept = ppo.whiten(values, mask, shift_mean=False)
    assert float(kept[mask].mean()) == pytest.approx(float(values[mask].mean()), abs=1e-4)


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKLController(init=0.2, target=0.2, horizon=10_000)
    assert ctl.update(0.2, 256) == pytest.approx(0.2), "at target: unchanged"
    assert ctl.update(10.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000)), "error clipped at +0.2"
    high = ctl.value
    assert ctl.update(0.0, 256) == pytest.approx(high * (1 - 0.2 * 256 / 10_000)), "error clipped at −0.2"
    state = ctl.state_dict()
    other = ppo.AdaptiveKLController()
    other.load_state_dict(state)
    assert other.value == ctl.value
    fixed = ppo.AdaptiveKLController(init=0.3, target=None)
    assert fixed.update(100.0, 256) == 0.3
    with pytest.raises(ValueError, match="horizon"):
        ppo.AdaptiveKLController(horizon=0)


def test_value_head_shape_and_detached_features():
    head = ppo.ValueHead(8)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    v = head(hidden)
    assert v.shape == (3, 5)
    v.sum().backward()
    assert hidden.grad is None and all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match=r"expected \(B, T, 8\)"):
        head(torch.randn(3, 8))


def test_freeze_lower_blocks_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    policy = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    everything = ppo.freeze_lower_blocks(policy, None)
    assert len(everything) == len(list(policy.parameters()))
    trainable = ppo.freeze_lower_blocks(policy, 2)
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("transformer.h.2.", "transformer.h.3.", "transformer.ln_f.")) for n in names)
    assert len(trainable) == len(names)
    assert not policy.lm_head.weight.requires_grad, "tied to the frozen embedding"
    with pytest.raises(ValueError, match="trainable_blocks = 5"):
        ppo.freeze_lower_blocks(policy, 5)
