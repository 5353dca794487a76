"""The unit of data that crosses processes: one rewrite of one plain prompt, scored or not.

A trajectory travels as msgpack (never pickle) with an explicit schema version, so a
reward worker written in another language, or a newer release of this one, can read it or
fail loudly. In Redis it is a HASH whose readable fields a person inspects with
`HGETALL pag:{run}:traj:{id}` and whose `blob` field holds the full msgpack record.
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

import msgpack

from common.constants import TRAJECTORY_SCHEMA
from common.errors import UsageError


class TrajectoryDecodeError(UsageError, ValueError):
    """A blob that cannot be turned back into a Trajectory (corrupt, wrong shape, or too new)."""

    label = "buffer data error"


class CorruptBlobError(TrajectoryDecodeError):
    """The bytes are not a msgpack record of the expected shape."""


class SchemaVersionError(TrajectoryDecodeError):
    """The record was written by a newer (or unknown) schema than this code understands."""


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Trajectory:
    """One sampled rewrite y of a plain prompt x.

    `ref_logprobs[t]` is log p_ref(y_{t+1} | x, y_<=t) under the frozen reference, raw
    (not divided by γ): the learner applies its own temperatures. `log_reward` is r/β, the
    quantity both FL-DB and the replay priority consume; the components of r are in `scores`.
    """

    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    ref_logprobs: list[float]
    policy_version: int = 0
    run: str = ""
    id: str = field(default_factory=new_id)
    scores: dict[str, float] = field(default_factory=dict)
    log_reward: float = float("nan")
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if len(self.ref_logprobs) != len(self.response_ids):
            raise ValueError(
                f"trajectory {self.id}: ref_logprobs has {len(self.ref_logprobs)} entries, "
                f"response_ids has {len(self.response_ids)}; they must match one per response token"
            )

    @property
    def scored(self) -> bool:
        return math.isfinite(self.log_reward)

    def replace(self, **changes: Any) -> "Trajectory":
        return dataclasses.replace(self, **changes)


_FIELDS = (
    "id", "run", "prompt", "response", "prompt_ids", "response_ids", "ref_logprobs",
    "policy_version", "scores", "log_reward", "created_at",
)


def encode(traj: Trajectory) -> bytes:
    """msgpack record `{"v": schema, field: value, …}`; floats keep double precision."""
    record: dict[str, Any] = {"v": TRAJECTORY_SCHEMA}
    for name in _FIELDS:
        record[name] = getattr(traj, name)
    return msgpack.packb(record, use_bin_type=True)


def decode(blob: bytes) -> Trajectory:
    """Inverse of `encode`; raises CorruptBlobError or SchemaVersionError, never anything else."""
    try:
        record = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CorruptBlobError(f"not a msgpack record: {exc}") from exc
    if not isinstance(record, dict) or "v" not in record:
        raise CorruptBlobError("msgpack record has no schema version field 'v'")
    version = record["v"]
    if not isinstance(version, int) or version > TRAJECTORY_SCHEMA or version < 1:
        raise SchemaVersionError(
            f"trajectory schema {version!r} is not understood (this code reads 1..{TRAJECTORY_SCHEMA})"
        )
    missing = [name for name in _FIELDS if name not in record]
    if missing:
        raise CorruptBlobError(f"msgpack record lacks fields {missing}")
    try:
        return Trajectory(
            id=str(record["id"]),
            run=str(record["run"]),
            prompt=str(record["prompt"]),
            response=str(record["response"]),
            prompt_ids=[int(i) for i in record["prompt_ids"]],
            response_ids=[int(i) for i in record["response_ids"]],
            ref_logprobs=[float(v) for v in record["ref_logprobs"]],
            policy_version=int(record["policy_version"]),
            scores={str(k): float(v) for k, v in dict(record["scores"]).items()},
            log_reward=float(record["log_reward"]),
            created_at=float(record["created_at"]),
        )
    except (TypeError, ValueError) as exc:
        raise CorruptBlobError(f"msgpack record has a field of the wrong type: {exc}") from exc


def untrainable(traj: Trajectory, vocab_size: Optional[int] = None) -> Optional[str]:
    """Why a decoded trajectory must not reach a loss, or None: a reward that is not a finite number, no
    response, a token id outside [0, vocab_size), a reference log-probability that is not one (finite,
    ≤ 0). A blob can decode and still be any of these (a foreign writer, a bug, a bit flip)."""
    if not traj.scored:
        return f"log_reward is {traj.log_reward}: not a scored trajectory"
    if not traj.response_ids:
        return "no response tokens"
    for name in ("prompt_ids", "response_ids"):
        ids = getattr(traj, name)
        bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
        if bad:
            limit = f"[0, {vocab_size})" if vocab_size is not None else "[0, ∞)"
            return f"{name} holds token id {bad[0]}, outside the vocabulary {limit}"
    bad_lp = [v for v in traj.ref_logprobs if not (math.isfinite(v) and v <= 1e-6)]
    if bad_lp:
        return f"ref_logprobs holds {bad_lp[0]}: not a log-probability (finite, <= 0)"
    return None


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.6g}"


def to_redis_hash(traj: Trajectory) -> dict[str, str | bytes]:
    """Readable fields for redis-cli plus the authoritative msgpack `blob`."""
    mapping: dict[str, str | bytes] = {
        "prompt": traj.prompt,
        "response": traj.response,
        "log_reward": _fmt(traj.log_reward),
        "policy_version": str(traj.policy_version),
        "created_at": datetime.fromtimestamp(traj.created_at, tz=timezone.utc).isoformat(timespec="seconds"),
        "blob": encode(traj),
    }
    for name, value in traj.scores.items():
        mapping[name] = _fmt(value)
    return mapping


def from_redis_hash(mapping: Mapping[bytes | str, bytes | str]) -> Trajectory:
    """Decode a HGETALL result; only the blob is authoritative."""
    blob = mapping.get(b"blob", mapping.get("blob"))
    if blob is None:
        raise CorruptBlobError("hash has no 'blob' field")
    if isinstance(blob, str):
        blob = blob.encode("latin-1")
    return decode(blob)
