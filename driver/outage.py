"""What `pag train` does when Redis stops answering: wait for it, up to `buffer.max_outage_s`.

Samplers and reward workers ride out an outage by themselves (actors/retry.py); the learner's step fails
once the client's own reconnect attempts (about 15 s) are spent, and the driver waits here. A private
redis-server (no --redis-url) that exited is restarted on its AOF, as systemd would restart a shared one.
Past the limit the run stops, with a checkpoint, naming how to continue.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from buffer.connection import NOT_RETRYABLE, OUTAGE
from common.errors import RedisUnavailableError

log = logging.getLogger("pag.train")


class RedisOutageError(RedisUnavailableError):
    """Redis did not come back within buffer.max_outage_s (exit 3)."""

    label = "Redis"


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, OUTAGE) and not isinstance(exc, NOT_RETRYABLE)


def wait_for_redis(buffer, max_outage_s: float, exc: BaseException, run_name: str, server=None,
                   poll_s: float = 2.0) -> float:
    """Block until `buffer`'s Redis answers a PING again; returns the seconds waited. `server`: the run's
    private RedisServer, restarted on its AOF if its process exited. Raises RedisOutageError."""
    start = time.monotonic()
    log.warning("Redis at %s is unreachable (%s); waiting for it up to %.0fs (buffer.max_outage_s)",
                buffer.url, _first_line(exc), max_outage_s)
    while True:
        _restart_if_exited(server)
        try:
            buffer.client.ping()
            waited = time.monotonic() - start
            log.warning("Redis at %s answers again after %.0fs; training goes on", buffer.url, waited)
            return waited
        except OUTAGE as again:
            exc = again
        if time.monotonic() - start > max_outage_s:
            raise RedisOutageError(
                f"Redis at {buffer.url} has been unreachable for {time.monotonic() - start:.0f}s (buffer.max_outage_s="
                f"{max_outage_s:g}; last error: {_first_line(exc)}). The run stops with a checkpoint; once Redis is "
                f"back, `pag train --resume --run-name {run_name}` with this run's other flags continues it.") from exc
        time.sleep(poll_s)


def _restart_if_exited(server) -> None:
    proc: Optional[object] = getattr(server, "proc", None)
    if proc is None or proc.poll() is None:
        return
    log.warning("the run's private redis-server exited (code %s); restarting it on its AOF", proc.returncode)
    try:
        server.start()
    except RedisUnavailableError as exc:
        log.warning("could not restart the private redis-server: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "cause", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
