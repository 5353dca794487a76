"""What the Learner's loop asks of a learning objective (RLlib's new stack: one learner per objective).

The loop (`learner/learner.py`) is the same for every objective: collect micro-batches, step,
metrics, reactivation, publish weights, checkpoint. An objective brings the rest:

    param_groups()                   optimiser groups beside the policy's (the flow head, PPO's value head)
    plan(n, counters)                which trajectories a micro-batch needs (learner/collect.py): replay mix or on-policy
    update(batches, optimizer, step, diagnostics)
                                     its optimiser step(s) on the micro-batches → StepResult, None if non-finite;
                                     diagnostics=False (not a logging step) skips the metrics that cost compute
    probe(batch)                     the no-grad forward whose hidden units the dormant-ratio probe reads
    heads, state_dict()              checkpointed: `{name}.safetensors` per head, JSON state in state.json "extra"

    BalanceObjective   learner/balance_objective.py   fl-db, db, tb: one class, parameterised by the loss
    PPOObjective       learner/ppo_objective.py       ppo: on-policy epochs with a value head and a KL controller
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol

import torch
from torch import nn

from common.trajectory import Trajectory
from learner.collect import ReadPlan


@dataclass
class StepResult:
    """One update's outcome, as the loop reports it."""

    losses: list[float]  # one per micro-batch (balance) or per epoch (ppo); `loss/total` is their mean
    infos: list[dict[str, float]]  # diagnostics per forward pass, averaged into `loss/<key>`
    grad_norm: float  # of the clipped policy parameters, before clipping
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own, namespaced (`ppo/kl`)


class Objective(Protocol):
    heads: dict[str, nn.Module]  # modules saved as `{name}.safetensors` beside the policy and the flow head

    def param_groups(self) -> list[dict[str, Any]]: ...

    def plan(self, n: int, counters: Mapping[str, int]) -> ReadPlan: ...

    def update(self, batches: list[list[Trajectory]], optimizer: torch.optim.Optimizer,
               step: int, diagnostics: bool = True) -> Optional[StepResult]: ...

    def probe(self, batch: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
