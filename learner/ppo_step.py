"""`learner.objective=ppo`: one PPO update of the Learner on a batch of fresh trajectories.

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
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from common.config import Config
from common.decoding import teacher_forced
from common.trajectory import Trajectory
from learner.losses import check_finite
from learner.ppo import AdaptiveKLController, ValueHead, gae, ppo_loss, token_rewards, whiten

class PPOStep:
    """Holds the value head and the KL controller; `update` runs the epochs with the Learner's optimiser."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, value: ValueHead, optimizer: torch.optim.Optimizer,
                 eos_id: int, collate_fn) -> None:
        lc = cfg.learner
        self.cfg, self.policy, self.value, self.optimizer = cfg, policy, value, optimizer
        self.eos_id, self.collate = eos_id, collate_fn
        self.kl = AdaptiveKLController(lc.ppo.kl_coef, lc.ppo.kl_target, lc.ppo.kl_horizon)

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out = teacher_forced(self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                             batch["response_mask"], self.eos_id, min_len=self.cfg.sampler.min_len)
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

    def update(self, batches: list[list[Trajectory]]) -> Optional[tuple[list[float], list[dict], float, dict]]:
        """learner.ppo.epochs optimiser steps over the batch (its micro-batches accumulated into each step).
        Returns (losses, infos, grad_norm, ppo metrics), or None when a loss is non-finite (nothing stepped
        after it; the caller counts and skips)."""
        lc = self.cfg.learner
        prepared = [self.prepare(trajs) for trajs in batches]
        params = [p for p in self.policy.parameters() if p.requires_grad]
        losses, infos, diag = [], [], []
        grad_norm = 0.0
        for _ in range(lc.ppo.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            epoch_loss = 0.0
            for p in prepared:
                out, values = self._forward(p["batch"])
                loss, d = ppo_loss(out["log_pf"], values, p["log_pf_old"], p["values_old"], p["advantages"],
                                   p["returns"], p["mask"], clip=lc.ppo.clip, value_clip=lc.ppo.value_clip,
                                   value_coef=lc.ppo.value_coef)
                if not check_finite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                (loss / len(prepared)).backward()
                epoch_loss += float(loss.detach()) / len(prepared)
                diag.append({k: float(v) for k, v in d.items()} | {"value_mean": float(values.detach()[p["mask"]].mean())})
                mask = p["mask"]
                infos.append({"log_pf_mean": float(out["log_pf"].detach()[mask].mean()),
                              "entropy": float(out["entropy"][mask].mean()),
                              "length": float(mask.sum(-1).float().mean())})
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, lc.grad_clip))
            self.optimizer.step()
            losses.append(epoch_loss)
        kl = float(torch.cat([p["kl"] for p in prepared]).mean())
        n = sum(len(b) for b in batches)
        coef_used = self.kl.value
        self.kl.update(kl, n)
        metrics = {key: float(np.mean([d[key] for d in diag])) for key in diag[0]}
        metrics.update(kl=kl, kl_coef=coef_used, kl_coef_next=self.kl.value,
                       score=float(torch.cat([p["score"] for p in prepared]).mean()),
                       return_mean=float(np.mean([float(p["returns"][p["mask"]].mean()) for p in prepared])))
        return losses, infos, grad_norm, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl"])
