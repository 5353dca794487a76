"""Bad data in a run's Redis keys (issue 21): each kind is skipped, counted, logged once with its key and
never trained on by the learner, and `pag buffer check` reports it and moves it aside."""
import json
import logging

import msgpack
import pytest
import redis

from buffer import ReplayBuffer
from buffer.cli import main
from buffer.testing import make_trajectory
from common.constants import fresh_key, meta_key, prio_key, run_key, traj_key
from common.trajectory import encode, to_redis_hash
from learner.learner import Learner

VOCAB = 50257


def _record(traj, **changes):
    """A msgpack blob as `encode` writes it, with fields changed or dropped (None) — what a foreign or
    buggy writer could leave."""
    record = msgpack.unpackb(encode(traj), raw=False)
    for name, value in changes.items():
        if value is None:
            record.pop(name)
        else:
            record[name] = value
    return msgpack.packb(record, use_bin_type=True)


def _plant(client, run, tid, blob, *, announce=True):
    """A trajectory hash, its `prio` member and its `fresh` entry, written behind the buffer's back."""
    client.hset(traj_key(run, tid), mapping={"prompt": "x", "response": "y", "blob": blob})
    client.zadd(prio_key(run), {tid: 9.0})  # the best score, so replay draws it first
    if announce:
        client.xadd(fresh_key(run), {"id": tid, "log_reward": "9"})


@pytest.fixture
def planted(redis_url, run_name):
    """A buffer with 12 good trajectories and one of each kind of bad entry."""
    buf = ReplayBuffer(redis_url, run_name, seed=0)
    good = [make_trajectory(i, 0.1 * i, length=6) for i in range(12)]
    buf.add(good)
    raw = redis.Redis.from_url(redis_url)
    base = make_trajectory(99, 1.0, length=6)
    bad = {
        "nan_reward": _record(base, id="nan_reward", log_reward=float("nan")),
        "big_token": _record(base, id="big_token", response_ids=[5, 60000, 7, 8, 9, 10]),
        "negative_token": _record(base, id="negative_token", prompt_ids=[-3, 1, 2]),
        "inf_logprob": _record(base, id="inf_logprob", ref_logprobs=[-1.0, float("inf"), -1, -1, -1, -1]),
        "no_fields": _record(base, id="no_fields", response_ids=None),
        "schema_9": _record(base, id="schema_9", v=9),
        "not_msgpack": b"\xc1\xc1 not msgpack",
    }
    for tid, blob in bad.items():
        _plant(raw, run_name, tid, blob)
    raw.xadd(fresh_key(run_name), {"id": "evicted_long_ago", "log_reward": "1"})  # a hash that is gone
    raw.zadd(prio_key(run_name), {"hashless": 9.0})
    raw.set(run_key(run_name, "somebody_elses"), "1")
    raw.hset(traj_key(run_name, "unindexed"), mapping=to_redis_hash(make_trajectory(50, 1.0, length=6)))
    yield buf, raw, {t.id for t in good}, set(bad)
    raw.close()
    buf.close()


def test_the_learner_skips_counts_and_logs_each_bad_entry_once(small_learner_config, planted, tmp_path, caplog):
    buf, raw, good, bad = planted
    learner = Learner(small_learner_config("learner.replay_ratio=0.5", "learner.fresh_policy=fill"), buf, tmp_path, resume=False)
    seen: set[str] = set()
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            micro = learner.collect(8, wait_s=5)
            seen |= {t.id for t in micro.trajectories}
            buf.ack_fresh(micro.entry_ids)
        metrics = learner.update([learner.collect(8, wait_s=5).trajectories])
    assert seen and seen <= good | {"unindexed"}, seen & bad  # never trained on
    assert metrics["loss/total"] == metrics["loss/total"]  # finite: nothing poisoned the step
    stats = buf.stats()
    assert stats["rejected"] >= 4 and stats["decode_errors"] >= 3 and stats["fresh_gone"] >= 1
    for tid in ("nan_reward", "big_token", "negative_token", "inf_logprob"):
        assert caplog.text.count(traj_key(buf.run, tid)) == 1, tid  # logged once, with the key
        assert raw.zscore(prio_key(buf.run), tid) is None  # replay stops drawing it
        assert raw.exists(traj_key(buf.run, tid))  # kept for a person to look at
    assert raw.hget(meta_key(buf.run), "vocab_size") == str(VOCAB).encode()
    reasons = [f[b"reason"].decode() for _, f in raw.xrange(run_key(buf.run, "failed"))]
    assert sum(r.startswith("invalid: ") for r in reasons) == 4


def test_buffer_check_reports_each_kind_and_quarantines(redis_url, planted, capsys):
    buf, raw, good, bad = planted
    args = ["check", "--run", buf.run, "--redis-url", redis_url, "--vocab-size", str(VOCAB)]
    assert main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    kinds = {kind: {item.get("id", item.get("key")) for item in report[kind]}
             for kind in ("corrupt", "invalid", "unindexed", "dangling", "foreign")}
    assert kinds == {"corrupt": {"no_fields", "schema_9", "not_msgpack"},
                     "invalid": {"nan_reward", "big_token", "negative_token", "inf_logprob"},
                     "unindexed": {"unindexed"}, "dangling": {"hashless"},
                     "foreign": {run_key(buf.run, "somebody_elses")}}
    assert report["trajectories"] == len(good) + len(bad) + 1 and report["fresh_gone"] == 1
    assert main([*args, "--quarantine"]) == 1
    out = capsys.readouterr().out
    assert "quarantined 8 trajectory hashes" in out and "big_token" in out and "outside the vocabulary" in out
    assert main([*args, "--json"]) == 1  # only the foreign key is left, and it is left alone
    after = json.loads(capsys.readouterr().out)
    assert after["problems"] == 1 and after["already_quarantined"] == 8 and raw.exists(run_key(buf.run, "somebody_elses"))
    assert len(buf) == len(good) and raw.exists(run_key(buf.run, "quarantine", "big_token"))
    raw.delete(run_key(buf.run, "somebody_elses"))
    assert main([*args]) == 0  # a clean buffer exits 0
