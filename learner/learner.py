"""The central learner: half fresh trajectories, half prioritised replay, one FL-DB step.

Reads top to bottom: `collect` (data) → `loss_on` (one teacher-forced pass, the objective) →
`train_step` (accumulate, clip, step, reactivate, acknowledge, publish, checkpoint, metrics).

The policy runs without dropout (eval mode, gradients on): log P_F must be the probability of
the sampler's own policy, and dropout would make the balance residuals noisy.
`Learner` is a plain class; `learner_actor_class` wraps it as a Ray actor.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from common.config import Config
from common.constants import NS_BUFFER, NS_DIVERSITY, NS_LOSS, NS_PPO, NS_REWARD, NS_THROUGHPUT, NS_WEIGHTS
from common.models import build_policy, build_tokenizer, resolve_device
from common.trajectory import Trajectory
from common.storage import RunStorage
from learner.checkpoint import latest_checkpoint, load_checkpoint, persist_checkpoint, save_checkpoint
from learner.flow import FlowHead
from learner.fresh import FreshTimeoutError, fresh_fraction, fresh_required, timeout_message
from learner.losses import check_finite, gflownet_loss, temper
from learner.plasticity import dormant_metrics, should_reactivate
from learner.ppo import ValueHead, freeze_lower_blocks
from learner.ppo_step import PPOStep
from common.decoding import teacher_forced
from common.schedules import Schedules
from common.weights import WeightsClient

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def collate(trajs: list[Trajectory], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad prompts, right-pad responses: the layout `common.decoding` expects."""
    B = len(trajs)
    P = max(len(t.prompt_ids) for t in trajs)
    T = max(len(t.response_ids) for t in trajs)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.long)
    ref = torch.zeros((B, T), dtype=torch.float32)
    for i, t in enumerate(trajs):
        p, n = len(t.prompt_ids), len(t.response_ids)
        prompt_ids[i, P - p:] = torch.tensor(t.prompt_ids)
        prompt_mask[i, P - p:] = 1
        response_ids[i, :n] = torch.tensor(t.response_ids)
        response_mask[i, :n] = 1
        ref[i, :n] = torch.tensor(t.ref_logprobs)
    log_reward = torch.tensor([t.log_reward for t in trajs], dtype=torch.float32)
    out = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
               response_mask=response_mask, ref_logprobs=ref, log_reward=log_reward)
    return {k: v.to(device) for k, v in out.items()}


def text_diversity(trajs: list[Trajectory], encoder) -> float:
    """1 − mean pairwise cosine similarity of the rewrites of each prompt, averaged over prompts."""
    groups: dict[str, list[str]] = defaultdict(list)
    for t in trajs:
        groups[t.prompt].append(t.response)
    values = []
    for responses in groups.values():
        if len(responses) < 2:
            continue
        emb = encoder.encode(responses)
        sim = emb @ emb.T
        n = len(responses)
        values.append(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))
    return float(np.mean(values)) if values else float("nan")


class Learner:
    def __init__(self, cfg: Config, buffer, run_dir: Path, checkpoint: Optional[str] = None, weights=None,
                 device: Optional[str] = None, resume: bool = True, sentence_encoder=None) -> None:
        self.cfg, self.buffer, self.run_dir = cfg, buffer, Path(run_dir)
        self.device = resolve_device(device or cfg.run.device)
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        self.policy = build_policy(cfg.model, self.tokenizer, checkpoint).to(self.device).eval()
        self.flow = FlowHead(self.policy.config.hidden_size, cfg.learner.flow_hidden).to(self.device)
        lc = cfg.learner
        groups = [{"params": freeze_lower_blocks(self.policy, lc.trainable_blocks), "lr": lc.lr, "name": "policy"}]
        self.value: Optional[ValueHead] = None  # objective=ppo: V(s_t); the flow head then stays untrained
        if lc.objective == "ppo":
            self.value = ValueHead(self.policy.config.hidden_size).to(self.device)
            groups.append({"params": list(self.value.parameters()), "lr": lc.lr, "name": "value"})
        else:
            groups.append({"params": list(self.flow.parameters()), "lr": lc.flow_lr, "name": "flow"})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=lc.weight_decay)
        self.ppo = None if self.value is None else PPOStep(
            cfg, self.policy, self.value, self.optimizer, self.tokenizer.eos_token_id,
            lambda trajs: collate(trajs, self.tokenizer.pad_token_id, self.device))
        self.schedules = Schedules.from_config(cfg)
        self.weights = WeightsClient(weights) if weights is not None else None
        self.consumer = "learner-0"  # one learner: a restarted one re-reads its own unacknowledged entries
        self.encoder = sentence_encoder
        self.step = 0
        self.counters: dict[str, int] = defaultdict(int)
        self._nonfinite_run = 0
        self._last_time = self._last_save = time.monotonic()
        self.storage = RunStorage.from_config(cfg)  # run.storage_path: checkpoints outlive this node
        if resume and self.storage is not None:
            self.storage.pull_checkpoint(self.run_dir)  # restarted on another node: its newest checkpoint
        if resume and (path := latest_checkpoint(self.run_dir)) is not None:
            state = load_checkpoint(path, self.policy, self.flow, self.optimizer, heads=self._heads())
            if self.ppo is not None:
                self.ppo.load_state_dict(state["extra"]["ppo"])
            self.step = int(state["step"])
            self.counters.update(state["counters"])
            log.info("learner resumed from %s (step %d)", path, self.step)
        self.publish()

    # ------------------------------------------------------------------ data

    def collect(self, n: int, wait_s: Optional[float] = None) -> tuple[list[Trajectory], list[str], dict[str, int]]:
        """n trajectories: n·(1−replay_ratio) fresh from the stream, the rest prioritised replay.

        `learner.fresh_policy=wait` blocks until the fresh half is there (at most `wait_s`, default
        `learner.fresh_timeout_s`, then FreshTimeoutError naming the reward workers); `fill` takes the
        fresh ones there are and fills the rest from replay (counted), waiting only for what
        `learner.max_updates_per_fresh` requires, or while the buffer is empty."""
        lc = self.cfg.learner
        n_replay = int(round(n * lc.replay_ratio))
        n_fresh = n - n_replay
        timeout = lc.fresh_timeout_s if wait_s is None else wait_s
        required = fresh_required(lc.fresh_policy, n_fresh, self.counters["micro_batches"],
                                  self.counters["fresh_total"], lc.max_updates_per_fresh)
        start = time.monotonic()
        fresh: list[Trajectory] = []
        entry_ids: list[str] = []
        dropped = 0
        while len(fresh) < n_fresh:
            short = len(fresh) < required or (len(self.buffer) == 0 and not fresh)
            got = self.buffer.read_fresh(self.consumer, n_fresh - len(fresh), block_ms=200 if short else 0)
            entry_ids += [e for e, _ in got]
            valid = [t for _, t in got if self._valid(t)]
            dropped += len(got) - len(valid)
            fresh += valid
            if len(fresh) >= required and (fresh or len(self.buffer) > 0) and (not got or len(fresh) >= n_fresh):
                break
            if short and time.monotonic() - start > timeout:
                if required:
                    raise FreshTimeoutError(timeout_message(self.buffer.run, len(fresh), required,
                                                            time.monotonic() - start, self.buffer.pending_len()))
                raise TimeoutError(f"no scored trajectories arrived in {timeout:.0f}s: are the reward workers running?")
        filled = n_fresh - len(fresh)
        while n_fresh == 0 and len(self.buffer) == 0:  # replay only: wait for a first scored trajectory
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"no scored trajectories arrived in {timeout:.0f}s: are the reward workers running?")
            time.sleep(0.2)
        drawn = self.buffer.sample(n_replay + filled) if n_replay + filled > 0 else []
        replay = [t for t in drawn if self._valid(t)]
        self.counters["dropped_invalid"] += dropped + len(drawn) - len(replay)
        if not fresh and not replay:
            raise RuntimeError("every collected trajectory breaks the sampler's EOS rule (sampler.min_len changed?)")
        self.counters["micro_batches"] += 1
        self.counters["fresh_total"] += len(fresh)
        self.counters["replay_total"] += len(replay)
        return fresh + replay, entry_ids, {"fresh": len(fresh), "replay": len(replay), "filled": filled}

    def _valid(self, t: Trajectory) -> bool:
        """A trajectory the current policy could have sampled: no EOS before sampler.min_len (an item
        sampled under an older setting would have log P_F = −inf and poison the step)."""
        eos = self.tokenizer.eos_token_id
        return eos not in t.response_ids[: max(1, self.cfg.sampler.min_len)]

    # ------------------------------------------------------------------ objective

    def loss_on(self, trajs: list[Trajectory], step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, Any]]:
        step = self.step if step is None else step
        batch = collate(trajs, self.tokenizer.pad_token_id, self.device)
        tau = self.schedules.reward_temperature(step)
        gamma = self.schedules.reference_temperature(step)
        out = teacher_forced(self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                             batch["response_mask"], self.tokenizer.eos_token_id,
                             min_len=self.cfg.sampler.min_len)  # log P_F of what the sampler can draw
        log_flow = self.flow(out["state_hidden"], out["prompt_hidden"])  # (B, T)
        ref, terminal = temper(batch["ref_logprobs"], batch["log_reward"], batch["response_mask"], gamma=gamma,
                               tau=tau, min_len=self.cfg.sampler.min_len, len_penalty=self.cfg.learner.min_len_penalty)
        loss = gflownet_loss(self.cfg.learner.objective, out["log_pf"], log_flow, ref, terminal, batch["response_mask"])
        mask = batch["response_mask"].bool()
        with torch.no_grad():
            info = {
                "log_pf_mean": float((out["log_pf"] * mask).sum() / mask.sum()),
                "entropy": float((out["entropy"] * mask).sum() / mask.sum()),
                "log_z": float(log_flow[:, 0].mean()),
                "length": float(mask.sum(-1).float().mean()),
                "tau": tau,
            }
        return loss, info

    # ------------------------------------------------------------------ one optimiser step

    def train_step(self, wait_s: Optional[float] = None) -> dict[str, float]:
        """Collect grad_accum micro-batches (fresh + replay), update, acknowledge the fresh entries."""
        lc = self.cfg.learner
        batches, fresh, entries = [], [], []
        counts: dict[str, int] = defaultdict(int)
        for _ in range(lc.grad_accum):
            trajs, fresh_ids, c = (self.collect_on_policy if self.ppo else self.collect)(lc.batch_size, wait_s)
            for k, v in c.items():
                counts[k] += v
            batches.append(trajs)
            fresh += trajs[:c["fresh"]]
            entries += fresh_ids
        try:
            return self.update(batches, fresh, counts)
        finally:
            if entries:  # used (or skipped as non-finite): either way, done with them
                self.buffer.ack_fresh(entries)

    def update(self, batches: list[list[Trajectory]], fresh: Optional[list[Trajectory]] = None,
               counts: Optional[dict[str, int]] = None) -> dict[str, float]:
        """One optimiser step over micro-batches; reactivation, publishing, checkpoints, metrics."""
        lc = self.cfg.learner
        fresh = fresh if fresh is not None else [t for b in batches for t in b]
        counts = counts or {"fresh": len(fresh), "replay": 0, "filled": 0}
        ppo_metrics: dict[str, float] = {}
        if self.ppo is not None:  # objective=ppo: ppo_epochs optimiser steps on this batch (learner/ppo_step.py)
            result = self.ppo.update(batches)
            if result is None:
                return self._skip_nonfinite()
            losses, infos, grad_norm, ppo_metrics = result
        else:
            balance = self._balance_step(batches)
            if balance is None:
                return self._skip_nonfinite()
            losses, infos, grad_norm = balance
        self._nonfinite_run = 0
        self.step += 1

        all_trajs = [t for b in batches for t in b]
        metrics = self._metrics(losses, infos, all_trajs, fresh, counts, float(grad_norm))
        metrics.update({f"{NS_PPO}/{k}": v for k, v in ppo_metrics.items()})
        flow_dormant = None
        if self.step % self.cfg.run.log_every == 0 or self.step == 1:
            metrics.update(self.plasticity(batches[0]))
            flow_dormant = metrics.get("plasticity/flow_dormant")
            if self.encoder is not None and fresh:
                metrics[f"{NS_DIVERSITY}/text"] = text_diversity(fresh, self.encoder)
        if should_reactivate(self.step, lc.reactivation_every, flow_dormant, lc.reactivation_dormant):
            self.flow.reinit_last_layer(self.optimizer, init=lc.reactivation_init)
            self.counters["reactivations"] += 1
        metrics["plasticity/reactivations"] = float(self.counters["reactivations"])
        if self.step % lc.publish_every == 0:
            self.publish()
        if self._checkpoint_due():
            self.save()
        return metrics

    def _balance_step(self, batches: list[list[Trajectory]]) -> Optional[tuple[list[float], list[dict], float]]:
        """One optimiser step of the balance objective over the micro-batches; None if a loss is non-finite."""
        self.optimizer.zero_grad(set_to_none=True)
        losses, infos = [], []
        for trajs in batches:
            loss, info = self.loss_on(trajs)
            if not check_finite(loss):
                return None
            (loss / len(batches)).backward()
            losses.append(float(loss.detach()))
            infos.append(info)
        # the policy's gradient norm is clipped, the flow head's is not (the official trainer clips
        # model.parameters() only; the head has its own optimiser there)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()), self.cfg.learner.grad_clip)
        self.optimizer.step()
        return losses, infos, float(grad_norm)

    def collect_on_policy(self, n: int, wait_s: Optional[float] = None) -> tuple[list[Trajectory], list[str], dict[str, int]]:
        """objective=ppo: n fresh trajectories and nothing else (never replay, whatever learner.fresh_policy
        says); blocks until they are scored, FreshTimeoutError naming the reward workers after `wait_s`
        (default learner.fresh_timeout_s)."""
        timeout = self.cfg.learner.fresh_timeout_s if wait_s is None else wait_s
        start = time.monotonic()
        fresh: list[Trajectory] = []
        entries: list[str] = []
        while len(fresh) < n:
            got = self.buffer.read_fresh(self.consumer, n - len(fresh), block_ms=200)
            entries += [e for e, _ in got]
            valid = [t for _, t in got if self._valid(t)]
            self.counters["dropped_invalid"] += len(got) - len(valid)
            fresh += valid
            if len(fresh) < n and time.monotonic() - start > timeout:
                raise FreshTimeoutError("objective=ppo (on-policy): " + timeout_message(
                    self.buffer.run, len(fresh), n, time.monotonic() - start, self.buffer.pending_len()))
        self.counters["micro_batches"] += 1
        self.counters["fresh_total"] += len(fresh)
        return fresh, entries, {"fresh": len(fresh), "replay": 0, "filled": 0}

    def _heads(self) -> dict[str, torch.nn.Module]:
        """Modules checkpointed beside the policy and the flow head."""
        return {} if self.value is None else {"value": self.value}

    def _skip_nonfinite(self) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.counters["nonfinite_steps"] += 1
        self._nonfinite_run += 1
        if self._nonfinite_run >= self.cfg.learner.max_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_run} consecutive non-finite losses at step {self.step}: training stopped. "
                "Check the rewards in the buffer (`pag buffer top`) and lower learner.lr / learner.flow_lr.")
        return {f"{NS_LOSS}/nonfinite_steps": float(self.counters["nonfinite_steps"]), "step": float(self.step)}

    def _metrics(self, losses, infos, trajs, fresh, counts, grad_norm) -> dict[str, float]:
        now = time.monotonic()
        elapsed, self._last_time = now - self._last_time, now
        m: dict[str, float] = {"step": float(self.step), f"{NS_LOSS}/total": float(np.mean(losses)),
                               f"{NS_LOSS}/grad_norm": grad_norm}
        for key in infos[0]:
            m[f"{NS_LOSS}/{key}"] = float(np.mean([i[key] for i in infos]))
        # rewards of what the policy samples now: fresh trajectories only (replay is biased to the best)
        names = sorted({k for t in fresh for k in t.scores})
        for name in names:
            values = [t.scores[name] for t in fresh if name in t.scores and math.isfinite(t.scores[name])]
            if values:
                m[f"{NS_REWARD}/{name}"] = float(np.mean(values))
        if fresh:
            m[f"{NS_REWARD}/log_reward"] = float(np.mean([t.log_reward for t in fresh]))
        m[f"{NS_REWARD}/replay_log_reward"] = float(np.mean([t.log_reward for t in trajs]))
        lags = [self.step - 1 - t.policy_version for t in fresh] or [0]
        m[f"{NS_WEIGHTS}/version"] = float(self.step)
        m[f"{NS_WEIGHTS}/lag_mean"] = float(np.mean(lags))
        m[f"{NS_WEIGHTS}/lag_max"] = float(np.max(lags))
        m[f"{NS_BUFFER}/size"] = float(len(self.buffer))
        m[f"{NS_BUFFER}/fresh"] = float(counts["fresh"])
        m[f"{NS_BUFFER}/filled_from_replay"] = float(counts["filled"])
        m[f"{NS_BUFFER}/fresh_fraction"] = fresh_fraction(counts["fresh"], counts.get("replay", 0))
        m[f"{NS_BUFFER}/fresh_fraction_run"] = fresh_fraction(self.counters["fresh_total"], self.counters["replay_total"])
        self.counters["filled_from_replay"] += counts["filled"]
        m[f"{NS_THROUGHPUT}/trajectories_per_s"] = len(trajs) / max(elapsed, 1e-9)
        m[f"{NS_THROUGHPUT}/fresh_per_s"] = len(fresh) / max(elapsed, 1e-9)
        m["schedule/sampling_temperature"] = self.schedules.sampling_temperature(self.step)
        return m

    def plasticity(self, trajs: list[Trajectory]) -> dict[str, float]:
        batch = collate(trajs, self.tokenizer.pad_token_id, self.device)

        def forward() -> None:
            with torch.no_grad():
                out = teacher_forced(self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                     batch["response_mask"], self.tokenizer.eos_token_id)
                self.flow(out["state_hidden"], out["prompt_hidden"])

        policy_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1)
        metrics = dormant_metrics(self.policy, self.flow, forward, tau=self.cfg.learner.dormant_tau,
                                  policy_mask=policy_mask, flow_mask=batch["response_mask"])
        if self.ppo is not None:  # the flow head is not trained under PPO: its ratio would mean nothing
            metrics = {k: v for k, v in metrics.items() if "flow" not in k}
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints

    def publish(self) -> int:
        if self.weights is not None:
            self.weights.publish(self.step, self.policy.state_dict())
        return self.step

    def _checkpoint_due(self) -> bool:
        """Every `checkpoint_every` steps, at the last step, or `checkpoint_every_s` after the last save."""
        lc = self.cfg.learner
        timed = lc.checkpoint_every_s is not None and time.monotonic() - self._last_save >= lc.checkpoint_every_s
        return self.step % lc.checkpoint_every == 0 or self.step == lc.steps or timed

    def save(self) -> Path:
        self._last_save = time.monotonic()
        path = save_checkpoint(self.run_dir, self.step, self.policy, self.tokenizer, self.flow, self.optimizer,
                               dict(self.counters), heads=self._heads(),
                               extra={} if self.ppo is None else {"ppo": self.ppo.state_dict()})
        return persist_checkpoint(self.storage, self.run_dir, path)

    def get_step(self) -> int:
        return self.step

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "counters": dict(self.counters)}


class _LearnerActor(Learner):
    def __init__(self, cfg_dict: dict, redis_url: str, run: str, run_dir: str, checkpoint: Optional[str],
                 weights, resume: bool = True) -> None:
        from buffer import ReplayBuffer
        from common.models import build_sentence_encoder

        logging.basicConfig(level=logging.INFO)
        cfg = Config.model_validate(cfg_dict)
        buffer = ReplayBuffer.from_config(cfg.buffer, run, redis_url=redis_url, seed=cfg.run.seed)
        try:
            encoder = build_sentence_encoder(cfg.model)
        except Exception as exc:  # diversity is a metric: training goes on without it
            log.warning("no sentence encoder (%s): diversity/text not reported", exc)
            encoder = None
        super().__init__(cfg, buffer, Path(run_dir), checkpoint, weights, resume=resume, sentence_encoder=encoder)

    def ping(self) -> bool:
        return True


def learner_actor_class(cfg: Config):
    import ray

    return ray.remote(num_cpus=1, num_gpus=cfg.learner.num_gpus, max_restarts=cfg.run.max_restarts,
                      max_task_retries=0)(_LearnerActor)


