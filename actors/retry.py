"""How a role's loop rides out errors it cannot fix itself (Redis restarting, full, or gone a while).

Exponential back-off from 0.5 s to 30 s. The first error of a streak is logged with its traceback, the
rest as one line each, so an hour of Redis downtime is not a page of identical tracebacks; a Redis that
refuses writes for lack of memory is named (maxmemory and buffer.capacity) instead of a bare OOM error.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import redis

from buffer.connection import full_message


class Backoff:
    def __init__(self, who: str, log: logging.Logger, buffer, start: float = 0.5, cap: float = 30.0) -> None:
        self.who, self.log, self.buffer = who, log, buffer
        self.start, self.cap, self.delay = start, cap, start
        self.streak = 0

    def ok(self) -> None:
        if self.streak:
            self.log.info("%s: working again after %d failed attempt(s)", self.who, self.streak)
        self.delay, self.streak = self.start, 0

    def failed(self, exc: BaseException) -> None:
        """Log `exc` and sleep the current delay, then double it."""
        self.streak += 1
        full = self._full(exc)
        if full is not None:
            self.log.warning("%s: %s Retrying in %.1fs.", self.who, full, self.delay)
        elif self.streak == 1:
            self.log.error("%s: failed; retrying in %.1fs", self.who, self.delay, exc_info=exc)
        else:
            self.log.warning("%s: still failing (%d in a row: %s: %s); retrying in %.1fs", self.who, self.streak,
                             type(exc).__name__, exc, self.delay)
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, self.cap)

    def _full(self, exc: BaseException) -> Optional[str]:
        if not isinstance(exc, redis.exceptions.OutOfMemoryError):
            return None
        if self.buffer is None:
            return f"Redis refuses writes ({exc}): its maxmemory is reached."
        capacity = self.buffer.capacity
        return full_message(self.buffer.client, self.buffer.url, capacity) or \
            f"Redis refuses writes ({exc}): its maxmemory is reached; this run keeps buffer.capacity={capacity}."
