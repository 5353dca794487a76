"""Exactness check on an enumerable problem: do the project's objectives sample ∝ the target?

    python bench/toy.py --objective fl-db|db|tb|reinforce|ppo --seed S [--steps N]

The space: 4 tokens + EOS, responses of 1..4 tokens then EOS (EOS forbidden at the first step,
forced after the fourth token): 4 + 16 + 64 + 256 = 340 sequences, 341 non-terminal states.
A fixed random reference policy p_ref (same EOS rule) and a random reward r(y) ∈ [0, 1] define

    target(y) ∝ p_ref(y)^(1/γ) · exp(r(y)/β).

The policy is tabular (one logit vector per state), as are log F̃ (one value per state) and log Z,
so any gap to the target is the objective's, not the function approximator's. Batches are sampled
from the policy at an annealed sampling temperature, τ is annealed 2 → 1 over the first half, and
the loss comes from `learner.losses` exactly as in the learner. REINFORCE maximises r on-policy:
it finds high reward and collapses. PPO (`learner.ppo`, the Promptist recipe: 4 epochs per batch,
clip 0.2, tabular value with clip 0.2 and coefficient 2.3, GAE γ = 1 λ = 0.95, per-token KL penalty
to p_ref under the adaptive controller 0.2 / 0.2 / 10,000) maximises r too. Prints one JSON line with the total-variation distance between
the trained policy's exact distribution and the target, its entropy and mean reward.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from learner import losses, ppo
from common.schedules import linear_anneal

NUM_TOKENS = 4  # non-EOS tokens 0..3
EOS = NUM_TOKENS  # action index of EOS
MAX_TOKENS = 4  # EOS is forced after this many tokens
T_MAX = MAX_TOKENS + 1  # steps of the longest trajectory
OBJECTIVES = (*losses.OBJECTIVES, "reinforce", "ppo")
PPO_EPOCHS = 4


@dataclass
class Problem:
    """Every trajectory of the space, as padded tables, plus the reference, reward and target."""

    actions: Tensor  # (N, T_MAX) action at step t (EOS as padding)
    states: Tensor  # (N, T_MAX) index of state s_t (0 as padding)
    mask: Tensor  # (N, T_MAX) bool, valid steps
    allowed: Tensor  # (S, 5) bool, legal actions per state
    ref_log_pf: Tensor  # (S, 5) log p_ref(a | s), −inf where illegal
    reward: Tensor  # (N,) r(y) in [0, 1]
    beta: float
    gamma: float

    @property
    def num_states(self) -> int:
        return self.allowed.shape[0]

    def log_reward(self) -> Tensor:
        """r/β, as a Trajectory stores it."""
        return self.reward / self.beta

    def ref_logprobs(self) -> Tensor:
        """(N, T_MAX) raw log p_ref(y_{t+1} | s_t), 0 at padding."""
        return sequence_step_logprobs(self.ref_log_pf, self)

    def target(self) -> Tensor:
        """(N,) target distribution ∝ p_ref^(1/γ) · exp(r/β)."""
        return torch.softmax(self.ref_logprobs().sum(-1) / self.gamma + self.log_reward(), dim=0)


def build_problem(seed: int, beta: float = 0.25, gamma: float = 1.0, ref_scale: float = 1.5) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    offsets = [sum(NUM_TOKENS**k for k in range(n)) for n in range(MAX_TOKENS + 1)]  # first index per prefix length
    num_states = offsets[-1] + NUM_TOKENS**MAX_TOKENS

    allowed = torch.ones(num_states, NUM_TOKENS + 1, dtype=torch.bool)
    allowed[0, EOS] = False  # EOS forbidden at the first step
    allowed[offsets[MAX_TOKENS]:, :EOS] = False  # only EOS after MAX_TOKENS tokens

    actions, states, num_steps = [], [], []
    for length in range(1, MAX_TOKENS + 1):
        for code in range(NUM_TOKENS**length):
            tokens = [(code // NUM_TOKENS**i) % NUM_TOKENS for i in reversed(range(length))]
            path, prefix = [], 0
            for n, tok in enumerate(tokens):
                path.append(offsets[n] + prefix)
                prefix = prefix * NUM_TOKENS + tok
            path.append(offsets[length] + prefix)  # the state where EOS is taken
            pad = T_MAX - (length + 1)
            actions.append(tokens + [EOS] * (1 + pad))
            states.append(path + [0] * pad)
            num_steps.append(length + 1)
    actions_t, states_t = torch.tensor(actions), torch.tensor(states)
    mask = torch.arange(T_MAX) < torch.tensor(num_steps)[:, None]

    ref_logits = ref_scale * torch.randn(num_states, NUM_TOKENS + 1, generator=gen)
    ref_log_pf = torch.log_softmax(ref_logits.masked_fill(~allowed, float("-inf")), dim=-1)
    reward = torch.rand(actions_t.shape[0], generator=gen)
    return Problem(actions_t, states_t, mask, allowed, ref_log_pf, reward, beta, gamma)


def sequence_step_logprobs(log_pf_table: Tensor, problem: Problem, rows: Optional[Tensor] = None) -> Tensor:
    """Per-step log-probs (B, T_MAX) of trajectories `rows` (default: all) under a (S, 5) table; 0 at padding."""
    idx = slice(None) if rows is None else rows
    states, actions, mask = problem.states[idx], problem.actions[idx], problem.mask[idx]
    picked = log_pf_table[states, actions]
    return torch.where(mask, picked, torch.zeros_like(picked))


def total_variation(p: Tensor, q: Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def entropy(p: Tensor) -> float:
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum())


@contextlib.contextmanager
def _one_thread():
    """Tensors of a few hundred elements: extra intra-op threads only add synchronisation (10× slower on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(objective: str, seed: int, steps: int = 1500, batch_size: int = 64, lr: float = 0.05,
          flow_lr: float = 0.1, kl_init: float = 0.2) -> dict:
    """Train a tabular policy with `objective` and measure it exactly against the target.
    `kl_init` is PPO's initial KL coefficient (0: no KL penalty at all)."""
    with _one_thread():
        return _train(objective, seed, steps, batch_size, lr, flow_lr, kl_init)


def _apply(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """One optimiser step on `loss`; a non-finite loss is skipped (False) and counted by the caller."""
    if not losses.check_finite(loss):
        return False
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return True


def _train(objective: str, seed: int, steps: int, batch_size: int, lr: float, flow_lr: float,
           kl_init: float) -> dict:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    problem = build_problem(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)

    logits = torch.zeros(problem.num_states, NUM_TOKENS + 1, requires_grad=True)
    log_flow_table = torch.zeros(problem.num_states, requires_grad=True)
    log_z = torch.zeros(1, requires_grad=True)
    value_table = torch.zeros(problem.num_states, requires_grad=True)  # PPO's V(s), tabular like log F̃
    optimizer = torch.optim.Adam([
        {"params": [logits], "lr": lr},
        {"params": [log_flow_table, log_z, value_table], "lr": flow_lr},
    ])
    kl_ctl = ppo.AdaptiveKLController(init=kl_init, target=0.2, horizon=10_000)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    ref_all, log_reward_all = problem.ref_logprobs(), problem.log_reward()
    anneal = steps // 2
    skipped = 0

    def policy_table(temperature: float = 1.0) -> Tensor:
        return torch.log_softmax((logits / temperature).masked_fill(~problem.allowed, float("-inf")), dim=-1)

    for step in range(steps):
        on_policy = objective in ("reinforce", "ppo")
        temperature = 1.0 if on_policy else linear_anneal(step, 2.0, 1.0, anneal)
        tau = 1.0 if on_policy else linear_anneal(step, 2.0, 1.0, anneal)
        decay = 1.0 - 0.9 * step / steps  # linear learning-rate decay to 10 %
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * decay

        with torch.no_grad():  # draw whole trajectories from the (tempered) policy, exactly
            behaviour = sequence_step_logprobs(policy_table(temperature), problem).sum(-1)
            rows = torch.multinomial(behaviour.softmax(0), batch_size, replacement=True, generator=gen)
        mask = problem.mask[rows]
        if objective == "ppo":
            skipped += _ppo_batch(problem, rows, policy_table, value_table, optimizer, kl_ctl, ref_all)
            continue
        log_pf = sequence_step_logprobs(policy_table(), problem, rows)  # (B, T)
        if on_policy:
            loss = losses.reinforce_loss(log_pf, problem.reward[rows], mask)
        else:
            ref, terminal = losses.temper(ref_all[rows], log_reward_all[rows], mask, gamma=problem.gamma, tau=tau)
            log_flow = torch.where(mask, log_flow_table[problem.states[rows]], torch.zeros(()))
            if objective == "tb":
                loss = losses.tb_loss(log_z.expand(len(rows)), log_pf, ref, terminal, mask)
            else:
                loss = losses.gflownet_loss(objective, log_pf, log_flow, ref, terminal, mask)
        skipped += not _apply(loss, optimizer)

    with torch.no_grad():
        policy = sequence_step_logprobs(policy_table(), problem).sum(-1).exp()  # (N,)
        target = problem.target()
        return {
            "objective": objective,
            "seed": seed,
            "steps": steps,
            "num_sequences": int(policy.numel()),
            "tv": round(total_variation(policy, target), 4),
            "entropy": round(entropy(policy), 4),
            "mean_reward": round(float((policy * problem.reward).sum()), 4),
            "target_entropy": round(entropy(target), 4),
            "target_mean_reward": round(float((target * problem.reward).sum()), 4),
            "max_reward": round(float(problem.reward.max()), 4),
            "log_z": round(float(log_z), 4) if objective == "tb" else None,
            "kl_coef": round(kl_ctl.value, 4) if objective == "ppo" else None,
            "ref_mean_reward": round(float((ref_all.sum(-1).exp() * problem.reward).sum()), 4),
            "kl_to_ref": round(float((policy * (policy.clamp_min(1e-30).log() - ref_all.sum(-1))).sum()), 4),
            "true_log_z": round(float(torch.logsumexp(ref_all.sum(-1) / problem.gamma + log_reward_all, 0)), 4),
            "skipped_nonfinite": skipped,
        }


def _ppo_batch(problem: Problem, rows: Tensor, policy_table, value_table: Tensor, optimizer, kl_ctl,
               ref_all: Tensor) -> int:
    """One PPO batch: freeze π_old, V_old, the KL-shaped rewards and the advantages, then PPO_EPOCHS
    updates on the whole batch. Returns the number of skipped (non-finite) updates."""
    mask = problem.mask[rows]
    states = problem.states[rows]
    with torch.no_grad():
        log_pf_old = sequence_step_logprobs(policy_table(), problem, rows)
        values_old = torch.where(mask, value_table[states], torch.zeros(()))
        rewards, kl = ppo.token_rewards(problem.reward[rows], log_pf_old, ref_all[rows], mask, kl_ctl.value)
        advantages, returns = ppo.gae(rewards, values_old, mask, gamma=1.0, lam=0.95)
        advantages = ppo.whiten(advantages, mask)
    skipped = 0
    for _ in range(PPO_EPOCHS):
        log_pf = sequence_step_logprobs(policy_table(), problem, rows)
        values = torch.where(mask, value_table[states], torch.zeros(()))
        loss, _ = ppo.ppo_loss(log_pf, values, log_pf_old, values_old, advantages, returns, mask)
        skipped += not _apply(loss, optimizer)
    kl_ctl.update(float(kl.sum(-1).mean()), len(rows))
    return skipped


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python bench/toy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", required=True, choices=OBJECTIVES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64, help="trajectories per step")
    parser.add_argument("--kl-init", type=float, default=0.2,
                        help="ppo: initial KL coefficient of the adaptive controller (0: no KL penalty)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = train(args.objective, args.seed, steps=args.steps, batch_size=args.batch_size, kl_init=args.kl_init)
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
