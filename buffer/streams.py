"""A Redis stream read through a consumer group: the `pending` and `fresh` work queues.

Delivery is at-least-once. A consumer reads entries (they enter the group's pending-entries
list), works, and acknowledges; acknowledged entries are also deleted, so the stream's length
is exactly the work not yet acknowledged. A consumer that dies leaves its entries unacknowledged;
after `min_idle_ms` any other consumer takes them over with XAUTOCLAIM before reading new work.
Work is idempotent by trajectory id downstream (`ReplayBuffer.add`), so a redelivery after a
crash between "done" and "ack" stores nothing twice.

Entries carry the msgpack blob, or (fresh entries of trajectories kept in replay) only the id,
whose blob `lookup` fetches from the trajectory hash. An entry whose blob fails to decode is a
poison pill: it is counted, logged with its stream key and entry id, recorded as failed, and
acknowledged so nobody reclaims it forever. One whose trajectory has already left the replay
buffer is acknowledged and reported to `on_gone`. Entries taken over from an idle consumer are
reported to `on_reclaim`: they are the second deliveries that at-least-once allows.
"""
from __future__ import annotations

import logging
from typing import Callable, Collection, Iterable, Optional

import redis

from common.trajectory import Trajectory, TrajectoryDecodeError, decode

log = logging.getLogger(__name__)

Entry = tuple[str, Trajectory]
#: called with (stream key, entry id, fields, error) for an entry whose blob does not decode
OnCorrupt = Callable[[str, str, dict, Exception], None]
#: trajectory ids -> their blobs (None where the trajectory is gone)
Lookup = Callable[[list[bytes]], list[Optional[bytes]]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WorkStream:
    def __init__(self, client: redis.Redis, key: str, group: str, on_corrupt: OnCorrupt,
                 socket_timeout: Optional[float] = None, lookup: Optional[Lookup] = None,
                 on_gone: Optional[Callable[[int], None]] = None,
                 on_reclaim: Optional[Callable[[int], None]] = None) -> None:
        self.client = client
        self.key = key
        self.group = group
        self.on_corrupt = on_corrupt
        self.socket_timeout = socket_timeout
        self.lookup = lookup
        self.on_gone = on_gone
        self.on_reclaim = on_reclaim

    def ensure_group(self) -> None:
        """Create the stream and its group reading from the beginning ('0'), so nothing written
        before the first consumer arrives is missed."""
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def __len__(self) -> int:
        """Entries not yet acknowledged (unread plus being worked on)."""
        return int(self.client.xlen(self.key))

    def in_flight(self) -> int:
        """Entries delivered to some consumer and not yet acknowledged."""
        try:
            return int(self.client.xpending(self.key, self.group)["pending"])
        except redis.ResponseError:
            return 0

    def read(self, consumer: str, count: int, block_ms: int = 0, min_idle_ms: int = 30000,
             holding: Collection[str] = ()) -> list[Entry]:
        """Up to `count` entries: first those idle > `min_idle_ms` in dead consumers' hands,
        then new ones. `block_ms` = 0 returns at once (unlike Redis's BLOCK 0, which waits forever).
        `holding`: entries this consumer read and still works on; XAUTOCLAIM would hand them back to it once
        idle that long (a learner waiting for the rest of its batch), so they are left out."""
        if count <= 0:
            return []
        if block_ms < 0:
            raise ValueError(f"block_ms must be >= 0 (0 = do not wait), got {block_ms}")
        if block_ms and self.socket_timeout and block_ms >= self.socket_timeout * 1000:
            raise ValueError(f"block_ms={block_ms} must be shorter than the client's socket_timeout "
                             f"({self.socket_timeout} s), or the read times out; wait in a loop instead")
        try:
            return self._read(consumer, count, block_ms, min_idle_ms, holding)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the stream was deleted (FLUSHALL, a lost AOF): start over
            return self._read(consumer, count, block_ms, min_idle_ms, holding)

    def _read(self, consumer: str, count: int, block_ms: int, min_idle_ms: int,
              holding: Collection[str]) -> list[Entry]:
        raw: list[tuple[bytes, dict]] = []
        reply = self.client.xautoclaim(self.key, self.group, consumer, min_idle_ms,
                                       start_id="0-0", count=count)
        # deleted entries come back empty
        raw.extend(m for m in reply[1] if m and m[1] and _text(m[0]) not in holding)
        if raw and self.on_reclaim:  # a second delivery: its first consumer died (or stalled) holding it
            self.on_reclaim(len(raw))
        if len(raw) < count:
            block = block_ms if (block_ms and not raw) else None
            reply = self.client.xreadgroup(self.group, consumer, {self.key: ">"},
                                           count=count - len(raw), block=block)
            for _, messages in (reply.items() if isinstance(reply, dict) else reply or []):
                raw.extend(messages[0] if messages and isinstance(messages[0], list) else messages)
        by_id = [fields[b"id"] for _, fields in raw if b"blob" not in fields and b"id" in fields]
        found = dict(zip(by_id, self.lookup(by_id))) if by_id and self.lookup else {}
        out: list[Entry] = []
        poison: list[str] = []
        gone: list[str] = []
        for entry_id, fields in raw:
            eid = _text(entry_id)
            blob = fields.get(b"blob")
            if blob is None and b"id" in fields and self.lookup:
                blob = found.get(fields[b"id"])
                if blob is None:
                    gone.append(eid)
                    continue
            try:
                if blob is None:
                    raise TrajectoryDecodeError("entry has no 'blob' field")
                out.append((eid, decode(blob)))
            except TrajectoryDecodeError as exc:
                self.on_corrupt(self.key, eid, fields, exc)
                poison.append(eid)
        if poison or gone:
            self.ack(poison + gone)
        if gone and self.on_gone:
            self.on_gone(len(gone))
        return out

    def ack(self, entry_ids: Iterable[str]) -> int:
        """Acknowledge and delete; returns how many were still unacknowledged."""
        ids = list(entry_ids)
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.key, self.group, *ids)
        pipe.xdel(self.key, *ids)
        acked, _ = pipe.execute()
        return int(acked)

    def add(self, entries: list[dict[str, str | bytes]], maxlen: Optional[int] = None) -> list[str]:
        """XADD each mapping, all in one transaction; returns the entry ids."""
        pipe = self.client.pipeline(transaction=True)
        for fields in entries:
            pipe.xadd(self.key, fields, maxlen=maxlen, approximate=True)
        return [_text(eid) for eid in pipe.execute()]
