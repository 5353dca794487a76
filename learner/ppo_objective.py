"""`learner.objective=ppo`: the reward-maximising baseline as an objective of the Learner.

On-policy: every micro-batch is fresh trajectories only (`collect.on_policy`), never replay. One
update runs `ppo_epochs` optimiser steps on the batch:

    prepare (no grad, once per batch)                 epochs × (micro-batches → one optimiser step)
      π_old, V_old  ← teacher-forced pass now           log π_θ, V_θ  ← teacher-forced pass
      r_t           ← −β_KL kl_t (+ r(y) at the end)     L = L_pg + c_v L_v            (learner.ppo)
      A_t, R_t      ← GAE, whitened advantages          clip the policy's gradient norm, step
    then β_KL ← adaptive controller on the batch's mean Σ_t kl_t.

π_old is recomputed by the learner at the start of the update rather than read from the sampler:
the sampler samples at `sampler.temp_*` and may lag a few weights versions behind, so its
log-probs are not those of the policy being updated; the ratio starts at 1 on every batch and the
clip bounds how far the epochs move it (the usual "PPO on slightly stale samples"). The per-token KL
uses the stored raw `ref_logprobs` of the frozen reference, so no reference model is loaded here.
The sequence reward is r = β · log R (a Trajectory stores log R = r/β).

The flow head stays untrained (it is still checkpointed); the value head V(s_t) trains with the
policy and is saved as value.safetensors, the KL controller in state.json.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from common.config import Config
from common.constants import NS_PPO
from common.decoding import teacher_forced
from common.trajectory import Trajectory
from learner.collect import ReadPlan, on_policy
from learner.losses import check_finite
from learner.objective import StepResult
from learner.ppo import AdaptiveKLController, ValueHead, gae, ppo_loss, token_rewards, whiten


class PPOObjective:
    """Holds the value head and the KL controller; `update` runs the epochs with the Learner's optimiser."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, eos_id: int,
                 collate_fn: Callable[[list[Trajectory]], dict[str, torch.Tensor]], device: torch.device) -> None:
        lc = cfg.learner
        self.cfg, self.policy, self.eos_id, self.collate = cfg, policy, eos_id, collate_fn
        self.value = ValueHead(policy.config.hidden_size).to(device)
        self.kl = AdaptiveKLController(lc.ppo.kl_coef, lc.ppo.kl_target, lc.ppo.kl_horizon)
        self.heads: dict[str, torch.nn.Module] = {"value": self.value}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.value.parameters()), "lr": self.cfg.learner.lr, "name": "value"}]

    def plan(self, n: int, counters: Mapping[str, int]) -> ReadPlan:
        return on_policy(n, label="objective=ppo (on-policy)")

    def _forward(self, batch: dict[str, torch.Tensor],
                 with_entropy: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out = teacher_forced(self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                             batch["response_mask"], self.eos_id, min_len=self.cfg.sampler.min_len,
                             with_entropy=with_entropy)
        return out, self.value(out["state_hidden"])  # log P_F (B, T), V (B, T)

    @torch.no_grad()
    def prepare(self, trajs: list[Trajectory]) -> dict[str, Any]:
        """Everything fixed for the epochs of one micro-batch: π_old, V_old, rewards, advantages, returns."""
        batch = self.collate(trajs)
        out, values = self._forward(batch)
        mask = batch["response_mask"].bool()
        score = batch["log_reward"] * self.cfg.reward.beta  # r = β · log R
        rewards, kl = token_rewards(score, out["log_pf"], batch["ref_logprobs"], mask, self.kl.value)
        advantages, returns = gae(rewards, values, mask, self.cfg.learner.ppo.gamma, self.cfg.learner.ppo.gae_lambda)
        return {"batch": batch, "mask": mask, "log_pf_old": out["log_pf"], "values_old": values,
                "advantages": whiten(advantages, mask), "returns": returns, "kl": kl.sum(-1), "score": score}

    def update(self, batches: list[list[Trajectory]], optimizer: torch.optim.Optimizer,
               step: int, diagnostics: bool = True) -> Optional[StepResult]:
        """learner.ppo.epochs optimiser steps over the batch (its micro-batches accumulated into each step), then the
        KL controller; None when a loss is non-finite (nothing stepped after it; the loop counts and skips). The
        entropy metric only with `diagnostics`."""
        lc = self.cfg.learner
        prepared = [self.prepare(trajs) for trajs in batches]
        params = [p for p in self.policy.parameters() if p.requires_grad]
        losses, infos, diag = [], [], []
        grad_norm = 0.0
        for _ in range(lc.ppo.epochs):
            optimizer.zero_grad(set_to_none=True)
            epoch_loss = 0.0
            for p in prepared:
                out, values = self._forward(p["batch"], diagnostics)
                loss, d = ppo_loss(out["log_pf"], values, p["log_pf_old"], p["values_old"], p["advantages"],
                                   p["returns"], p["mask"], clip=lc.ppo.clip, value_clip=lc.ppo.value_clip,
                                   value_coef=lc.ppo.value_coef)
                if not check_finite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    return None
                (loss / len(prepared)).backward()
                epoch_loss += float(loss.detach()) / len(prepared)
                mask = p["mask"]
                diag.append({k: float(v) for k, v in d.items()} | {"value_mean": float(values.detach()[mask].mean())})
                info = {"log_pf_mean": float(out["log_pf"].detach()[mask].mean()),
                        "length": float(mask.sum(-1).float().mean())}
                infos.append(info | ({"entropy": float(out["entropy"][mask].mean())} if diagnostics else {}))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, lc.grad_clip))
            optimizer.step()
            losses.append(epoch_loss)
        n = sum(len(trajs) for trajs in batches)
        return StepResult(losses, infos, grad_norm, self._close_batch(prepared, diag, n))

    def _close_batch(self, prepared: list[dict[str, Any]], diag: list[dict[str, float]], n: int) -> dict[str, float]:
        """Move β_KL on the batch's KL (n trajectories) and report the batch's PPO diagnostics (`ppo/…`)."""
        kl = float(torch.cat([p["kl"] for p in prepared]).mean())
        coef_used = self.kl.value
        self.kl.update(kl, n)
        metrics = {key: float(np.mean([d[key] for d in diag])) for key in diag[0]}
        metrics.update(kl=kl, kl_coef=coef_used, kl_coef_next=self.kl.value,
                       score=float(torch.cat([p["score"] for p in prepared]).mean()),
                       return_mean=float(np.mean([float(p["returns"][p["mask"]].mean()) for p in prepared])))
        return {f"{NS_PPO}/{k}": v for k, v in metrics.items()}

    @torch.no_grad()
    def probe(self, batch: dict[str, torch.Tensor]) -> None:
        """The policy only: the flow head is not trained under PPO, its dormant ratio would mean nothing."""
        teacher_forced(self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                       batch["response_mask"], self.eos_id, with_entropy=False)

    def state_dict(self) -> dict[str, Any]:
        return {"ppo": {"kl": self.kl.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["ppo"]["kl"])
