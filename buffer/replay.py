"""The replay service client: scored trajectories in Redis, sampled with P(i) ∝ exp(log R_i / T).

    buf = ReplayBuffer("redis://127.0.0.1:6379/0", run="demo", capacity=5000)
    buf.add(trajs)                  # atomic per batch; dedup; eviction; announced on `fresh`
    batch = buf.sample(128)         # with replacement, exact softmax over log_reward
    for entry_id, traj in buf.read_fresh("learner-0", 64): …; buf.ack_fresh([...])

Everything a run keeps lives under `pag:{run}:` (docs/design.md), readable with redis-cli:
`traj:{id}` hashes, the `prio` ZSET (id → log_reward, the sampling index — see buffer/lua.py for
why it needs no other structure), `pending` and `fresh` streams, `meta` counters, a bounded
`failed` stream, and two bookkeeping keys: `dedup` (sha1(prompt NUL response) → id) and, for FIFO
eviction only, `order` (id → insertion sequence). Every multi-key change is one Lua script, so a
batch is all-or-nothing for every reader and in the AOF. Requires Redis ≥ 6.2 (ZMSCORE, XAUTOCLAIM).
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
from typing import Any, Collection, Iterator, Literal, Optional

import numpy as np

from common.constants import (LAYOUT_SCHEMA, LEARNER_GROUP, SCORERS_GROUP, TRAJECTORY_SCHEMA, dedup_key,
                              failed_key, fresh_key, meta_key, order_key, pending_key, prio_key,
                              run_key, traj_key)
from common.trajectory import Trajectory, TrajectoryDecodeError, decode, encode, from_redis_hash

from buffer import lua
from buffer.batch import AddResult, add_args
from buffer.groups import GroupIndex
from buffer.connection import connect, redact
from buffer.streams import Entry, WorkStream

log = logging.getLogger(__name__)

#: counters kept in `pag:{run}:meta`
COUNTERS = ("added", "duplicates", "evicted", "repeats", "decode_errors", "rejected", "failed", "fresh_gone",
            "pending_reclaimed", "fresh_reclaimed")


class BufferNotFoundError(LookupError):
    """`attach` found no `pag:{run}:meta` at that URL."""


class ReplayBuffer:
    def __init__(
        self,
        redis_url: str,
        run: str,
        capacity: int = 5000,
        eviction: Literal["priority", "fifo"] = "priority",
        prioritization: Literal["reward", "uniform"] = "reward",
        priority_temperature: float = 1.0,
        dedup: bool = True,
        seed: Optional[int] = None,
        *,
        priority_of: Literal["reward", "paper"] = "reward",
        fresh_maxlen: Optional[int] = None,
        failed_maxlen: int = 1000,
        reconnect_retries: int = 10,
        socket_timeout: Optional[float] = 30.0,
        create: bool = True,
        redis_options: Optional[dict[str, Any]] = None,
    ) -> None:
        """`fresh_maxlen` bounds the fresh stream (default: capacity) when no learner drains it.
        `create=False` attaches to an existing run and writes nothing on construction."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if eviction not in ("priority", "fifo"):
            raise ValueError(f"eviction must be 'priority' or 'fifo', got {eviction!r}")
        if prioritization not in ("reward", "uniform"):
            raise ValueError(f"prioritization must be 'reward' or 'uniform', got {prioritization!r}")
        if priority_of not in ("reward", "paper"):
            raise ValueError(f"priority_of must be 'reward' or 'paper', got {priority_of!r}")
        if not (priority_temperature > 0 and math.isfinite(priority_temperature)):
            raise ValueError(f"priority_temperature must be a positive number, got {priority_temperature!r}")
        self.run = run
        self.url = redact(redis_url)
        self.capacity = int(capacity)
        self.eviction = eviction
        self.prioritization = prioritization
        self.priority_of = priority_of
        self.priority_temperature = float(priority_temperature)
        self.dedup = bool(dedup)
        self.fresh_maxlen = int(fresh_maxlen or capacity)
        self.failed_maxlen = int(failed_maxlen)
        self.rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()  # a client may be shared by threads; numpy's Generator may not
        self.last_add: Optional[AddResult] = None
        self.client = connect(redis_url, retries=reconnect_retries, socket_timeout=socket_timeout,
                              **(redis_options or {}))
        self._keys = dict(prio=prio_key(run), meta=meta_key(run), fresh=fresh_key(run),
                          dedup=dedup_key(run), order=order_key(run), failed=failed_key(run))
        self._traj_prefix = traj_key(run, "")
        self._groups = GroupIndex(self.client, run_key(run, ""), self._keys["prio"])
        self._add = self.client.register_script(lua.ADD)
        self._sample = self.client.register_script(lua.SAMPLE)
        self._logged_corrupt: set[str] = set()
        self.pending = WorkStream(self.client, pending_key(run), SCORERS_GROUP, self._on_corrupt, socket_timeout,
                                  on_reclaim=lambda n: self.incr_counter("pending_reclaimed", n))
        self.fresh = WorkStream(self.client, fresh_key(run), LEARNER_GROUP, self._on_corrupt, socket_timeout,
                                lookup=self._blobs, on_gone=lambda n: self.incr_counter("fresh_gone", n),
                                on_reclaim=lambda n: self.incr_counter("fresh_reclaimed", n))
        if create:
            self._init_run()

    @classmethod
    def from_config(cls, buffer_cfg: Any, run: str, redis_url: Optional[str] = None, **kwargs: Any) -> "ReplayBuffer":
        """From a `common.config.BufferConfig`; `redis_url` overrides the config's."""
        url = redis_url or buffer_cfg.redis_url
        if not url:
            raise ValueError("buffer.redis_url is None and no redis_url was given: start a private "
                             "server (common.redis_server.RedisServer) and pass its .url")
        return cls(url, run, capacity=buffer_cfg.capacity, eviction=buffer_cfg.eviction,
                   prioritization=buffer_cfg.prioritization,
                   priority_temperature=buffer_cfg.priority_temperature, dedup=buffer_cfg.dedup,
                   priority_of=getattr(buffer_cfg, "priority_of", "reward"), **kwargs)

    @classmethod
    def attach(cls, redis_url: str, run: str, **kwargs: Any) -> "ReplayBuffer":
        """Open an existing run with the options stored in its meta, writing nothing (the CLI)."""
        probe = cls(redis_url, run, create=False, **kwargs)
        stored = probe.meta()
        probe.close()
        if not stored:
            raise BufferNotFoundError(f"no replay buffer for run {run!r} at {redact(redis_url)} "
                                      f"(key {meta_key(run)} does not exist)")
        opts = dict(capacity=int(stored.get("capacity", 5000)), eviction=stored.get("eviction", "priority"),
                    dedup=stored.get("dedup", "1") == "1")
        opts.update(kwargs)
        return cls(redis_url, run, create=False, **opts)

    def _init_run(self) -> None:
        meta = self._keys["meta"]
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(meta, "layout_schema", LAYOUT_SCHEMA)
        pipe.hsetnx(meta, "trajectory_schema", TRAJECTORY_SCHEMA)
        pipe.hsetnx(meta, "created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        pipe.hsetnx(meta, "eviction", self.eviction)
        pipe.hsetnx(meta, "dedup", int(self.dedup))
        pipe.hset(meta, "capacity", self.capacity)
        for name in COUNTERS:
            pipe.hsetnx(meta, name, 0)
        pipe.hmget(meta, "layout_schema", "eviction", "dedup")
        layout, eviction, dedup = pipe.execute()[-1]
        if int(layout) > LAYOUT_SCHEMA:
            raise RuntimeError(f"{meta}: layout_schema {int(layout)} is newer than this code ({LAYOUT_SCHEMA}); upgrade pag")
        if eviction.decode() != self.eviction or int(dedup) != int(self.dedup):
            raise ValueError(f"run {self.run!r} was created with eviction={eviction.decode()!r}, "
                             f"dedup={bool(int(dedup))}; this client asks for eviction={self.eviction!r}, "
                             f"dedup={self.dedup} (HGETALL {meta} shows them): use the same buffer config")
        self.pending.ensure_group()
        self.fresh.ensure_group()

    # ------------------------------------------------------------------ replay

    def add(self, trajs: list[Trajectory]) -> list[str]:
        """Store scored trajectories atomically; returns their ids in order.

        An id already stored is neither stored again nor re-announced. Every new id is announced
        on `fresh`, so the learner's online half sees every newly scored sample: by id when it was
        kept in replay, with its blob when dedup or eviction kept it out (one copy of each blob
        is written either way). A kept one evicted before the learner reads it is skipped and
        counted as `fresh_gone`. Counts of this call are in `self.last_add`."""
        if not trajs:
            self.last_add = AddResult(0, 0, 0, 0)
            return []
        argv = add_args(trajs, self._traj_prefix, self.capacity, self.dedup, self.eviction == "fifo",
                        self.fresh_maxlen)
        k = self._keys
        stored, dup, evicted, repeats = self._add(
            keys=[k["prio"], k["meta"], k["fresh"], k["dedup"], k["order"]], args=argv)
        self.last_add = AddResult(int(stored), int(dup), int(evicted), int(repeats))
        if self.priority_of == "paper":
            self._groups.index(trajs)
        return [t.id for t in trajs]

    def __len__(self) -> int:
        return int(self.client.zcard(self._keys["prio"]))

    def sample(self, n: int) -> list[Trajectory]:
        """n draws with replacement, P(i) ∝ exp(log_reward_i / T) (or uniform); exact, O(n log N).

        A blob that does not decode is skipped, counted and logged, and redrawn. With
        `priority_of="paper"`: per-prompt groups by the official priority (buffer/groups.py)."""
        if self.priority_of == "paper" and self.prioritization != "uniform":
            return self._sample_groups(n)
        out: list[Trajectory] = []
        for _ in range(20):
            need = n - len(out)
            if need <= 0:
                break
            got, drew = self._draw(need)
            out += got
            if drew == 0:  # empty buffer
                break
        return out

    def _sample_groups(self, n: int) -> list[Trajectory]:
        if n <= 0:
            return []
        with self._rng_lock:
            ids = self._groups.draw(n, self.rng, self.priority_temperature)
        uniq = list(dict.fromkeys(ids))
        decoded = {tid: self._decode(tid.encode(), blob) for tid, blob in zip(uniq, self._blobs([u.encode() for u in uniq]))}
        out: list[Trajectory] = []
        used: set[str] = set()
        for tid in ids:
            traj = decoded[tid]
            if traj is not None:
                out.append(copy.copy(traj) if tid in used else traj)
                used.add(tid)
        return out

    def _draw(self, n: int) -> tuple[list[Trajectory], int]:
        uniform = self.prioritization == "uniform"
        n_uniforms = n if uniform else lua.UNIFORMS_PER_ATTEMPT * (2 * n + 16)
        with self._rng_lock:
            uniforms = self.rng.random(n_uniforms).astype("<f8").tobytes()
        picks, uniq, blobs = self._sample(
            keys=[self._keys["prio"]],
            args=[self._traj_prefix, n, self.prioritization, repr(self.priority_temperature),
                  lua.NUM_BANDS, lua.BAND_WIDTH, uniforms])
        decoded: dict[bytes, Optional[Trajectory]] = {}
        for tid, blob in zip(uniq, blobs):
            decoded[tid] = self._decode(tid, blob)
        out: list[Trajectory] = []
        used: set[bytes] = set()
        for tid in picks:
            traj = decoded[tid]
            if traj is None:
                continue
            out.append(copy.copy(traj) if tid in used else traj)  # a repeat is a copy, not an alias
            used.add(tid)
        return out, len(picks)

    def _decode(self, tid: bytes, blob: Optional[bytes]) -> Optional[Trajectory]:
        """Decode a blob reached through the `prio` index; one that fails is skipped (`_skip`)."""
        try:
            if blob is None:
                raise TrajectoryDecodeError("hash or its 'blob' field is missing")
            return decode(blob)
        except TrajectoryDecodeError as exc:
            self._skip(tid.decode(), "decode_errors", f"decode: {exc}")
            return None

    def _count_corrupt(self, where: str, exc: Exception) -> None:
        self.incr_counter("decode_errors")
        if where not in self._logged_corrupt:  # log each key once per client, count every time
            self._logged_corrupt.add(where)
            log.warning("skipping undecodable trajectory at %s: %s", where, exc)

    def reject(self, traj: Trajectory, reason: str) -> None:
        """A trajectory that decoded but must not be trained on (common.trajectory.untrainable)."""
        self._skip(traj.id, "rejected", f"invalid: {reason}")

    def _skip(self, tid: str, counter: str, reason: str) -> None:
        """Count a trajectory nobody may train on, every time; once per key and client, log it with its key, take
        it out of `prio` (replay stops drawing it), record it in `failed`; its hash stays (`pag buffer check`)."""
        key = self._traj_prefix + tid
        self.incr_counter(counter)
        if key not in self._logged_corrupt:
            self._logged_corrupt.add(key)
            log.warning("skipping trajectory %s: %s", key, reason)
            self.client.zrem(self._keys["prio"], tid)
            self._xadd_failed({"id": tid, "key": key, "reason": reason})

    def _on_corrupt(self, stream: str, entry_id: str, fields: dict, exc: Exception) -> None:
        self._count_corrupt(f"{stream} entry {entry_id}", exc)
        readable = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items() if k != b"blob"}
        self._xadd_failed({**readable, "stream": stream, "entry": entry_id, "reason": f"decode: {exc}"})

    def _blobs(self, ids: list[bytes]) -> list[Optional[bytes]]:
        pipe = self.client.pipeline(transaction=False)
        for tid in ids:
            pipe.hget(self._traj_prefix + tid.decode(), "blob")
        return pipe.execute()

    def get(self, traj_id: str) -> Optional[Trajectory]:
        key = traj_key(self.run, traj_id)
        mapping = self.client.hgetall(key)
        if not mapping:
            return None
        try:
            return from_redis_hash(mapping)
        except TrajectoryDecodeError as exc:
            self._count_corrupt(key, exc)
            return None

    def top(self, n: int) -> list[Trajectory]:
        """The n highest-priority trajectories, best first (skipping undecodable ones)."""
        return list(self.iter_best(limit=n))

    def iter_best(self, limit: Optional[int] = None, chunk: int = 1000) -> Iterator[Trajectory]:
        """All stored trajectories best first, read in chunks (for export)."""
        start = 0
        while limit is None or start < limit:
            stop = start + chunk - 1 if limit is None else min(start + chunk, limit) - 1
            ids = self.client.zrevrange(self._keys["prio"], start, stop)
            if not ids:
                return
            for tid, blob in zip(ids, self._blobs(ids)):
                traj = self._decode(tid, blob)
                if traj is not None:
                    yield traj
            start = stop + 1

    # ------------------------------------------------------------------ work streams

    def push_pending(self, trajs: list[Trajectory]) -> list[str]:
        """Queue unscored trajectories for reward workers; returns the stream entry ids."""
        return self.pending.add([{"id": t.id, "prompt": t.prompt, "response": t.response,
                                  "policy_version": str(t.policy_version), "blob": encode(t)}
                                 for t in trajs])

    def read_pending(self, consumer: str, count: int, block_ms: int = 0, min_idle_ms: int = 30000) -> list[Entry]:
        return self.pending.read(consumer, count, block_ms, min_idle_ms)

    def ack_pending(self, entry_ids: list[str]) -> int:
        return self.pending.ack(entry_ids)

    def pending_len(self) -> int:
        """Unscored entries not yet acknowledged (producer backpressure)."""
        return len(self.pending)

    def fresh_len(self) -> int:
        """Scored entries the learner has not acknowledged yet (unread plus in its current batch)."""
        return len(self.fresh)

    def read_fresh(self, consumer: str, count: int, block_ms: int = 0, min_idle_ms: int = 30000,
                   holding: Collection[str] = ()) -> list[Entry]:
        """`holding`: entry ids this consumer has read and not acknowledged yet, never taken back (WorkStream.read)."""
        return self.fresh.read(consumer, count, block_ms, min_idle_ms, holding)

    def ack_fresh(self, entry_ids: list[str]) -> int:
        return self.fresh.ack(entry_ids)

    # ------------------------------------------------------------------ meta, counters, failures

    def record_failed(self, traj: Trajectory, reason: str) -> None:
        """Keep a readable record of a trajectory that could not be scored (bounded stream)."""
        self._xadd_failed({"id": traj.id, "prompt": traj.prompt, "response": traj.response,
                           "policy_version": str(traj.policy_version), "reason": reason,
                           "blob": encode(traj)})

    def _xadd_failed(self, fields: dict[str, Any]) -> None:
        """Every record of the bounded `failed` stream is counted in meta's `failed`."""
        fields["failed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self._keys["failed"], fields, maxlen=self.failed_maxlen, approximate=True)
        pipe.hincrby(self._keys["meta"], "failed", 1)
        pipe.execute()

    def incr_counter(self, name: str, n: int = 1) -> int:
        return int(self.client.hincrby(self._keys["meta"], name, n))

    def set_meta(self, **fields: Any) -> None:
        if fields:
            self.client.hset(self._keys["meta"], mapping={k: str(v) for k, v in fields.items()})

    def meta(self) -> dict[str, str]:
        return {k.decode(): v.decode(errors="replace") for k, v in self.client.hgetall(self._keys["meta"]).items()}

    def stats(self) -> dict[str, Any]:
        k = self._keys
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(k["prio"])
        pipe.zrange(k["prio"], -1, -1, withscores=True)
        pipe.zrange(k["prio"], 0, 0, withscores=True)
        pipe.xlen(self.pending.key)
        pipe.xlen(self.fresh.key)
        pipe.xlen(k["failed"])
        pipe.info("memory")
        size, best, worst, pending, fresh, failed_kept, memory = pipe.execute()
        meta = self.meta()
        out: dict[str, Any] = {
            "run": self.run, "redis_url": self.url, "size": int(size), "capacity": self.capacity,
            "eviction": self.eviction, "prioritization": self.prioritization,
            "priority_temperature": self.priority_temperature, "dedup": self.dedup,
            "best_log_reward": best[0][1] if best else None, "worst_log_reward": worst[0][1] if worst else None,
            "pending": int(pending), "pending_in_flight": self.pending.in_flight(),
            "fresh": int(fresh), "fresh_in_flight": self.fresh.in_flight(), "failed_kept": int(failed_kept),
            "server_used_memory_bytes": int(memory.get("used_memory", 0)),
        }
        for name in COUNTERS:
            out[name] = int(meta.pop(name, 0))
        out["meta"] = meta
        return out

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
