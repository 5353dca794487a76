"""`pag buffer check`: find what a run's keys hold that the learner would skip, and move it aside.

Every key under `pag:{run}:` is read once (SCAN, pipelined in chunks; safe on a live run):

    corrupt      a `traj:{id}` hash whose blob is not a msgpack record of a known schema, or lacks fields
    invalid      one that decodes but must not be trained on (common.trajectory.untrainable: a reward that
                 is not finite, a token id outside the vocabulary, a reference log-prob that is not one)
    unindexed    a hash the `prio` index does not name (replay never draws it)
    dangling     a `prio` member with no hash behind it
    foreign      a key under the run's prefix that is not part of the layout (docs/design.md)
    fresh_gone   `fresh` entries naming a trajectory that is gone (the learner skips and counts them)

`--quarantine` renames each corrupt, invalid and unindexed hash to `pag:{run}:quarantine:{id}` (and takes
it out of `prio`) and removes dangling members from `prio`; nothing is deleted, foreign keys are only
reported (another tool may own them). The vocabulary size comes from the run's meta (the learner records
it) or `--vocab-size`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import redis

from common.constants import fresh_key, meta_key, prio_key, run_key
from common.trajectory import TrajectoryDecodeError, decode, untrainable

#: the fixed keys of a run's layout; `traj:` and `quarantine:` are the two families of per-id keys
LAYOUT = ("meta", "prio", "pending", "fresh", "failed", "dedup", "order", "gprio", "group")
PROBLEMS = ("corrupt", "invalid", "unindexed", "dangling", "foreign")
CHUNK = 500


def _chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _scan(client: redis.Redis, run: str) -> tuple[list[str], list[str], int]:
    """(trajectory ids with a hash, foreign keys, quarantined count) under the run's prefix."""
    prefix = run_key(run, "")
    fixed = {prefix + name for name in LAYOUT}
    ids, foreign, quarantined = [], [], 0
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    for raw in client.scan_iter(match=pattern, count=1000):
        key = raw.decode()
        if key.startswith(prefix + "traj:"):
            ids.append(key[len(prefix) + 5:])
        elif key.startswith(prefix + "quarantine:"):
            quarantined += 1
        elif key not in fixed:
            foreign.append(key)
    return ids, sorted(foreign), quarantined


def _judge(blob: Optional[bytes], vocab_size: Optional[int]) -> Optional[tuple[str, str]]:
    """(kind, reason) of a hash's blob, or None when it is fine."""
    try:
        if blob is None:
            raise TrajectoryDecodeError("hash has no 'blob' field")
        traj = decode(blob)
    except TrajectoryDecodeError as exc:
        return "corrupt", str(exc)
    reason = untrainable(traj, vocab_size)
    return ("invalid", reason) if reason else None


def _hashes(client: redis.Redis, run: str, ids: list[str], vocab_size: Optional[int],
            found: dict[str, list[dict[str, str]]]) -> None:
    prio = prio_key(run)
    for part in _chunks(ids):
        pipe = client.pipeline(transaction=False)
        for tid in part:
            pipe.exists(run_key(run, "traj", tid))
            pipe.hget(run_key(run, "traj", tid), "blob")
        replies = pipe.execute()
        scores = client.zmscore(prio, part)
        for i, tid in enumerate(part):
            if not replies[2 * i]:
                continue  # evicted since the scan
            verdict = _judge(replies[2 * i + 1], vocab_size)
            if verdict is None and scores[i] is None:
                verdict = ("unindexed", "not in the prio index: replay never draws it")
            if verdict is not None:
                found[verdict[0]].append({"id": tid, "key": run_key(run, "traj", tid), "reason": verdict[1]})


def _exists(client: redis.Redis, run: str, ids: list[str]) -> list[bool]:
    """Whether each id's `traj:{id}` hash exists, asked in pipelined chunks."""
    out: list[bool] = []
    for part in _chunks(ids):
        pipe = client.pipeline(transaction=False)
        for tid in part:
            pipe.exists(run_key(run, "traj", tid))
        out += [bool(there) for there in pipe.execute()]
    return out


def _dangling(client: redis.Redis, run: str) -> list[dict[str, str]]:
    members = [m.decode() for m in client.zrange(prio_key(run), 0, -1)]
    missing = [tid for tid, there in zip(members, _exists(client, run, members)) if not there]
    if not missing:
        return []
    again = client.zmscore(prio_key(run), missing)  # a member evicted since ZRANGE left prio with its hash
    return [{"id": tid, "key": prio_key(run), "reason": "prio member without a hash"}
            for tid, score in zip(missing, again) if score is not None]


def _fresh_gone(client: redis.Redis, run: str) -> int:
    ids = [f[b"id"].decode() for _, f in client.xrange(fresh_key(run)) if b"blob" not in f and b"id" in f]
    return sum(1 for there in _exists(client, run, ids) if not there)


def quarantine(client: redis.Redis, run: str, found: dict[str, list[dict[str, str]]]) -> int:
    """Move the bad hashes aside and drop dangling index members; returns how many entries were moved."""
    moved = 0
    for kind in ("corrupt", "invalid", "unindexed"):
        for item in found[kind]:
            pipe = client.pipeline(transaction=True)
            pipe.zrem(prio_key(run), item["id"])
            pipe.rename(item["key"], run_key(run, "quarantine", item["id"]))
            try:
                pipe.execute()
                moved += 1
            except redis.ResponseError:  # evicted meanwhile: nothing left to move
                pass
    if found["dangling"]:
        client.zrem(prio_key(run), *[item["id"] for item in found["dangling"]])
    return moved


def check_buffer(client: redis.Redis, run: str, vocab_size: Optional[int] = None,
                 move: bool = False) -> dict[str, Any]:
    """The report `pag buffer check` prints: per kind a count and the entries, plus what was done."""
    if vocab_size is None:
        stored = client.hget(meta_key(run), "vocab_size")
        vocab_size = int(stored) if stored else None
    ids, foreign, quarantined = _scan(client, run)
    found: dict[str, list[dict[str, str]]] = {kind: [] for kind in PROBLEMS}
    _hashes(client, run, ids, vocab_size, found)
    found["dangling"] = _dangling(client, run)
    found["foreign"] = [{"key": key, "reason": "not part of the run's layout"} for key in foreign]
    report: dict[str, Any] = {
        "run": run, "trajectories": len(ids), "vocab_size": vocab_size, "already_quarantined": quarantined,
        "fresh_gone": _fresh_gone(client, run), "problems": sum(len(v) for v in found.values()),
        **{kind: found[kind] for kind in PROBLEMS},
    }
    report["quarantined"] = quarantine(client, run, found) if move else 0
    return report
