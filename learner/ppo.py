"""The reward-maximising baseline: Promptist-style PPO, as pure functions of padded (B, T) tensors.

Same layout as `learner.losses`: step t is the action y_{t+1} in state s_t, `mask` is left-aligned
and the last valid step is the one that ends the rewrite. The recipe is the one Promptist trained
with (LMOps promptist/diff_prompter/configs/ppo_config_a100_coco_bsz256_kl0.2.yml, trlx PPO):

    kl_t      = log π_old(y_{t+1} | s_t) − log p_ref(y_{t+1} | s_t)                per-token KL sample
    r_t       = −β_KL · kl_t  (+ r(y) at the last step)                             `token_rewards`
    δ_t       = r_t + γ V(s_{t+1}) − V(s_t),   V(s_T) := 0                          `gae`
    A_t       = Σ_{l ≥ 0} (γλ)^l δ_{t+l},      R_t = A_t + V(s_t)    (γ = 1, λ = 0.95)
    Â_t       = (A_t − mean A) / std A   over valid tokens                         `whiten`
    ρ_t       = exp(log π_θ − log π_old)
    L_pg      = mean_t max(−Â_t ρ_t, −Â_t clip(ρ_t, 1 − ε, 1 + ε))   (ε = 0.2)      `policy_loss`
    L_v       = ½ mean_t max((V_θ − R_t)², (clip(V_θ, V_old ± ε_v) − R_t)²)  (ε_v = 0.2)  `value_loss`
    L         = L_pg + c_v · L_v                                       (c_v = 2.3)  `ppo_loss`

β_KL follows the adaptive controller of Ziegler et al. (2019) (`AdaptiveKLController`: initial 0.2,
target 0.2, horizon 10,000). π_old, V_old, the rewards and the advantages are fixed for the epochs
over one batch; only log π_θ and V_θ carry gradients. Means are over valid tokens of the batch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from learner.losses import _as_mask, _check_b, _check_bt


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the valid (True) entries of `mask`; padding may hold anything."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum()


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(values − mean) / std over the valid entries (unbiased variance), 0 at padding.

    With shift_mean=False the mean is added back (trlx's option for rewards); advantages use True."""
    mask = mask.bool()
    mean = _masked_mean(values, mask)
    n = mask.sum()
    var = torch.where(mask, (values - mean) ** 2, torch.zeros_like(values)).sum() / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


def token_rewards(score: Tensor, log_pf_old: Tensor, ref_logprobs: Tensor, mask: Tensor,
                  kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards r_t = −β_KL · kl_t, plus the sequence reward `score` (B,) at the last valid step.

    Returns (rewards, kl), both (B, T) and 0 at padding. `ref_logprobs` are raw reference log-probs
    (the ones every Trajectory stores); kl_t = log π_old − log p_ref is the per-token KL sample.
    """
    shape = log_pf_old.shape
    if log_pf_old.dim() != 2:
        raise ValueError(f"log_pf_old has shape {tuple(shape)}; expected (B, T)")
    _check_bt("ref_logprobs", ref_logprobs, shape)
    _check_b("score", score, shape[0])
    mask = _as_mask(mask, shape)
    zero = torch.zeros_like(log_pf_old)
    kl = torch.where(mask, log_pf_old - ref_logprobs, zero)
    is_last = torch.arange(shape[1], device=mask.device) == (mask.sum(-1, keepdim=True) - 1)  # (B, T)
    rewards = -kl_coef * kl + torch.where(is_last, score[:, None].to(kl), zero)
    return torch.where(mask, rewards, zero), kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each rewrite's tokens; returns (advantages, returns), (B, T).

    V after the last valid step is 0 (the rewrite is over). With λ = 1 and γ = 1 the advantage is the
    reward-to-go minus V(s_t); with λ = 0 it is the one-step TD error. Padding returns 0.
    """
    shape = rewards.shape
    _check_bt("values", values, shape)
    mask = _as_mask(mask, shape)
    zero = torch.zeros_like(rewards)
    rewards, values = torch.where(mask, rewards, zero), torch.where(mask, values, zero)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(shape[1])):  # padding has V = 0 and r = 0, so it contributes nothing
        next_value = values[:, t + 1] if t + 1 < shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(mask[:, t], delta + gamma * lam * last, torch.zeros_like(last))
        advantages[:, t] = last
    return advantages, torch.where(mask, advantages + values, zero)


def policy_loss(log_pf: Tensor, log_pf_old: Tensor, advantages: Tensor, mask: Tensor,
                clip: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate L_pg (scalar) and its diagnostics: clipfrac (fraction of valid tokens whose
    ratio left [1 − ε, 1 + ε] in the direction the clip binds) and approx_kl (½ mean (log ρ)²)."""
    shape = log_pf.shape
    _check_bt("log_pf_old", log_pf_old, shape)
    _check_bt("advantages", advantages, shape)
    mask = _as_mask(mask, shape)
    zero = torch.zeros_like(log_pf)
    log_ratio = torch.where(mask, log_pf - log_pf_old.detach(), zero)
    ratio = log_ratio.exp()
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = _masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        info = {"clipfrac": _masked_mean((clipped > unclipped).float(), mask),
                "approx_kl": _masked_mean(0.5 * log_ratio**2, mask)}
    return loss, info


def value_loss(values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor,
               clip: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss L_v = ½ mean_t max((V − R)², (clip(V, V_old ± ε_v) − R)²) and its clipfrac."""
    shape = values.shape
    _check_bt("values_old", values_old, shape)
    _check_bt("returns", returns, shape)
    mask = _as_mask(mask, shape)
    old, ret = values_old.detach(), returns.detach()
    clipped_values = old + (values - old).clamp(-clip, clip)
    loss1, loss2 = (values - ret) ** 2, (clipped_values - ret) ** 2
    loss = 0.5 * _masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        info = {"value_clipfrac": _masked_mean((loss2 > loss1).float(), mask)}
    return loss, info


def ppo_loss(log_pf: Tensor, values: Tensor, log_pf_old: Tensor, values_old: Tensor, advantages: Tensor,
             returns: Tensor, mask: Tensor, *, clip: float = 0.2, value_clip: float = 0.2,
             value_coef: float = 2.3) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_pg + c_v · L_v, with every diagnostic (detached) by name."""
    pg, pg_info = policy_loss(log_pf, log_pf_old, advantages, mask, clip)
    vf, vf_info = value_loss(values, values_old, returns, mask, value_clip)
    info = {"policy_loss": pg.detach(), "value_loss": vf.detach(), **pg_info, **vf_info}
    return pg + value_coef * vf, info


class AdaptiveKLController:
    """β_KL ← β_KL · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)   (Ziegler et al., 2019).

    `update(kl, n)` after each batch: `kl` is the batch mean of Σ_t kl_t, `n` the trajectories in it.
    target=None keeps β_KL fixed. The state is two numbers, saved in the learner's checkpoint."""

    def __init__(self, init: float = 0.2, target: float | None = 0.2, horizon: int = 10_000) -> None:
        if init < 0 or horizon <= 0 or (target is not None and target <= 0):
            raise ValueError(f"KL controller: init ({init}) ≥ 0, target ({target}) > 0 and horizon ({horizon}) > 0")
        self.value, self.target, self.horizon = float(init), target, int(horizon)

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class ValueHead(nn.Module):
    """V(s_t) (B, T) from the policy's final hidden states (B, T, H): Linear(H, 2H) → ReLU → Linear(2H, 1),
    the value head of Promptist's trlx (`make_head`).

    Hidden states are detached: Promptist kept a separate value network (`share_network: False`), so
    the value loss (×2.3) never shaped the policy's features; reading detached features of the policy
    gives the same separation without a second GPT-2."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.net = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1))

    def forward(self, state_hidden: Tensor) -> Tensor:
        if state_hidden.dim() != 3 or state_hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"state_hidden has shape {tuple(state_hidden.shape)}; expected (B, T, {self.hidden_size})")
        h = state_hidden.detach().to(self.net[0].weight.dtype)
        return self.net(h).squeeze(-1)  # (B, T)


def freeze_lower_blocks(policy: nn.Module, trainable_blocks: int | None) -> list[nn.Parameter]:
    """Leave only the top `trainable_blocks` transformer blocks (and the final LayerNorm) trainable.

    None: everything trains. The token embedding is frozen with the lower blocks, and GPT-2 ties it to
    the LM head, so the output projection stays at the reference's too (as in Promptist's trlx, whose
    `num_layers_unfrozen: 2` trains `transformer.h[-2:]`). Returns the parameters left trainable."""
    if trainable_blocks is None:
        return [p for p in policy.parameters() if p.requires_grad]
    blocks = policy.transformer.h
    if not 0 < trainable_blocks <= len(blocks):
        raise ValueError(f"learner.trainable_blocks = {trainable_blocks}: the policy has {len(blocks)} blocks; "
                         f"choose 1..{len(blocks)} or null (all)")
    for p in policy.parameters():
        p.requires_grad_(False)
    for module in [*blocks[len(blocks) - trainable_blocks:], policy.transformer.ln_f]:
        for p in module.parameters():
            p.requires_grad_(True)
    return [p for p in policy.parameters() if p.requires_grad]
