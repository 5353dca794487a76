"""Every objective plugs into the same Learner loop (RLlib's new stack: one loop, an objective per
family). An FL-DB learner and a PPO learner both run `Learner.train_step` — collect, update,
metrics, plasticity, publish, checkpoint, resume — on the small config, each reading the buffer the
way its objective plans it (replay mix or on-policy) through the one reader, learner/collect.py.
The buffer is an in-memory stand-in for the part of ReplayBuffer the learner reads: no server."""
import math
import threading
import time

import pytest
import torch

from actors.sampler import Sampler
from common.trajectory import Trajectory
from learner.balance_objective import BalanceObjective
from learner.collect import ReadPlan, on_policy, read_micro_batch
from learner.fresh import FreshTimeoutError
from learner.learner import Learner
from learner.ppo_objective import PPOObjective

PPO = ("learner.objective=ppo", "learner.replay_ratio=0", "learner.ppo.epochs=2")


class _Server:
    """What ListBuffer's `client` answers: a Redis with no maxmemory (buffer.connection.full_message)."""

    def info(self, section: str) -> dict:
        return {"used_memory": 1, "maxmemory": 0}


class ListBuffer:
    """A fresh stream and a replay pool in memory; `add` puts a trajectory in both, as ReplayBuffer does."""

    run = "unit"
    url, capacity, client = "redis://unit", 100, _Server()

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}  # the run's meta hash
        self.holding: list[set[str]] = []  # what each read_fresh was told the learner holds
        self.stream: list[tuple[str, Trajectory]] = []
        self.pool: list[Trajectory] = []
        self.sampled = 0
        self.sample_calls = 0
        self.reads: list[tuple[int, int]] = []  # (count, block_ms) of each read_fresh
        self.acked: list[str] = []

    def add(self, trajs: list[Trajectory]) -> None:
        self.stream += [(f"{len(self.pool) + i}-0", t) for i, t in enumerate(trajs)]
        self.pool += trajs

    def set_meta(self, **fields) -> None:
        self.fields.update({k: str(v) for k, v in fields.items()})

    def incr_counter(self, name: str, n: int = 1) -> int:
        self.fields[name] = str(int(self.fields.get(name, 0)) + n)
        return int(self.fields[name])

    def meta(self) -> dict[str, str]:
        return dict(self.fields)

    def read_fresh(self, consumer: str, count: int, block_ms: int = -1,
                   holding=()) -> list[tuple[str, Trajectory]]:
        self.reads.append((count, block_ms))
        self.holding.append(set(holding))
        got, self.stream = self.stream[:count], self.stream[count:]
        return got

    def sample(self, n: int) -> list[Trajectory]:
        self.sampled += n
        self.sample_calls += 1
        return [self.pool[i % len(self.pool)] for i in range(n)] if self.pool else []

    def ack_fresh(self, entry_ids: list[str]) -> int:
        self.acked += entry_ids
        return len(entry_ids)

    def pending_len(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.pool)


@pytest.fixture(scope="module")
def trajectories(small_learner_config):
    sampler = Sampler(small_learner_config(), buffer=None)
    trajs = sampler.sample_batch() + sampler.sample_batch()
    return [t.replace(scores={"reward": len(t.response_ids) / 8}, log_reward=len(t.response_ids) / 8 / 0.05)
            for t in trajs]


@pytest.mark.parametrize("overrides, objective_class, fresh, replay", [
    ((), BalanceObjective, 4, 4),  # fl-db: half fresh, half prioritised replay
    (PPO, PPOObjective, 8, 0),  # ppo: on-policy, never replay
], ids=["fl-db", "ppo"])
def test_each_objective_steps_through_the_same_loop(small_learner_config, tmp_path, trajectories, overrides,
                                                    objective_class, fresh, replay):
    cfg = small_learner_config("run.log_every=1", "learner.checkpoint_every=1", *overrides)
    buffer = ListBuffer()
    buffer.add(trajectories[:8])
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    assert type(learner) is Learner and isinstance(learner.objective, objective_class)
    m = learner.train_step(wait_s=5)
    assert m["step"] == 1 and learner.step == 1
    for key in ("loss/total", "loss/grad_norm", "loss/entropy", "reward/reward", "weights/lag_mean",
                "plasticity/policy_dormant", "plasticity/reactivations", "buffer/fresh_fraction"):
        assert key in m and math.isfinite(m[key]), key
    assert m["buffer/fresh"] == fresh and buffer.sampled == replay
    assert len(buffer.acked) == fresh, "every fresh entry read is acknowledged"
    saved = tmp_path / "checkpoints" / "step_000001"
    assert (saved / "flow.safetensors").is_file()
    assert (saved / "value.safetensors").is_file() == (objective_class is PPOObjective)
    resumed = Learner(cfg, buffer, tmp_path, resume=True)
    assert resumed.step == 1 and type(resumed.objective) is objective_class


@pytest.mark.parametrize("overrides", [(), PPO], ids=["fl-db", "ppo"])
def test_the_entropy_metric_costs_only_logging_steps(small_learner_config, tmp_path, trajectories, overrides,
                                                     monkeypatch):
    """The entropy is a pass over the vocabulary: steps 1 and run.log_every compute and report it, the others not."""
    import learner.balance_objective as balance
    import learner.ppo_objective as ppo

    asked = []

    def spy(*args, with_entropy=True, **kwargs):
        asked.append(with_entropy)
        return teacher_forced(*args, with_entropy=with_entropy, **kwargs)

    teacher_forced = balance.teacher_forced
    monkeypatch.setattr(balance, "teacher_forced", spy)
    monkeypatch.setattr(ppo, "teacher_forced", spy)
    cfg = small_learner_config("run.log_every=3", "learner.checkpoint_every=100", *overrides)
    buffer = ListBuffer()
    buffer.add(trajectories[:8] * 3)
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    logged, computed = [], []
    for _ in range(3):
        asked.clear()
        logged.append("loss/entropy" in learner.train_step(wait_s=5))
        computed.append(any(asked))
    assert logged == computed == [True, False, True]
    assert int(buffer.meta()["time_ms:learner:update"]) > 0


def test_logging_steps_report_where_each_role_spent_its_time(small_learner_config, tmp_path, trajectories):
    cfg = small_learner_config("run.log_every=2", "learner.checkpoint_every=2")
    buffer = ListBuffer()
    buffer.add(trajectories[:8] * 3)
    buffer.set_meta(**{"time_ms:reward:render": 3000, "time_ms:reward:read": 1000})  # as reward workers write them
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    first = learner.train_step(wait_s=5)
    assert first["time/reward/render"] == pytest.approx(0.75) and first["time/reward/read"] == pytest.approx(0.25)
    mine = {k: v for k, v in first.items() if k.startswith("time/learner/")}
    assert {"time/learner/update", "time/learner/diagnostics"} <= set(mine), mine
    assert sum(mine.values()) == pytest.approx(1.0) and "time/learner/checkpoint" not in mine
    buffer.set_meta(**{"time_ms:reward:read": 2000})  # since step 1 the reward workers only read
    second = learner.train_step(wait_s=5)
    assert second["time/reward/read"] == pytest.approx(1.0) and second["time/reward/render"] == 0.0
    assert second["time/learner/checkpoint"] > 0, "step 2 saved a checkpoint"
    assert not any(k.startswith("time/") for k in learner.train_step(wait_s=5)), "step 3 does not log"


@pytest.mark.parametrize("name", ["fl-db", "db", "tb"])
def test_the_balance_objectives_are_one_class_parameterised_by_the_loss(small_learner_config, tmp_path,
                                                                         trajectories, name):
    learner = Learner(small_learner_config(f"learner.objective={name}"), None, tmp_path, resume=False)
    assert type(learner.objective) is BalanceObjective and learner.objective.loss == name
    loss, info = learner.objective.loss_on(trajectories[:8])
    assert math.isfinite(float(loss.detach())) and "log_z" in info


def test_the_flow_head_trains_at_its_own_learning_rate(small_learner_config, tmp_path):
    cfg = small_learner_config("learner.lr=0.002", "learner.flow_lr=0.03")
    learner = Learner(cfg, None, tmp_path, resume=False)
    groups = {group.get("name"): group for group in learner.optimizer.param_groups}
    assert groups["flow"]["lr"] == 0.03 and groups["policy"]["lr"] == 0.002
    flow_ids = {id(p) for p in learner.objective.flow.parameters()}
    assert flow_ids and {id(p) for p in groups["flow"]["params"]} == flow_ids
    message = r"^learner.objective='ppo' is not a balance objective; choose one of fl-db, db, tb$"
    with pytest.raises(ValueError, match=message):
        BalanceObjective(cfg, learner.policy, learner.objective.flow, 0, learner.objective.collate,
                         learner.objective.schedules, "ppo")


def test_balance_update_is_at_its_step_and_averages_its_micro_batches(small_learner_config, tmp_path, trajectories):
    objective = Learner(small_learner_config("learner.reward_temp_anneal_steps=10"), None, tmp_path,
                        resume=False).objective
    trajs = trajectories[:4]
    with torch.no_grad():
        at_5, at_0 = (float(objective.loss_on(trajs, step)[0]) for step in (5, 0))
        at_default = float(objective.loss_on(trajs)[0])
    assert at_5 != pytest.approx(at_0) and at_default == at_0, "tau anneals from step 0, the default"
    frozen = torch.optim.SGD(list(objective.policy.parameters()) + list(objective.flow.parameters()), lr=0.0)
    one = objective.update([trajs], frozen, step=5)
    two = objective.update([trajs, trajs], frozen, step=5)
    assert one.losses == pytest.approx([at_5]) and two.losses == pytest.approx([at_5, at_5])
    assert two.grad_norm == pytest.approx(one.grad_norm, rel=1e-5), "the gradient of the mean, not of the sum"


def test_one_reader_serves_both_plans(trajectories):
    valid = lambda t: True  # noqa: E731
    counters: dict[str, int] = {"dropped_invalid": 0, "micro_batches": 0, "fresh_total": 0, "replay_total": 0}
    buffer = ListBuffer()
    buffer.add(trajectories[:4])
    buffer.stream = buffer.stream[:2]  # two of the four still unread
    mixed = read_micro_batch(buffer, "learner-0", ReadPlan(fresh=4, replay=4, required=0), 5, valid, counters)
    assert mixed.counts() == {"fresh": 2, "replay": 6, "filled": 2}, "fill: the missing fresh slots from replay"
    assert counters == {"dropped_invalid": 0, "micro_batches": 1, "fresh_total": 2, "replay_total": 6}
    drawn = buffer.sampled
    with pytest.raises(FreshTimeoutError, match=r"objective=ppo \(on-policy\): .*only 0 of the 4 fresh"):
        read_micro_batch(buffer, "learner-0", on_policy(4, "objective=ppo (on-policy)"), 0.01, valid, counters)
    assert buffer.sampled == drawn, "on-policy never draws replay"


def _counters(dropped: int = 0) -> dict[str, int]:
    return {"dropped_invalid": dropped, "micro_batches": 0, "fresh_total": 0, "replay_total": 0}


def test_replay_only_waits_for_a_first_trajectory_and_counts_the_invalid_draws(trajectories):
    buffer, counters = ListBuffer(), _counters(dropped=5)
    threading.Timer(0.3, buffer.add, args=(trajectories[:2],)).start()  # pool: t0, t1; draws alternate
    start = time.monotonic()
    batch = read_micro_batch(buffer, "learner-0", ReadPlan(fresh=0, replay=4, required=0), 5,
                             lambda t: t is trajectories[0], counters)
    assert time.monotonic() - start >= 0.3, "returned before anything arrived"
    assert batch.trajectories == [trajectories[0]] * 2 and (batch.fresh, batch.replay) == (0, 2)
    assert counters == {"dropped_invalid": 7, "micro_batches": 1, "fresh_total": 0, "replay_total": 2}


def test_replay_only_on_an_empty_buffer_times_out_naming_the_reward_workers():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        read_micro_batch(ListBuffer(), "learner-0", ReadPlan(fresh=0, replay=2, required=0), 0.4,
                         lambda t: True, _counters())
    assert str(caught.value) == "no scored trajectories arrived in 0s: are the reward workers running?"
    assert time.monotonic() - start >= 0.4


def test_the_fresh_reader_reads_no_further_than_the_plan_and_counts_invalid_arrivals(trajectories):
    buffer, counters = ListBuffer(), _counters(dropped=5)
    buffer.add(trajectories[:6])
    batch = read_micro_batch(buffer, "l", ReadPlan(fresh=4, replay=0, required=4), 5,
                             lambda t: t is not trajectories[1], counters)
    assert batch.trajectories == [trajectories[i] for i in (0, 2, 3, 4)]
    assert buffer.reads == [(4, 200), (1, 200)], "one more read for the invalid one, none once the plan is met"
    assert counters["dropped_invalid"] == 6, "the invalid arrival is added to the run's total"
    replay_only = ListBuffer()
    replay_only.pool = trajectories[:2]
    read_micro_batch(replay_only, "l", ReadPlan(fresh=0, replay=2, required=0), 5, lambda t: True, _counters())
    assert replay_only.reads == [], "a plan with no fresh slots never reads the stream"


class _FullServer:
    """A Redis at its maxmemory (buffer.connection.full_message)."""

    def info(self, section: str) -> dict:
        return {"used_memory": 100 * 2**20, "maxmemory": 100 * 2**20, "maxmemory_policy": "noeviction"}


def test_a_fresh_timeout_says_how_long_it_waited_and_names_a_full_redis():
    plan, everything = ReadPlan(fresh=4, replay=0, required=4), lambda t: True  # noqa: E731
    with pytest.raises(FreshTimeoutError) as plain:
        read_micro_batch(ListBuffer(), "l", plan, 0.05, everything, _counters())
    assert str(plain.value).startswith("learner.fresh_policy=wait: only 0 of the 4 fresh trajectories of a "
                                       "micro-batch arrived in 0s (learner.fresh_timeout_s); 0 unscored"), \
        "no label: the message starts with the policy"
    full = ListBuffer()
    full.client = _FullServer()
    with pytest.raises(FreshTimeoutError) as caught:
        read_micro_batch(full, "l", plan, 0.05, everything, _counters())
    assert str(caught.value).startswith("only 0 of the 4 fresh trajectories of a micro-batch arrived in 0s: Redis at "
                                        "redis://unit is full: used_memory 100.0 MiB of maxmemory 100.0 MiB")
    assert "buffer.capacity=100 trajectories" in str(caught.value)


def test_a_fill_read_with_nothing_anywhere_times_out_asking_for_the_reward_workers():
    with pytest.raises(TimeoutError) as caught:
        read_micro_batch(ListBuffer(), "l", ReadPlan(fresh=4, replay=4, required=0), 0.05, lambda t: True,
                         _counters())
    assert str(caught.value) == "no scored trajectories arrived in 0s: are the reward workers running?"


def test_the_fresh_reader_blocks_only_while_it_is_short(trajectories):
    """It blocks 200 ms on the stream while fewer than `required` arrived, or while nothing exists at all
    (stream and buffer empty); otherwise it only polls (0 ms), and it never reads past `plan.fresh`."""
    everything = lambda t: True  # noqa: E731
    buffer = ListBuffer()
    buffer.add(trajectories[:2])  # two fresh, two in the pool
    read_micro_batch(buffer, "l", ReadPlan(fresh=4, replay=0, required=2), 5, everything, _counters())
    assert buffer.reads == [(4, 200), (2, 0)], "blocks for the required two, then polls for the rest"
    assert buffer.holding == [set(), {"0-0", "1-0"}], "what it read is not to be handed back to it"
    one = ListBuffer()
    one.pool = trajectories[:1]  # nothing fresh, one in the pool
    read_micro_batch(one, "l", ReadPlan(fresh=2, replay=0, required=0), 5, everything, _counters())
    assert one.reads == [(2, 0)], "nothing required and replay to fill from: one poll"
    full = ListBuffer()
    full.add(trajectories[:2])
    read_micro_batch(full, "l", ReadPlan(fresh=2, replay=0, required=2), 5, everything, _counters(), {"9-0"})
    assert full.holding == [{"9-0"}], "nor what the step's earlier micro-batches read"
    assert full.reads == [(2, 200)], "no read past plan.fresh"
    empty = ListBuffer()
    with pytest.raises(TimeoutError):
        read_micro_batch(empty, "l", ReadPlan(fresh=2, replay=0, required=0), 0.05, everything, _counters())
    assert empty.reads and {block for _, block in empty.reads} == {200}, "nothing anywhere: it blocks"


def test_a_batch_with_nothing_valid_says_why():
    buffer = ListBuffer()
    buffer.pool = [object()]
    with pytest.raises(RuntimeError, match=r"^every collected trajectory breaks the sampler's EOS rule "
                                            r"\(sampler.min_len changed\?\)$"):
        read_micro_batch(buffer, "l", ReadPlan(fresh=0, replay=2, required=0), 5, lambda t: False, _counters())


def test_replay_is_drawn_for_a_single_slot_and_not_at_all_for_none(trajectories):
    buffer = ListBuffer()
    buffer.add(trajectories[:4])
    one = read_micro_batch(buffer, "learner-0", ReadPlan(fresh=2, replay=1, required=0), 5, lambda t: True,
                           _counters())
    assert (one.fresh, one.replay, buffer.sample_calls) == (2, 1, 1)
    none = read_micro_batch(buffer, "learner-0", ReadPlan(fresh=2, replay=0, required=0), 5, lambda t: True,
                            _counters())
    assert (none.fresh, none.replay, buffer.sample_calls) == (2, 0, 1), "a plan with no replay slot draws none"


def test_a_redis_outage_after_the_step_keeps_the_step_and_its_metrics(small_learner_config, tmp_path, trajectories):
    """Once the optimiser has stepped, an unreachable Redis (acknowledging, the buffer's size, the phase times)
    must not lose the step: its metrics come back, the driver meets the outage at the next read."""
    import redis

    class GoneAfterReading(ListBuffer):
        def _gone(self, *args, **kwargs):
            raise redis.ConnectionError("Connection refused")

        ack_fresh = incr_counter = meta = __len__ = _gone

    cfg = small_learner_config("run.log_every=1", "learner.checkpoint_every=100")
    buffer = GoneAfterReading()
    buffer.add(trajectories[:8])
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    metrics = learner.train_step(wait_s=5)
    assert metrics["step"] == 1 and learner.step == 1 and math.isfinite(metrics["loss/total"])
    assert math.isnan(metrics["buffer/size"]) and not any(k.startswith("time/") for k in metrics)
