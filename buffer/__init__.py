"""The Redis replay service: prioritised replay plus the `pending` and `fresh` work streams."""
from buffer.connection import DEFAULT_REDIS_URL, REDIS_URL_ENV, connect, redact
from buffer.batch import AddResult
from buffer.replay import BufferNotFoundError, ReplayBuffer

__all__ = ["ReplayBuffer", "AddResult", "BufferNotFoundError", "connect", "redact",
           "DEFAULT_REDIS_URL", "REDIS_URL_ENV"]
