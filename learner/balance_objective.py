"""The GFlowNet balance objectives — fl-db (PAG), db (no decomposition), tb (vanilla) — as one
objective of the Learner, parameterised by the loss (learner/losses.py, chosen by name).

All three train the same modules, the policy and the flow head (TB reads its log Z(x) off the
flow head at s_0), on the same data: a replay mix of fresh and prioritised trajectories. One
update is one optimiser step over the micro-batches, their gradients accumulated:

    log P_F, h   ← teacher-forced pass (what the sampler can draw: no EOS before sampler.min_len)
    log F̃(s_t)   ← flow head on h
    ref, log R   ← tempered by γ and τ (the schedules at this step)
    L            ← gflownet_loss(learner.objective, …); clip the policy's gradient norm, step
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from common.config import Config
from common.decoding import teacher_forced
from common.schedules import Schedules
from common.trajectory import Trajectory
from learner.collect import ReadPlan, replay_mix
from learner.flow import FlowHead
from learner.losses import OBJECTIVES, check_finite, gflownet_loss, temper
from learner.objective import StepResult


class BalanceObjective:
    """fl-db, db or tb (`loss`): trains the policy and the flow head on a replay mix."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, flow: FlowHead, eos_id: int,
                 collate_fn: Callable[[list[Trajectory]], dict[str, torch.Tensor]], schedules: Schedules,
                 loss: str) -> None:
        if loss not in OBJECTIVES:
            raise ValueError(f"learner.objective={loss!r} is not a balance objective; choose one of "
                             f"{', '.join(OBJECTIVES)}")
        self.cfg, self.policy, self.flow, self.eos_id = cfg, policy, flow, eos_id
        self.collate, self.schedules, self.loss = collate_fn, schedules, loss
        self.heads: dict[str, torch.nn.Module] = {}  # the flow head is the learner's, checkpointed always

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.flow.parameters()), "lr": self.cfg.learner.flow_lr, "name": "flow"}]

    def plan(self, n: int, counters: Mapping[str, int]) -> ReadPlan:
        return replay_mix(self.cfg.learner, n, counters)

    def loss_on(self, trajs: list[Trajectory], step: int = 0,
                diagnostics: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """The balance loss of one micro-batch at `step` (the τ and γ schedules), and its diagnostics; the
        entropy only with `diagnostics` (its pass over the vocabulary made the step 0.69× of the token loop's
        speed on CPU at `tiny`; without it 1.23×, bench/gpu.py part `learner`)."""
        batch = self.collate(trajs)
        tau = self.schedules.reward_temperature(step)
        gamma = self.schedules.reference_temperature(step)
        min_len = self.cfg.sampler.min_len
        out = teacher_forced(self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                             batch["response_mask"], self.eos_id, min_len=min_len,
                             with_entropy=diagnostics)  # log P_F of what the sampler can draw
        log_flow = self.flow(out["state_hidden"], out[self.flow.prompt_input])  # (B, T)
        ref, terminal = temper(batch["ref_logprobs"], batch["log_reward"], batch["response_mask"], gamma=gamma,
                               tau=tau, min_len=min_len, len_penalty=self.cfg.learner.min_len_penalty)
        loss = gflownet_loss(self.loss, out["log_pf"], log_flow, ref, terminal, batch["response_mask"])
        mask = batch["response_mask"].bool()
        with torch.no_grad():
            info = {
                "log_pf_mean": float((out["log_pf"] * mask).sum() / mask.sum()),
                "log_z": float(log_flow[:, 0].mean()),
                "length": float(mask.sum(-1).float().mean()),
                "tau": tau,
            }
            if diagnostics:
                info["entropy"] = float((out["entropy"] * mask).sum() / mask.sum())
        return loss, info

    def update(self, batches: list[list[Trajectory]], optimizer: torch.optim.Optimizer,
               step: int, diagnostics: bool = True) -> Optional[StepResult]:
        """One optimiser step over the micro-batches; None if a loss is non-finite (nothing stepped)."""
        optimizer.zero_grad(set_to_none=True)
        losses, infos = [], []
        for trajs in batches:
            loss, info = self.loss_on(trajs, step, diagnostics)
            if not check_finite(loss):
                return None
            (loss / len(batches)).backward()
            losses.append(float(loss.detach()))
            infos.append(info)
        # the policy's gradient norm is clipped, the flow head's is not (the official trainer clips
        # model.parameters() only; the head has its own optimiser there)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()), self.cfg.learner.grad_clip)
        optimizer.step()
        return StepResult(losses, infos, float(grad_norm))

    @torch.no_grad()
    def probe(self, batch: dict[str, torch.Tensor]) -> None:
        """The policy and the flow head, both probed for dormant units."""
        out = teacher_forced(self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                             batch["response_mask"], self.eos_id, with_entropy=False)
        self.flow(out["state_hidden"], out[self.flow.prompt_input])

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing beyond the modules and the optimiser

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
