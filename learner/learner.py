"""The central learner: one loop for every objective, the objective an object the loop calls.

Reads top to bottom: `collect` (a micro-batch, as the objective plans it: learner/collect.py) →
`train_step` (grad_accum micro-batches, acknowledged after the step) → `update` (the objective's
step, then what every objective shares: metrics, plasticity, reactivation, publishing, checkpoints).

    learner.objective   trains                    reads                          learner/
    fl-db, db, tb       policy + flow head        fresh + prioritised replay     balance_objective.py
    ppo                 policy + value head       fresh only (on-policy)         ppo_objective.py

The policy runs without dropout (eval mode, gradients on): log P_F must be the probability of
the sampler's own policy, and dropout would make the balance residuals noisy. The flow head is
built and checkpointed whatever the objective (it is part of every checkpoint), and reactivation
resets it. `Learner` is a plain class; `learner_actor_class` wraps it as a Ray actor.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import numpy as np
import torch

from buffer.connection import OUTAGE
from common.config import Config
from common.constants import NS_BUFFER, NS_DIVERSITY, NS_LOSS, NS_PLASTICITY, NS_REWARD, NS_THROUGHPUT, NS_WEIGHTS
from common.errors import RunFailedError
from common.models import build_policy, build_tokenizer, resolve_device
from common.schedules import Schedules
from common.storage import RunStorage
from common.timing import PhaseClock, role_times, shares
from common.trajectory import Trajectory, untrainable
from common.weights import WeightsClient
from learner.balance_objective import BalanceObjective
from learner.batch import collate
from learner.checkpoint import latest_checkpoint, load_checkpoint, persist_checkpoint, save_checkpoint
from learner.collect import MicroBatch, read_micro_batch
from learner.flow import FlowHead
from learner.fresh import fresh_fraction
from learner.objective import Objective, StepResult
from learner.plasticity import dormant_metrics, should_reactivate
from learner.ppo import freeze_lower_blocks
from learner.ppo_objective import PPOObjective

log = logging.getLogger(__name__)


class NonFiniteLossError(RunFailedError):
    pass


def build_objective(cfg: Config, policy: torch.nn.Module, flow: FlowHead, eos_id: int,
                    collate_fn: Callable[[list[Trajectory]], dict[str, torch.Tensor]], device: torch.device,
                    schedules: Schedules) -> Objective:
    """`learner.objective` → the object the loop calls; the only place the objectives are told apart."""
    if cfg.learner.objective == "ppo":
        return PPOObjective(cfg, policy, eos_id, collate_fn, device)
    return BalanceObjective(cfg, policy, flow, eos_id, collate_fn, schedules, loss=cfg.learner.objective)


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
        self.vocab_size = self.policy.get_input_embeddings().num_embeddings
        lc = cfg.learner
        self.flow = FlowHead(self.policy.config.hidden_size, lc.flow_hidden, lc.flow_head).to(self.device)
        self.collate = partial(collate, pad_id=self.tokenizer.pad_token_id, device=self.device)
        self.schedules = Schedules.from_config(cfg)
        self.objective = build_objective(cfg, self.policy, self.flow, self.tokenizer.eos_token_id, self.collate,
                                         self.device, self.schedules)
        policy_group = {"params": freeze_lower_blocks(self.policy, lc.trainable_blocks), "lr": lc.lr, "name": "policy"}
        self.optimizer = torch.optim.AdamW([policy_group, *self.objective.param_groups()], weight_decay=lc.weight_decay)
        self.weights = WeightsClient(weights) if weights is not None else None
        self.consumer = "learner-0"  # one learner: a restarted one re-reads its own unacknowledged entries
        self.encoder = sentence_encoder
        self.step = 0
        self.counters: dict[str, int] = defaultdict(int)
        self._nonfinite_run = 0
        self._last_time = self._last_save = time.monotonic()
        self.clock = PhaseClock("learner")  # time per phase, into the run's meta (common/timing.py)
        self._times: dict[str, dict[str, float]] = {}  # every role's totals at the last logging step
        self.storage = RunStorage.from_config(cfg)  # run.storage_path: checkpoints outlive this node
        if resume and self.storage is not None:
            self.storage.pull_checkpoint(self.run_dir)  # restarted on another node: its newest checkpoint
        if resume and (path := latest_checkpoint(self.run_dir)) is not None:
            state = load_checkpoint(path, self.policy, self.flow, self.optimizer, heads=self.objective.heads)
            self.objective.load_state_dict(state["extra"])
            self.step = int(state["step"])
            self.counters.update(state["counters"])
            log.info("learner resumed from %s (step %d)", path, self.step)
        if buffer is not None:  # what `pag buffer check` checks token ids against
            buffer.set_meta(vocab_size=self.vocab_size)
        self.publish()

    # ------------------------------------------------------------------ data

    def collect(self, n: int, wait_s: Optional[float] = None, holding: Collection[str] = ()) -> MicroBatch:
        """n trajectories as the objective plans them: a replay mix (balance objectives, per
        `learner.fresh_policy`) or fresh only (ppo). Waits for fresh ones at most `wait_s` (default
        `learner.fresh_timeout_s`), then FreshTimeoutError naming the reward workers. `holding`: the fresh
        entries this step already read."""
        timeout = self.cfg.learner.fresh_timeout_s if wait_s is None else wait_s
        plan = self.objective.plan(n, self.counters)
        return read_micro_batch(self.buffer, self.consumer, plan, timeout, self._valid, self.counters, holding)

    def _valid(self, t: Trajectory) -> bool:
        """Bad data (a non-finite reward, a token outside the vocabulary …: common.trajectory.untrainable) is
        rejected in the buffer, never trained on; an item the current policy could not have sampled (EOS
        before sampler.min_len, from an older setting: log P_F = −inf) is skipped."""
        problem = untrainable(t, self.vocab_size)
        if problem is not None:
            self.buffer.reject(t, problem)
            return False
        eos = self.tokenizer.eos_token_id
        return eos not in t.response_ids[: max(1, self.cfg.sampler.min_len)]

    # ------------------------------------------------------------------ one update

    def train_step(self, wait_s: Optional[float] = None) -> dict[str, float]:
        """Collect grad_accum micro-batches, update, acknowledge the fresh entries."""
        batches, fresh, entries = [], [], []
        counts: dict[str, int] = defaultdict(int)
        for _ in range(self.cfg.learner.grad_accum):
            with self.clock.phase("collect"):
                micro = self.collect(self.cfg.learner.batch_size, wait_s, holding=entries)
            for k, v in micro.counts().items():
                counts[k] += v
            batches.append(micro.trajectories)
            fresh += micro.trajectories[:micro.fresh]
            entries += micro.entry_ids
        try:
            return self.update(batches, fresh, counts)
        finally:
            if entries:  # used (or skipped as non-finite): either way, done with them; unacknowledged, redelivered
                self._after_step("acknowledging its fresh entries", lambda: self.buffer.ack_fresh(entries), 0)

    def update(self, batches: list[list[Trajectory]], fresh: Optional[list[Trajectory]] = None,
               counts: Optional[dict[str, int]] = None) -> dict[str, float]:
        """The objective's update over micro-batches; then reactivation, publishing, checkpoints, metrics."""
        lc = self.cfg.learner
        fresh = fresh if fresh is not None else [t for b in batches for t in b]
        counts = counts or {"fresh": len(fresh), "replay": 0, "filled": 0}
        logging_step = self.logging_step(self.step + 1)
        with self.clock.phase("update"):
            result = self.objective.update(batches, self.optimizer, self.step, diagnostics=logging_step)
        if result is None:
            return self._skip_nonfinite()
        self._nonfinite_run = 0
        self.step += 1

        metrics = self._metrics(result, [t for b in batches for t in b], fresh, counts)
        metrics.update(result.metrics)
        if logging_step:
            with self.clock.phase("diagnostics"):
                metrics.update(self.plasticity(batches[0]))
                if self.encoder is not None and fresh:
                    metrics[f"{NS_DIVERSITY}/text"] = text_diversity(fresh, self.encoder)
        flow_dormant = metrics.get(f"{NS_PLASTICITY}/flow_dormant")  # None unless probed at this step
        if should_reactivate(self.step, lc.reactivation_every, flow_dormant, lc.reactivation_dormant):
            self.flow.reinit_last_layer(self.optimizer, init=lc.reactivation_init)
            self.counters["reactivations"] += 1
        metrics[f"{NS_PLASTICITY}/reactivations"] = float(self.counters["reactivations"])
        if self.step % lc.publish_every == 0:
            with self.clock.phase("publish"):
                self.publish()
        if self._checkpoint_due():
            with self.clock.phase("checkpoint"):
                self.save()
        self._after_step("adding its phase times", lambda: self.clock.flush(self.buffer), None)
        if logging_step:
            metrics.update(self._after_step("reading the roles' phase times", self._time_shares, {}))
        return metrics

    def _after_step(self, what: str, work: Callable[[], Any], default: Any) -> Any:
        """Redis work once the step is applied: an outage then must not lose the step's metrics (the driver
        would record the next step and leave a gap); it is logged, and the driver meets it at the next read."""
        try:
            return work()
        except OUTAGE as exc:
            log.warning("learner step %d: %s skipped, Redis unreachable (%s)", self.step, what, exc)
            return default

    def _time_shares(self) -> dict[str, float]:
        """`time/{role}/{phase}`: where every role's time went since the last logging step (from the run's meta)."""
        now = role_times(self.buffer.meta())
        out, self._times = shares(now, self._times), now
        return out

    def logging_step(self, step: int) -> bool:
        """Steps whose metrics include what costs compute: the policy's entropy, dormant ratios, text diversity."""
        return step % self.cfg.run.log_every == 0 or step == 1

    def _skip_nonfinite(self) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.counters["nonfinite_steps"] += 1
        self._nonfinite_run += 1
        if self._nonfinite_run >= self.cfg.learner.max_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_run} consecutive non-finite losses at step {self.step}: training stopped. "
                "Check the rewards in the buffer (`pag buffer top`) and lower learner.lr / learner.flow_lr.")
        return {f"{NS_LOSS}/nonfinite_steps": float(self.counters["nonfinite_steps"]), "step": float(self.step)}

    def _metrics(self, result: StepResult, trajs: list[Trajectory], fresh: list[Trajectory],
                 counts: dict[str, int]) -> dict[str, float]:
        now = time.monotonic()
        elapsed, self._last_time = now - self._last_time, now
        m: dict[str, float] = {"step": float(self.step), f"{NS_LOSS}/total": float(np.mean(result.losses)),
                               f"{NS_LOSS}/grad_norm": float(result.grad_norm)}
        for key in result.infos[0]:
            m[f"{NS_LOSS}/{key}"] = float(np.mean([i[key] for i in result.infos]))
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
        m[f"{NS_BUFFER}/size"] = float(self._after_step("reading the buffer's size", lambda: len(self.buffer),
                                                        float("nan")))
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
        """Dormant ratios of the units the objective's forward runs (policy MLPs, the flow head if it trains)."""
        batch = self.collate(trajs)
        policy_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1)
        return dormant_metrics(self.policy, self.flow, lambda: self.objective.probe(batch),
                               tau=self.cfg.learner.dormant_tau, policy_mask=policy_mask,
                               flow_mask=batch["response_mask"])

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
        """Policy and flow head always; the objective's heads (value.safetensors) and its state (the KL controller)."""
        self._last_save = time.monotonic()
        path = save_checkpoint(self.run_dir, self.step, self.policy, self.tokenizer, self.flow, self.optimizer,
                               dict(self.counters), heads=self.objective.heads, extra=self.objective.state_dict())
        return persist_checkpoint(self.storage, self.run_dir, path)  # run.storage_path: a copy beyond this node

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
