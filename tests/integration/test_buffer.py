"""ReplayBuffer against a real redis-server: storage, atomicity, dedup, eviction, sampling, corruption."""
from __future__ import annotations

import logging
import math
import shutil
import subprocess
import threading

import msgpack
import numpy as np
import pytest
import redis

from buffer import ReplayBuffer, lua
from buffer.replay import dedup_key
from buffer.testing import make_trajectory
from common.constants import fresh_key, prio_key, traj_key


def trajs(rewards, start=0, **kw):
    return [make_trajectory(start + i, r, **kw) for i, r in enumerate(rewards)]


@pytest.fixture
def raw(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# ---------------------------------------------------------------- storage and atomicity

def test_add_get_and_readable_layout(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name, seed=0)
    batch = trajs([1.5, -2.0, 0.25])
    assert buf.add(batch) == [t.id for t in batch]
    assert len(buf) == 3
    assert buf.get(batch[0].id) == batch[0]
    assert buf.get("no-such-id") is None
    # what a person sees with redis-cli
    fields = raw.hgetall(traj_key(run_name, batch[0].id))
    assert fields[b"prompt"].decode() == batch[0].prompt
    assert fields[b"response"].decode() == batch[0].response
    assert float(fields[b"log_reward"]) == 1.5 and b"T" in fields[b"created_at"]
    best = raw.zrevrange(prio_key(run_name), 0, -1, withscores=True)
    assert [(i.decode(), s) for i, s in best] == [(batch[0].id, 1.5), (batch[2].id, 0.25), (batch[1].id, -2.0)]
    assert [t.id for t in buf.top(2)] == [batch[0].id, batch[2].id]
    assert raw.xlen(fresh_key(run_name)) == 3
    buf.close()


def test_add_rejects_an_unscored_batch_and_stores_nothing(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name)
    batch = trajs([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="not finite"):
        buf.add(batch)
    assert len(buf) == 0 and raw.xlen(fresh_key(run_name)) == 0


def test_script_validates_the_whole_batch_before_writing(redis_url, run_name, raw):
    """A malformed second trajectory reaching the server aborts the batch with no write at all."""
    buf = ReplayBuffer(redis_url, run_name)
    k = buf._keys
    good = ["a", "1.0", "sha-a", 4, "prompt", "p", "blob", b"x"]
    bad = ["b", "not-a-number", "sha-b", 4, "prompt", "p", "blob", b"y"]
    with pytest.raises(redis.ResponseError, match="malformed"):
        buf._add(keys=[k["prio"], k["meta"], k["fresh"], k["dedup"], k["order"]],
                 args=[buf._traj_prefix, 100, 1, 0, 100, 2, *good, *bad])
    assert len(buf) == 0 and raw.xlen(fresh_key(run_name)) == 0
    assert not raw.exists(traj_key(run_name, "a"))


def test_concurrent_readers_never_see_half_a_batch(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name, capacity=100_000)
    batches = [trajs(np.linspace(0, 1, 50), start=50 * b) for b in range(30)]
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            pipe = raw.pipeline(transaction=True)
            pipe.zcard(prio_key(run_name))
            pipe.xlen(fresh_key(run_name))
            seen.append(tuple(pipe.execute()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    for batch in batches:
        buf.add(batch)
    done.set()
    watcher.join()
    assert len(buf) == 1500
    assert len(seen) > 10
    assert all(size % 50 == 0 and fresh == size for size, fresh in seen), seen[:20]


def test_add_is_idempotent_by_id(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name)
    batch = trajs([0.5, 1.5, 2.5])
    buf.add(batch)
    buf.add(batch + batch[:1])  # a redelivery, and a repeat inside one batch
    assert buf.last_add.repeats == 4 and buf.last_add.stored == 0
    assert len(buf) == 3
    assert raw.xlen(fresh_key(run_name)) == 3  # not re-announced
    assert buf.stats()["repeats"] == 4


# ---------------------------------------------------------------- dedup and eviction

def test_dedup_keeps_the_higher_reward(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name)
    same = dict(prompt="a cat", response="a cat, highly detailed")
    low, high, higher, lower = (make_trajectory(i, r, **same) for i, r in enumerate([1.0, 3.0, 5.0, 2.0]))
    buf.add([low])
    buf.add([high])  # replaces low
    assert [t.id for t in buf.top(5)] == [high.id]
    assert buf.get(low.id) is None
    buf.add([lower, higher])  # lower is dropped, higher replaces high, within one batch
    assert [t.id for t in buf.top(5)] == [higher.id]
    assert buf.last_add.duplicates == 2
    assert raw.hlen(dedup_key(run_name)) == 1
    assert raw.xlen(fresh_key(run_name)) == 4  # every new sample still reaches the learner
    assert buf.stats()["duplicates"] == 3


def test_dedup_off_keeps_identical_responses(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name, dedup=False)
    buf.add([make_trajectory(i, float(i), prompt="p", response="r") for i in range(3)])
    assert len(buf) == 3


def test_priority_eviction_keeps_the_best(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name, capacity=10)
    rewards = np.random.default_rng(0).normal(0, 3, size=53)
    ids_by_reward = {}
    for start in range(0, 53, 7):
        batch = trajs(rewards[start:start + 7], start=start)
        buf.add(batch)
        ids_by_reward.update({t.id: t.log_reward for t in batch})
    best = sorted(ids_by_reward, key=ids_by_reward.get)[-10:]
    assert sorted(t.id for t in buf.top(100)) == sorted(best)
    assert len(raw.keys(traj_key(run_name, "*"))) == 10
    assert raw.hlen(dedup_key(run_name)) == 10
    assert buf.stats()["evicted"] == 43


def test_fifo_eviction_keeps_the_newest(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name, capacity=10, eviction="fifo")
    added = []
    for start in range(0, 25, 5):
        batch = trajs([10.0 - start - i for i in range(5)], start=start)  # newer = worse
        buf.add(batch)
        added += [t.id for t in batch]
    assert sorted(t.id for t in buf.top(100)) == sorted(added[-10:])
    assert len(raw.keys(traj_key(run_name, "*"))) == 10
    with pytest.raises(ValueError, match="eviction"):
        ReplayBuffer(redis_url, run_name, eviction="priority")  # a run keeps its eviction rule


def test_memory_is_bounded_by_capacity(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name, capacity=100)
    rng = np.random.default_rng(1)

    def fill(start, count):
        for s in range(start, start + count, 100):
            buf.add([make_trajectory(i, float(rng.normal()), rng=rng) for i in range(s, s + 100)])

    fill(0, 500)
    used_early = raw.info("memory")["used_memory"]
    fill(500, 2000)
    used_late = raw.info("memory")["used_memory"]
    assert len(buf) == 100
    assert raw.dbsize() <= 100 + 8  # trajectory hashes + prio, dedup, meta, streams
    assert raw.hlen(dedup_key(run_name)) == 100
    assert raw.xlen(fresh_key(run_name)) <= 100 + 100  # approximate trimming keeps whole nodes
    assert used_late < used_early * 1.2, (used_early, used_late)


# ---------------------------------------------------------------- sampling distribution

def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Pearson statistic (cells with expectation < 5 pooled) and its p = 1e-4 critical value."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = 3.719  # upper 1e-4 normal quantile; Wilson–Hilferty approximation of the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def draw_counts(buf: ReplayBuffer, ids: list[str], draws: int, per_call: int = 1000) -> np.ndarray:
    index = {tid: i for i, tid in enumerate(ids)}
    counts = np.zeros(len(ids))
    for _ in range(draws // per_call):
        got = buf.sample(per_call)
        assert len(got) == per_call
        for traj in got:
            counts[index[traj.id]] += 1
    return counts


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature,bands", [(1.0, lua.NUM_BANDS), (3.0, lua.NUM_BANDS), (1.0, 4)])
def test_sampling_frequencies_match_the_softmax(redis_url, run_name, monkeypatch, temperature, bands):
    """bands=4 pushes most items into the tail band, exercising the rejection path there."""
    monkeypatch.setattr(lua, "NUM_BANDS", bands)
    rng = np.random.default_rng(7)
    rewards = np.concatenate([np.linspace(-9, 4, 24), [4.0, 4.0, 0.0, 0.0], rng.normal(0, 2, 8)])
    buf = ReplayBuffer(redis_url, run_name, priority_temperature=temperature, seed=3)
    batch = trajs(rewards)
    buf.add(batch)
    counts = draw_counts(buf, [t.id for t in batch], 50_000)
    probs = softmax(rewards / temperature)
    stat, critical = chi_square(counts, probs)
    assert stat < critical, (stat, critical)
    assert 0.5 * np.abs(counts / counts.sum() - probs).sum() < 0.02
    # the test has power: the same counts are far from a softmax at another temperature
    assert chi_square(counts, softmax(rewards / (1.3 * temperature)))[0] > 10 * critical


def test_uniform_prioritization_is_uniform(redis_url, run_name):
    rewards = np.linspace(-5, 5, 20)
    buf = ReplayBuffer(redis_url, run_name, prioritization="uniform", seed=1)
    batch = trajs(rewards)
    buf.add(batch)
    counts = draw_counts(buf, [t.id for t in batch], 20_000)
    stat, critical = chi_square(counts, np.full(20, 1 / 20))
    assert stat < critical, (stat, critical)


def test_sample_edge_cases(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name, seed=5)
    assert buf.sample(8) == []
    buf.add(trajs([0.0, 1.0]))
    first = [t.id for t in ReplayBuffer(redis_url, run_name, seed=5).sample(50)]
    again = [t.id for t in ReplayBuffer(redis_url, run_name, seed=5).sample(50)]
    assert first == again  # seeded: reproducible
    got = buf.sample(50)
    assert len(got) == 50 and all(t.id for t in got)
    assert len({id(t) for t in got}) == 50  # repeats are copies, not aliases


# ---------------------------------------------------------------- corruption

def plant(url: str, *args: str | bytes) -> None:
    """Write with raw commands, through redis-cli when it is installed."""
    cli = shutil.which("redis-cli")
    if cli and all(isinstance(a, str) for a in args):
        subprocess.run([cli, "-u", url, *args], check=True, capture_output=True)
    else:
        client = redis.Redis.from_url(url)
        client.execute_command(*args)
        client.close()


def test_corrupt_and_unknown_schema_blobs_are_skipped_counted_and_logged(redis_url, run_name, caplog, raw):
    buf = ReplayBuffer(redis_url, run_name, seed=0)
    good = trajs([0.0, 0.5])
    buf.add(good)
    bad_key = traj_key(run_name, "bad")
    plant(redis_url, "HSET", bad_key, "prompt", "x", "response", "y", "blob", "\x93not msgpack")
    plant(redis_url, "ZADD", prio_key(run_name), "9", "bad")
    newer = msgpack.packb({"v": 999, "id": "newer"})
    plant(redis_url, "HSET", traj_key(run_name, "newer"), "prompt", "x", "blob", newer)
    plant(redis_url, "ZADD", prio_key(run_name), "9", "newer")
    plant(redis_url, "ZADD", prio_key(run_name), "9", "hashless")
    with caplog.at_level(logging.WARNING, logger="buffer.replay"):
        got = buf.sample(64)
        top = buf.top(10)
    assert len(got) == 64 and {t.id for t in got} <= {t.id for t in good}
    assert {t.id for t in top} == {t.id for t in good}
    assert buf.get("bad") is None
    assert buf.stats()["decode_errors"] >= 3
    # taken out of the sampling index, left in place for a person to look at
    assert len(buf) == 2 and raw.exists(bad_key)
    failed = [fields for _, fields in raw.xrange("pag:%s:failed" % run_name)]
    assert {f[b"key"].decode() for f in failed} == {bad_key, traj_key(run_name, "newer"), traj_key(run_name, "hashless")}
    assert bad_key in caplog.text and traj_key(run_name, "newer") in caplog.text
    assert "schema 999" in caplog.text


def test_corrupt_pending_entry_is_skipped_recorded_and_acknowledged(redis_url, run_name, raw):
    buf = ReplayBuffer(redis_url, run_name)
    buf.push_pending(trajs([float("nan")]))
    plant(redis_url, "XADD", "pag:%s:pending" % run_name, "*", "id", "junk", "blob", "garbage")
    got = buf.read_pending("w0", 10)
    assert len(got) == 1
    assert buf.pending_len() == 1  # the poison entry is gone; the good one awaits its ack
    stats = buf.stats()
    assert stats["decode_errors"] == 1 and stats["failed"] == 1
    assert raw.xrange("pag:%s:failed" % run_name)[0][1][b"reason"].startswith(b"decode")
