"""GFlowNet objectives for autoregressive rewrites, as pure functions of padded (B, T) tensors.

Conventions shared by every function here. B trajectories, T response steps; step t (0 ≤ t < T)
is the action y_{t+1} taken in state s_t = (x, y_≤t), with s_0 = x. `mask[b, t]` is 1 for valid
steps, left-aligned; the last valid step emits EOS (or hits the length cap) and leads to the
terminal state. Inputs are already tempered (see `temper`):

    log_pf[t]            = log P_F(y_{t+1} | s_t)                the policy, at temperature 1
    log_flow[t]          = log F̃(s_t)                            the learned (forward-looking) log-flow
    ref_logprobs[t]      = log p_ref(y_{t+1} | s_t) / (γ τ)      per-token reference energy
    log_reward_terminal  = (r/β + length penalty) / τ            (B,)

so that the sampling target is p(y | x) ∝ [p_ref(y | x)^(1/γ) · exp(r/β)]^(1/τ).

Padded positions may hold anything (NaN included): every masked value is selected away with
`torch.where`, never multiplied by 0, so garbage in padding reaches neither the loss nor the
gradients. A non-finite loss from *valid* positions is returned as is; `check_finite` lets the
caller count and skip it.
"""
from __future__ import annotations

import torch
from torch import Tensor

OBJECTIVES = ("fl-db", "db", "tb")


# ---------------------------------------------------------------- checks and helpers

def _as_mask(mask: Tensor, shape: torch.Size) -> Tensor:
    """Bool (B, T) mask; raises if the shape is wrong, the mask is not left-aligned, or a row is empty."""
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(shape)} like log_pf")
    mask = mask.bool()
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"mask rows {torch.nonzero(lengths == 0).flatten().tolist()} have no valid step")
    steps = torch.arange(shape[-1], device=mask.device)
    if not torch.equal(mask, steps < lengths[:, None]):
        raise ValueError("mask must be left-aligned: 1 for steps 0..len-1, then 0 (right padding)")
    return mask


def _check_bt(name: str, value: Tensor, shape: torch.Size) -> None:
    if value.shape != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected (B, T) = {tuple(shape)} like log_pf")


def _check_b(name: str, value: Tensor, batch: int) -> None:
    if value.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected (B,) = ({batch},)")


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_t values[:, t] over valid steps, (B,)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)


def check_finite(*tensors: Tensor) -> bool:
    """True when every element of every tensor is finite; the caller counts and skips the step otherwise."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------- tempering and length penalty

def min_length_penalty(num_tokens: Tensor, min_len: int, penalty: float) -> Tensor:
    """Additive log-reward penalty  −penalty · max(0, min_len − num_tokens),  (B,).

    `num_tokens` counts response tokens before EOS. The sampler already forbids EOS before
    `min_len`; the penalty covers trajectories from elsewhere (replay of older settings, SFT data).
    """
    short = (min_len - num_tokens).clamp(min=0).to(torch.get_default_dtype())
    return -penalty * short


def temper(
    ref_logprobs: Tensor,
    log_reward: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    tau: float,
    min_len: int = 0,
    len_penalty: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Raw stored quantities → the tempered inputs of the objectives.

        ref_logprobs[t]      ← log p_ref(y_{t+1} | s_t) / (γ τ)            (B, T), 0 at padding
        log_reward_terminal  ← (r/β − penalty · max(0, min_len − n)) / τ    (B,)

    `ref_logprobs` are raw reference log-probs and `log_reward` is r/β, as a Trajectory stores
    them; n = valid steps − 1 is the number of tokens before EOS.
    """
    if gamma <= 0 or tau <= 0:
        raise ValueError(f"gamma ({gamma}) and tau ({tau}) must be positive")
    mask = _as_mask(mask, ref_logprobs.shape)
    _check_b("log_reward", log_reward, ref_logprobs.shape[0])
    ref = torch.where(mask, ref_logprobs, torch.zeros_like(ref_logprobs)) / (gamma * tau)
    num_tokens = mask.sum(-1) - 1
    terminal = (log_reward + min_length_penalty(num_tokens, min_len, len_penalty).to(log_reward)) / tau
    return ref, terminal


# ---------------------------------------------------------------- detailed balance

def fl_db_residuals(
    log_pf: Tensor, log_flow: Tensor, ref_logprobs: Tensor, log_reward_terminal: Tensor, mask: Tensor
) -> Tensor:
    """Forward-looking detailed-balance residuals δ (B, T), 0 at padding.

        δ_t = log F̃(s_t) + log P_F(y_{t+1} | s_t) − log p_ref(y_{t+1} | s_t)/γ − log F̃(s_{t+1}),
        log F̃(s_T) := log_reward_terminal  at the terminal state (after the last valid step).

    The per-token reference energy is the "progressive reward decomposition": every intermediate
    state is credited with its share of log p_ref^(1/γ) instead of waiting for the terminal. The
    forward-looking flow relates to the plain DB flow by log F̃(s_t) = log F(s_t) − Σ_{i<t} ref_i.
    """
    shape = log_pf.shape
    if log_pf.dim() != 2:
        raise ValueError(f"log_pf has shape {tuple(shape)}; expected (B, T)")
    _check_bt("log_flow", log_flow, shape)
    _check_bt("ref_logprobs", ref_logprobs, shape)
    _check_b("log_reward_terminal", log_reward_terminal, shape[0])
    mask = _as_mask(mask, shape)

    is_last = torch.arange(shape[1], device=mask.device) == (mask.sum(-1, keepdim=True) - 1)  # (B, T)
    log_flow_next = torch.cat([log_flow[:, 1:], torch.zeros_like(log_flow[:, :1])], dim=1)  # (B, T)
    log_flow_next = torch.where(is_last, log_reward_terminal[:, None].to(log_flow), log_flow_next)
    delta = log_flow + log_pf - ref_logprobs - log_flow_next
    return torch.where(mask, delta, torch.zeros_like(delta))


def db_residuals(
    log_pf: Tensor, log_flow: Tensor, ref_logprobs: Tensor, log_reward_terminal: Tensor, mask: Tensor
) -> Tensor:
    """Plain detailed-balance residuals δ (B, T) — the "no decomposition" ablation.

        δ_t = log F(s_t) + log P_F(y_{t+1} | s_t) − log F(s_{t+1}),
        log F(s_T) := log R(y) = log_reward_terminal + Σ_t log p_ref(y_{t+1} | s_t)/γ.

    Same target as FL-DB, but intermediate states carry no energy: the whole log-reward, reference
    part included, sits at the terminal. (P_B = 1: each state of a sequence has one parent.)
    """
    mask_b = _as_mask(mask, log_pf.shape)
    _check_bt("ref_logprobs", ref_logprobs, log_pf.shape)
    log_reward = log_reward_terminal + _masked_sum(ref_logprobs, mask_b)
    return fl_db_residuals(log_pf, log_flow, torch.zeros_like(log_pf), log_reward, mask_b)


def tb_residuals(
    log_z: Tensor, log_pf: Tensor, ref_logprobs: Tensor, log_reward_terminal: Tensor, mask: Tensor
) -> Tensor:
    """Trajectory-balance residuals (B,) — the vanilla-GFlowNet baseline.

        δ = log Z(x) + Σ_t log P_F(y_{t+1} | s_t) − Σ_t log p_ref(y_{t+1} | s_t)/γ − log_reward_terminal.

    The FL-DB residuals of a trajectory telescope to this with log Z(x) = log F̃(s_0).
    """
    if log_pf.dim() != 2:
        raise ValueError(f"log_pf has shape {tuple(log_pf.shape)}; expected (B, T)")
    _check_bt("ref_logprobs", ref_logprobs, log_pf.shape)
    _check_b("log_z", log_z, log_pf.shape[0])
    _check_b("log_reward_terminal", log_reward_terminal, log_pf.shape[0])
    mask = _as_mask(mask, log_pf.shape)
    return log_z + _masked_sum(log_pf - ref_logprobs, mask) - log_reward_terminal


# ---------------------------------------------------------------- losses

def fl_db_loss(
    log_pf: Tensor, log_flow: Tensor, ref_logprobs: Tensor, log_reward_terminal: Tensor, mask: Tensor
) -> Tensor:
    """L = mean_b Σ_t δ_t²  with δ from `fl_db_residuals`."""
    return fl_db_residuals(log_pf, log_flow, ref_logprobs, log_reward_terminal, mask).pow(2).sum(-1).mean()


def db_loss(
    log_pf: Tensor, log_flow: Tensor, ref_logprobs: Tensor, log_reward_terminal: Tensor, mask: Tensor
) -> Tensor:
    """L = mean_b Σ_t δ_t²  with δ from `db_residuals`."""
    return db_residuals(log_pf, log_flow, ref_logprobs, log_reward_terminal, mask).pow(2).sum(-1).mean()


def tb_loss(log_z: Tensor, log_pf: Tensor, ref_logprobs: Tensor, log_reward_terminal: Tensor, mask: Tensor) -> Tensor:
    """L = mean_b δ²  with δ from `tb_residuals`."""
    return tb_residuals(log_z, log_pf, ref_logprobs, log_reward_terminal, mask).pow(2).mean()


def gflownet_loss(
    objective: str, log_pf: Tensor, log_flow: Tensor, ref_logprobs: Tensor, log_reward_terminal: Tensor, mask: Tensor
) -> Tensor:
    """The learner's objective switch: "fl-db" (PAG), "db" (no decomposition) or "tb" (vanilla GFlowNet).

    TB reads its learned log Z(x) from the flow head at the initial state, log_flow[:, 0] = log F̃(s_0),
    so every objective trains the same modules.
    """
    if objective == "fl-db":
        return fl_db_loss(log_pf, log_flow, ref_logprobs, log_reward_terminal, mask)
    if objective == "db":
        return db_loss(log_pf, log_flow, ref_logprobs, log_reward_terminal, mask)
    if objective == "tb":
        return tb_loss(log_flow[:, 0], log_pf, ref_logprobs, log_reward_terminal, mask)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def reinforce_loss(
    log_pf: Tensor,
    reward: Tensor,
    mask: Tensor,
    *,
    baseline: Tensor | float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Reward maximisation by the score-function estimator (the RL / Promptist-style baseline).

        A = r − kl_coef · Σ_t (log P_F − log p_ref) − b,      L = −mean_b [ A · Σ_t log P_F(y_{t+1} | s_t) ]

    with A held constant (no gradient). `baseline` b defaults to the batch mean of the shaped reward
    (0 for a batch of one). `ref_logprobs` are raw reference log-probs, needed only when kl_coef > 0.
    Samples must come from the current policy (on-policy), unlike the balance objectives.
    """
    if log_pf.dim() != 2:
        raise ValueError(f"log_pf has shape {tuple(log_pf.shape)}; expected (B, T)")
    _check_b("reward", reward, log_pf.shape[0])
    mask = _as_mask(mask, log_pf.shape)
    log_p = _masked_sum(log_pf, mask)  # (B,) log P_F(y | x)
    shaped = reward.detach().to(log_p)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("reinforce_loss: kl_coef > 0 needs ref_logprobs")
        _check_bt("ref_logprobs", ref_logprobs, log_pf.shape)
        shaped = shaped - kl_coef * (log_p - _masked_sum(ref_logprobs, mask)).detach()
    if baseline is None:
        baseline = shaped.mean() if shaped.numel() > 1 else 0.0
    advantage = (shaped - baseline).detach()
    return -(advantage * log_p).mean()
