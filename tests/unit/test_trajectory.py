import math

import msgpack
import pytest

from common.constants import TRAJECTORY_SCHEMA
from common.trajectory import (CorruptBlobError, SchemaVersionError, Trajectory, decode, encode,
                               from_redis_hash, to_redis_hash, untrainable)


def make(**kw) -> Trajectory:
    base = dict(prompt="a cat", response="a cat, oil painting", prompt_ids=[1, 2], response_ids=[3, 4, 5],
                ref_logprobs=[-1.5, -0.25, -3.0], policy_version=7, run="demo",
                scores={"aes": 5.25, "rel": 0.0}, log_reward=12.5)
    base.update(kw)
    return Trajectory(**base)


def test_round_trip_keeps_every_field():
    traj = make()
    assert decode(encode(traj)) == traj


def test_unscored_nan_round_trips():
    back = decode(encode(make(log_reward=float("nan"))))
    assert math.isnan(back.log_reward) and not back.scored


def test_lengths_must_match():
    with pytest.raises(ValueError, match="ref_logprobs has 2 entries"):
        make(ref_logprobs=[0.0, 0.0])


@pytest.mark.parametrize("blob", [b"", b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"id": "x"})])
def test_corrupt_blob_raises_typed_error(blob):
    with pytest.raises(CorruptBlobError):
        decode(blob)


def test_wrong_field_type_is_corrupt():
    record = msgpack.unpackb(encode(make()))
    record["response_ids"] = ["not", "ints"]
    with pytest.raises(CorruptBlobError, match="wrong type"):
        decode(msgpack.packb(record))


@pytest.mark.parametrize("blob, message", [
    (b"\xc1garbage", r"^not a msgpack record: "),
    (msgpack.packb([1, 2, 3]), r"^msgpack record has no schema version field 'v'$"),
    (msgpack.packb({"v": 1, "id": "x"}), r"^msgpack record lacks fields \['run', 'prompt', "),
])
def test_a_corrupt_blob_says_what_is_wrong(blob, message):
    with pytest.raises(CorruptBlobError, match=message):
        decode(blob)


def test_a_map_key_that_is_not_a_string_is_corrupt():
    record = msgpack.unpackb(encode(make()))
    record["scores"] = {1: 5.25}
    with pytest.raises(CorruptBlobError, match="not a msgpack record: int is not allowed for map key"):
        decode(msgpack.packb(record))


def test_newer_schema_raises():
    record = msgpack.unpackb(encode(make()))
    record["v"] = TRAJECTORY_SCHEMA + 1
    with pytest.raises(SchemaVersionError, match="not understood"):
        decode(msgpack.packb(record))


def test_redis_hash_is_readable_and_decodes():
    traj = make()
    mapping = to_redis_hash(traj)
    assert mapping["prompt"] == "a cat" and mapping["log_reward"] == "12.5" and mapping["aes"] == "5.25"
    assert mapping["created_at"].endswith("+00:00") and mapping["policy_version"] == "7"
    assert to_redis_hash(make(log_reward=float("nan")))["log_reward"] == "nan", "redis-cli reads nan, not a number"
    raw = {k.encode(): (v if isinstance(v, bytes) else v.encode()) for k, v in mapping.items()}
    assert from_redis_hash(raw) == traj
    with pytest.raises(CorruptBlobError, match="^hash has no 'blob' field$"):
        from_redis_hash({b"prompt": b"x"})
    # a client that decodes responses (str keys, the blob as latin-1 text) reads the same trajectory
    text = {k.decode(): v.decode("latin-1") for k, v in raw.items()}
    assert from_redis_hash(text) == traj


def test_untrainable_names_each_fault():
    t = make(response_ids=[3, 4, 5, 6], ref_logprobs=[-1.0, -1.0, -1.0, -1.0])
    assert untrainable(t, 50257) is None
    assert untrainable(t.replace(ref_logprobs=[-1.0, 0.0, -1.0, -1.0], response_ids=[3, 4, 5, 50256]), 50257) is None
    assert "not a scored" in untrainable(t.replace(log_reward=float("nan")), 50257)
    too_big = t.replace(response_ids=[1, 2, 3, 50257])
    assert "token id 50257, outside the vocabulary [0, 50257)" in untrainable(too_big, 50257)
    assert "prompt_ids holds token id -1" in untrainable(t.replace(prompt_ids=[-1]), None)
    assert untrainable(too_big, None) is None  # no vocabulary known: only >= 0 is checked
    assert "inf" in untrainable(t.replace(log_reward=float("inf")), 50257)
    assert "not a log-probability" in untrainable(t.replace(ref_logprobs=[-1.0, 0.5, -1.0, -1.0]), 50257)
    assert untrainable(t.replace(response_ids=[], ref_logprobs=[]), 50257) == "no response tokens"
    assert untrainable(t.replace(prompt_ids=[-1]), None) == \
        "prompt_ids holds token id -1, outside the vocabulary [0, ∞)"
    assert untrainable(t.replace(prompt_ids=[0], response_ids=[0, 4, 5, 6]), 50257) is None, "token id 0 is a token"
    assert untrainable(t.replace(ref_logprobs=[-1.0, 1e-6, -1.0, -1.0]), 50257) is None, "1e-6 of rounding slack"
