"""Connecting to Redis: URLs with credentials or TLS, and reconnection with back-off.

Accepted URLs (redis-py's `from_url`):

    redis://127.0.0.1:6379/0                 plain TCP, database 0
    redis://:password@host:6379/0            `requirepass` (the `default` user)
    redis://user:password@host:6379/0        an ACL user
    rediss://user:password@host:6380/0       TLS; add `?ssl_ca_certs=/path/ca.pem`, or
                                             `?ssl_cert_reqs=none` for a self-signed test server

For TLS the certificates may also come from the environment (what the URL does not set):
PAG_REDIS_CA_CERTS (CA bundle that signed the server's certificate), PAG_REDIS_CERTFILE and
PAG_REDIS_KEYFILE (a client certificate, for a server with `tls-auth-clients yes`). `pag train` passes them
to every Ray worker it starts.

A server that goes away (killed, restarting, still loading its AOF) is retried with exponential
back-off instead of crashing the caller; a wrong password is not retried, it fails at once.
"""
from __future__ import annotations

import os
import ssl
from typing import Any, Callable, Optional

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

from common.urls import redact  # noqa: F401 — part of this module's interface

#: what the CLI uses when neither --redis-url nor PAG_REDIS_URL is given
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_ENV = "PAG_REDIS_URL"
#: TLS files from the environment, by redis-py option
TLS_ENV = {"ssl_ca_certs": "PAG_REDIS_CA_CERTS", "ssl_certfile": "PAG_REDIS_CERTFILE",
           "ssl_keyfile": "PAG_REDIS_KEYFILE"}

#: errors that mean "you are not allowed" rather than "the server is not there right now": never waited for
NOT_RETRYABLE = (AuthenticationError, AuthorizationError)
#: what an unreachable server raises (a wrong password is a ConnectionError too, but waiting will not fix it)
OUTAGE = (redis.ConnectionError, redis.TimeoutError)


class _Reconnect(Retry):
    """redis-py's Retry, except that a wrong password or an untrusted TLS certificate (both
    ConnectionErrors to redis-py) fail at once: waiting will not fix them."""

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[..., Any],
                        is_retryable: Optional[Callable[[Exception], bool]] = None,
                        with_failure_count: bool = False) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, NOT_RETRYABLE) or isinstance(error.__context__, ssl.SSLCertVerificationError):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def default_url() -> str:
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def connect(url: str, *, retries: int = 10, backoff_cap: float = 2.0, backoff_base: float = 0.05,
            socket_timeout: Optional[float] = 30.0, **options: Any) -> redis.Redis:
    """A client that retries a lost connection `retries` times, sleeping base·2^k (≤ cap) seconds.

    With the defaults a caller rides out about 15 s of server downtime (a kill -9 and restart
    with a few GB of AOF to load). `options` go to `redis.Redis` (e.g. `ssl_ca_certs`).
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis URL {redact(url)!r} must start with redis://, rediss:// or unix://")
    retry = _Reconnect(ExponentialBackoff(cap=backoff_cap, base=backoff_base), retries)
    kwargs: dict[str, Any] = dict(
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
    )
    if url.startswith("rediss://"):
        kwargs.update({opt: os.environ[var] for opt, var in TLS_ENV.items()
                       if os.environ.get(var) and f"{opt}=" not in url})
    kwargs.update(options)
    return redis.Redis.from_url(url, **kwargs)


def full_message(client: redis.Redis, url: str, capacity: int) -> Optional[str]:
    """Why writes fail when the server is at its `maxmemory` (None when it is not, or cannot say): names the
    memory figures, the policy and the run's `buffer.capacity`, and what to change."""
    try:
        info = client.info("memory")
    except redis.RedisError:
        return None
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    if limit <= 0 or used < 0.95 * limit:
        return None
    return (f"Redis at {redact(url)} is full: used_memory {used / 2**20:.1f} MiB of maxmemory {limit / 2**20:.1f} MiB "
            f"(maxmemory-policy {info.get('maxmemory_policy', '?')}), so it refuses writes. This run keeps up to "
            f"buffer.capacity={capacity} trajectories: lower buffer.capacity, raise maxmemory "
            "(CONFIG SET maxmemory …), or free the server's memory.")
