"""Errors at the edge: every `pag` command turns the project's typed errors and connection
failures into one line on stderr and a documented exit code (the traceback only with `-v`).

| exit | meaning | typical cause → what to do |
|---|---|---|
| 0 | done | |
| 1 | the run failed | a role died and Ray could not restart it (`RunFailed`) |
| 2 | bad input | a config key/value, a prompt file line, a run directory (`ConfigError`, `DatasetError`) |
| 3 | Redis | unreachable, refused, wrong password or ACL (`--redis-url`, is redis-server running?) |
| 4 | Ray cluster | no cluster at the address, or it lacks the resources the roles request (`ClusterError`) |
| 5 | models | weights or a hub id that cannot be loaded (`ModelLoadError`) |
| 130 | interrupted | Ctrl-C or SIGTERM (`ray job stop`); a checkpoint was written |

Anything else is a bug: it keeps its traceback and exits 1.

The mapping goes by class (looked up only in modules already imported, so this file imports
nothing heavy) and follows `__cause__`, `__context__` and a Ray task error's `cause`, so an error
raised inside an actor is named the same as one raised in the driver.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, Callable, Optional

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REDIS = 3
EXIT_CLUSTER = 4
EXIT_MODEL = 5
EXIT_INTERRUPTED = 130

#: (module, class name, exit code, label); the first match along the cause chain wins
_KNOWN: tuple[tuple[str, str, int, str], ...] = (
    ("common.config", "ConfigError", EXIT_USAGE, "config error"),
    ("common.data", "DatasetError", EXIT_USAGE, "prompt data error"),
    ("common.trajectory", "TrajectoryDecodeError", EXIT_USAGE, "buffer data error"),
    ("common.errors", "ClusterError", EXIT_CLUSTER, "Ray cluster"),
    ("common.models", "ModelLoadError", EXIT_MODEL, "model load error"),
    ("common.redis_server", "RedisServerError", EXIT_REDIS, "redis-server"),
    ("redis.exceptions", "AuthenticationError", EXIT_REDIS, "Redis refused the credentials"),
    ("redis.exceptions", "NoPermissionError", EXIT_REDIS, "Redis ACL refused a command"),
    ("redis.exceptions", "ConnectionError", EXIT_REDIS, "cannot reach Redis"),
    ("redis.exceptions", "TimeoutError", EXIT_REDIS, "Redis timed out"),
    ("learner.train", "RunFailed", EXIT_FAILED, "run failed"),
)

_REDIS_HINT = "is redis-server running there? give the right --redis-url (redis://[user:pw@]host:port/db)"


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot host the requested roles; the message says what to do."""


def _causes(exc: BaseException):
    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend([getattr(item, "cause", None) if isinstance(getattr(item, "cause", None), BaseException) else None,
                     item.__cause__, item.__context__])


def _match(exc: BaseException) -> Optional[tuple[int, str, BaseException]]:
    for item in _causes(exc):
        for module, name, code, label in _KNOWN:
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type) and isinstance(item, cls):
                return code, label, item
    return None


def _first_line(exc: BaseException) -> str:
    """The error's own message without a remote traceback that Ray may have glued to it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else " ".join(line.strip() for line in lines[:6])


def describe(exc: BaseException, redis_url: Optional[str] = None) -> Optional[tuple[int, str]]:
    """(exit code, one-line message) for a known error, None for a bug (keep its traceback)."""
    found = _match(exc)
    if found is None:
        return None
    code, label, item = found
    message = _first_line(item).rstrip(".")
    if code == EXIT_REDIS and type(item).__module__.startswith("redis"):
        where = ""
        if redis_url:
            from buffer.connection import redact

            where = f" at {redact(redis_url)}"
        return code, f"{label}{where}: {message}; {_REDIS_HINT}"
    return code, f"{label}: {message}"


def run_handled(func: Callable[[Any], Any], args: Any, prog: str, verbose: bool = False) -> int:
    """Run a command's function; a known error becomes one line `prog: …` on stderr and its exit code.

    With `verbose` the traceback is printed first. An unknown error (a bug) is re-raised."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 — sorted into known and unknown below
        known = describe(exc, redis_url=getattr(args, "redis_url", None))
        if known is None:
            raise
        if verbose:
            traceback.print_exc()
        code, message = known
        hint = "" if verbose else " (-v for the traceback)"
        print(f"{prog}: {message}{hint}", file=sys.stderr)
        return code


def command_path(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The sub-command words of `argv` (`['buffer', 'stats']`), following nested sub-parsers."""
    words: list[str] = []
    current = parser
    for token in argv:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            break
        if token in actions[0].choices:
            words.append(token)
            current = actions[0].choices[token]
    return words


def add_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`-v/--verbose` after any sub-command too (`pag train … -v`), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                if not any("-v" in a.option_strings for a in child._actions):
                    child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                       help="debug logging, and the traceback of an error")
                add_verbose_everywhere(child)
