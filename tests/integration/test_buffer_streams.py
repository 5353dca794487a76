"""The two work streams: pending (reward workers) and fresh (learner), with consumers that die."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from buffer import ReplayBuffer
from buffer.testing import make_trajectory
from common.constants import LEARNER_GROUP, SCORERS_GROUP, fresh_key, pending_key


def unscored(n, start=0):
    return [make_trajectory(start + i, float("nan")) for i in range(n)]


def test_pending_round_trip_and_backpressure_length(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name)
    work = unscored(5)
    entry_ids = buf.push_pending(work)
    assert len(entry_ids) == 5 and buf.pending_len() == 5
    got = buf.read_pending("w0", 10)
    assert [t.id for _, t in got] == [t.id for t in work] and [e for e, _ in got] == entry_ids
    assert buf.pending_len() == 5  # delivered is not done
    assert buf.read_pending("w1", 10) == []
    assert buf.ack_pending(entry_ids) == 5
    assert buf.pending_len() == 0 and buf.stats()["pending_in_flight"] == 0


def test_dead_reward_worker_entries_are_reclaimed_and_stored_once(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name)
    buf.push_pending(unscored(10))
    # worker A takes 4, scores and stores them, then dies before acknowledging
    taken = buf.read_pending("A", 4)
    buf.add([t.replace(log_reward=1.0) for _, t in taken])
    # worker B gets only new work while A's entries are young...
    fresh_work = buf.read_pending("B", 10, min_idle_ms=60_000)
    assert {e for e, _ in fresh_work}.isdisjoint(e for e, _ in taken) and len(fresh_work) == 6
    assert buf.stats()["pending_reclaimed"] == 0  # a first delivery is not counted
    buf.ack_pending([e for e, _ in fresh_work])
    time.sleep(0.06)
    # ...and A's, once they have been idle long enough
    reclaimed = buf.read_pending("B", 10, min_idle_ms=50)
    assert sorted(e for e, _ in reclaimed) == sorted(e for e, _ in taken)
    assert buf.stats()["pending_reclaimed"] == 4 and buf.stats()["fresh_reclaimed"] == 0
    buf.add([t.replace(log_reward=1.0) for _, t in reclaimed])  # redelivered work: idempotent
    assert buf.last_add.repeats == 4 and len(buf) == 4
    assert buf.client.xlen(fresh_key(run_name)) == 4  # announced once each
    buf.ack_pending([e for e, _ in reclaimed])
    assert buf.pending_len() == 0
    assert buf.client.xpending(pending_key(run_name), SCORERS_GROUP)["pending"] == 0


def test_fresh_stream_with_a_dying_learner(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name, capacity=3)
    batch = [make_trajectory(i, float(i)) for i in range(5)]
    buf.add(batch)
    first = buf.read_fresh("L1", 2)
    assert [t.id for _, t in first] == [t.id for t in batch[:2]]
    # the two worst were evicted from replay, but the fresh entries carry the whole trajectory
    assert first[0][1] == batch[0] and buf.get(batch[0].id) is None
    rest = buf.read_fresh("L2", 10, min_idle_ms=60_000)
    assert len(rest) == 3
    buf.ack_fresh([e for e, _ in rest])
    time.sleep(0.06)
    again = buf.read_fresh("L2", 10, min_idle_ms=50)  # L1 died holding two
    assert [t.id for _, t in again] == [t.id for t in batch[:2]]
    assert buf.stats()["fresh_reclaimed"] == 2 and buf.stats()["pending_reclaimed"] == 0
    assert buf.ack_fresh([e for e, _ in again]) == 2
    assert buf.client.xlen(fresh_key(run_name)) == 0
    assert buf.client.xpending(fresh_key(run_name), LEARNER_GROUP)["pending"] == 0


def test_fresh_entry_whose_trajectory_was_evicted_is_skipped_and_counted(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name, capacity=2)
    buf.add([make_trajectory(0, 0.0)])  # kept, so announced by id only
    buf.add([make_trajectory(i, 5.0 + i) for i in range(1, 3)])  # evicts it
    got = buf.read_fresh("L", 10)
    assert [t.log_reward for _, t in got] == [6.0, 7.0]
    assert buf.stats()["fresh_gone"] == 1
    assert buf.client.xlen(fresh_key(run_name)) == 2  # the gone one is acknowledged and deleted


def test_read_blocks_until_work_arrives(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name)
    t0 = time.monotonic()
    assert buf.read_pending("w", 5, block_ms=150) == []
    assert time.monotonic() - t0 >= 0.14
    producer = ReplayBuffer(redis_url, run_name)
    timer = threading.Timer(0.1, producer.push_pending, args=(unscored(1),))
    timer.start()
    got = buf.read_pending("w", 5, block_ms=5000)
    timer.join()
    assert len(got) == 1
    with pytest.raises(ValueError, match="socket_timeout"):
        buf.read_pending("w", 1, block_ms=60_000)


def test_groups_come_back_after_the_streams_are_deleted(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name)
    buf.client.delete(pending_key(run_name))
    assert buf.read_pending("w", 1) == []
    buf.push_pending(unscored(1))
    assert len(buf.read_pending("w", 1)) == 1


def test_failed_records_are_readable_counted_and_bounded(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name, failed_maxlen=10)
    for i in range(300):
        buf.record_failed(make_trajectory(i, float("nan")), reason="CUDA OOM")
    raw = redis.Redis.from_url(redis_url)
    entries = raw.xrange(f"pag:{run_name}:failed")
    assert len(entries) <= 10 + 100  # approximate trimming
    assert entries[-1][1][b"reason"] == b"CUDA OOM" and b"prompt" in entries[-1][1]
    assert buf.stats()["failed"] == 300


def test_meta_and_counters(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name)
    buf.set_meta(config_hash="abc123", learner_step=7)
    assert buf.incr_counter("renders", 3) == 3
    meta = buf.meta()
    assert meta["config_hash"] == "abc123" and meta["learner_step"] == "7" and meta["renders"] == "3"
    assert meta["layout_schema"] == "1" and meta["eviction"] == "priority"
