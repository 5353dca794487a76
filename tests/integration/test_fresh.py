"""The online half and the policy lag (issue 10, item 1): `learner.fresh_policy`, the fill cap, the
fresh-fraction metric, the timeout's message, and the sampler's lag bound."""
import threading
from collections import deque

import pytest

from actors.sampler import Sampler, lag_room
from common.config import ConfigError, load_config
from learner.fresh import FreshTimeoutError, fresh_fraction, fresh_required
from learner.learner import Learner


# ---------------------------------------------------------------- pure rules

def test_wait_requires_the_whole_fresh_half_and_fill_without_cap_nothing():
    for done, used in [(0, 0), (5, 0), (100, 3)]:
        assert fresh_required("wait", 8, done, used, None) == 8
        assert fresh_required("wait", 8, done, used, 2.0) == 8
        assert fresh_required("fill", 8, done, used, None) == 0
    assert fresh_required("wait", 0, 3, 0, None) == 0
    with pytest.raises(ValueError, match="wait.*fill"):
        fresh_required("always", 8, 0, 0, None)


@pytest.mark.parametrize("cap", [1.0, 1.5, 2.0, 3.0, 10.0])
@pytest.mark.parametrize("n_fresh", [1, 4, 8])
def test_fill_cap_holds_updates_per_fresh_at_every_micro_batch(cap, n_fresh):
    """The stream never has more than what is required: the learner runs as far ahead as allowed."""
    done = used = 0
    for _ in range(200):
        k = fresh_required("fill", n_fresh, done, used, cap)
        assert 0 <= k <= n_fresh
        done, used = done + 1, used + k
        assert done <= cap * used / n_fresh + 1e-9, (done, used)
    # and it is not stricter than it needs to be: at most one micro-batch's fresh half above the bound
    assert used <= done * n_fresh / cap + n_fresh


def test_fresh_fraction():
    assert fresh_fraction(8, 8) == 0.5 and fresh_fraction(0, 16) == 0.0
    assert fresh_fraction(0, 0) != fresh_fraction(0, 0)  # nan before anything was trained on


def test_lag_room_rule():
    assert lag_room(0, 64, 8, 1), "an empty pipeline always takes a batch, however large"
    assert lag_room(7, 64, 8, 1), "less than a step's worth queued: the learner must not starve"
    assert lag_room(5, 3, 0, 1), "no fresh consumption (replay-only learner): only max_pending bounds it"
    assert lag_room(16, 16, 8, 4) and not lag_room(17, 16, 8, 4)


@pytest.mark.parametrize("batch,per_step,bound", [(16, 8, 4), (6, 8, 1), (64, 128, 2), (8, 8, 3)])
def test_lag_bound_holds_in_a_simulated_pipeline(batch, per_step, bound):
    """Sampler pushes while lag_room allows (stamping the learner step of its weights); the learner
    takes per_step a step. The lag the learner reports (step − 1 − version) stays below the bound."""
    queue: deque[int] = deque()
    step, lags = 0, []
    for _ in range(300):
        while lag_room(len(queue), batch, per_step, bound):
            queue.extend([step] * batch)
        if len(queue) >= per_step:
            taken = [queue.popleft() for _ in range(per_step)]
            step += 1
            lags += [step - 1 - v for v in taken]
    # lag ≤ bound − 1, unless the rule "never starve the learner" pushed a batch into < 1 step's worth
    starve = -(-(per_step - 1 + batch) // per_step) - 1
    assert lags and max(lags) <= max(bound - 1, starve)
    assert sum(lags) / len(lags) <= bound


def test_config_keys_and_defaults():
    cfg = load_config("tiny")
    assert cfg.learner.fresh_policy == "wait" and cfg.learner.max_updates_per_fresh is None
    assert cfg.sampler.max_lag_steps == 4
    with pytest.raises(ConfigError, match="learner.fresh_policy"):
        load_config("tiny", overrides=["learner.fresh_policy=sometimes"])


# ---------------------------------------------------------------- against a real redis-server

@pytest.fixture(scope="module")
def cfg(small_learner_config):
    return small_learner_config()


@pytest.fixture(scope="module")
def trajectories(cfg):
    sampler = Sampler(cfg, buffer=None)
    trajs = sampler.sample_batch() + sampler.sample_batch()
    return [t.replace(scores={"reward": 0.1}, log_reward=len(t.response_ids) / 2.0) for t in trajs]


def test_wait_blocks_until_the_fresh_half_is_there(cfg, buffer, tmp_path, trajectories):
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    buffer.add(trajectories[:2])  # 2 of the 4 fresh slots: the step must wait for 2 more
    late = threading.Timer(1.0, buffer.add, args=(trajectories[2:6],))
    late.start()
    try:
        m = learner.train_step(wait_s=60)
    finally:
        late.join()
    assert m["buffer/fresh"] == 4 and m["buffer/filled_from_replay"] == 0
    assert m["buffer/fresh_fraction"] == 0.5 and m["buffer/fresh_fraction_run"] == 0.5


def test_a_long_wait_does_not_take_back_what_the_step_already_holds(cfg, buffer, tmp_path, trajectories, monkeypatch):
    """While the learner waits for the rest of its fresh half, the entries it read first go idle; XAUTOCLAIM must
    not hand them back to it (the same trajectory twice in a batch, counted as a redelivery). The reclaim idle
    time is cut from 30 s to 50 ms here so that the wait outlasts it."""
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    read = buffer.read_fresh
    monkeypatch.setattr(buffer, "read_fresh", lambda consumer, count, block_ms=0, min_idle_ms=0, holding=():
                        read(consumer, count, block_ms, 50, holding))
    buffer.add(trajectories[:2])
    late = threading.Timer(1.0, buffer.add, args=(trajectories[2:4],))
    late.start()
    try:
        micro = learner.collect(8, wait_s=60)
    finally:
        late.join()
    fresh_ids = [t.id for t in micro.trajectories[:micro.fresh]]
    assert sorted(fresh_ids) == sorted(t.id for t in trajectories[:4]) and len(set(micro.entry_ids)) == 4
    assert buffer.stats()["fresh_reclaimed"] == 0
    buffer.ack_fresh(micro.entry_ids)


def test_wait_times_out_with_the_reward_workers_named(cfg, buffer, tmp_path, trajectories):
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    buffer.add(trajectories[:2])
    buffer.push_pending(trajectories[8:11])
    with pytest.raises(FreshTimeoutError, match=r"only 2 of the 4 fresh .* 3 unscored .*reward workers") as err:
        learner.train_step(wait_s=0.5)
    assert "learner.fresh_timeout_s" in str(err.value) and "fresh_policy=fill" in str(err.value)


def test_fill_takes_replay_and_the_run_fraction_counts_it(cfg, buffer, tmp_path, trajectories):
    c = cfg.model_copy(deep=True)
    c.learner.fresh_policy = "fill"
    learner = Learner(c, buffer, tmp_path, resume=False)
    buffer.add(trajectories[:4])
    first = learner.train_step(wait_s=5)
    second = learner.train_step(wait_s=5)  # the stream is empty: all 8 from replay
    assert first["buffer/fresh_fraction"] == 0.5 and second["buffer/fresh_fraction"] == 0.0
    assert second["buffer/fresh_fraction_run"] == pytest.approx(4 / 16)
    assert learner.counters["fresh_total"] == 4 and learner.counters["replay_total"] == 12


def test_fill_with_a_cap_waits_when_too_far_ahead(cfg, buffer, tmp_path, trajectories):
    c = cfg.model_copy(deep=True)
    c.learner.fresh_policy, c.learner.max_updates_per_fresh = "fill", 2.0
    learner = Learner(c, buffer, tmp_path, resume=False)
    buffer.add(trajectories[:4])
    learner.train_step(wait_s=5)  # 1 step, 1 step's worth of fresh
    learner.train_step(wait_s=5)  # 2 steps per 1 step's worth: at the cap, allowed
    with pytest.raises(FreshTimeoutError, match="only 0 of the 2"):
        learner.train_step(wait_s=0.5)  # a third needs 1.5 steps' worth: 2 more fresh


def test_sampler_holds_back_when_the_lag_would_pass_the_bound(cfg, buffer):
    c = cfg.model_copy(deep=True)
    c.sampler.max_lag_steps, c.sampler.max_pending = 2, 1000  # 4 fresh per step: room for 8 queued
    sampler = Sampler(c, buffer)
    assert sampler.step() == 8, "an empty pipeline takes a batch"
    assert sampler.step() == 0, "8 queued + 8 would be read 4 steps later: held back"
    entries = buffer.read_pending("w", 8)
    buffer.ack_pending([e for e, _ in entries])
    buffer.add([t.replace(scores={"reward": 0.0}, log_reward=0.0) for _, t in entries[:4]])
    assert buffer.pending_len() == 0 and buffer.fresh_len() == 4
    assert sampler.step() == 0, "4 scored but unread by the learner (a step's worth) + 8 > 8: still held back"
    read = buffer.read_fresh("learner-0", 4)
    buffer.ack_fresh([e for e, _ in read])
    assert sampler.step() == 8, "the learner consumed them: room again"
