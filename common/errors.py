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

The mapping goes by class: every known error derives from `PagError`, which carries its exit code
and label (redis-py's client errors are recognised by their own classes). It follows `__cause__`,
`__context__` and a Ray task error's `cause`, so an error raised inside an actor is named the same
as one raised in the driver.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, Callable, Optional

from common.urls import redact

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REDIS = 3
EXIT_CLUSTER = 4
EXIT_MODEL = 5
EXIT_INTERRUPTED = 130


class PagError(Exception):
    """A known failure: its message names the file, URL or field that is wrong and what to do.

    Each subclass knows its exit code and the label printed before its message; the errors of every
    role derive from one of these, so this file needs to import none of them."""

    exit_code: int = EXIT_FAILED
    label: str = "error"


class UsageError(PagError):
    """Bad input: a config key or value, a prompt file line, a run directory (exit 2)."""

    exit_code = EXIT_USAGE
    label = "bad input"


class RedisUnavailableError(PagError):
    """Redis cannot be reached or started (exit 3)."""

    exit_code = EXIT_REDIS
    label = "Redis"


class ClusterError(PagError, RuntimeError):
    """The Ray cluster cannot be reached or cannot host the requested roles; the message says what to do."""

    exit_code = EXIT_CLUSTER
    label = "Ray cluster"


class ModelError(PagError, RuntimeError):
    """A model or weights that cannot be loaded (exit 5)."""

    exit_code = EXIT_MODEL
    label = "model load error"


class RunFailedError(PagError, RuntimeError):
    """A role died and Ray could not restart it, or it gave up (exit 1)."""

    exit_code = EXIT_FAILED
    label = "run failed"


_REDIS_HINT = "is redis-server running there? give the right --redis-url (redis://[user:pw@]host:port/db)"


def _redis_client_error(exc: BaseException) -> Optional[str]:
    """The label of a redis-py client error (looked up only when redis-py is already imported)."""
    exceptions = sys.modules.get("redis.exceptions")
    if exceptions is None:
        return None
    for cls, label in ((exceptions.AuthenticationError, "Redis refused the credentials"),
                       (exceptions.NoPermissionError, "Redis ACL refused a command"),
                       (exceptions.ConnectionError, "cannot reach Redis"),
                       (exceptions.TimeoutError, "Redis timed out")):
        if isinstance(exc, cls):
            return label
    return None


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
        if isinstance(item, PagError):
            return item.exit_code, item.label, item
        label = _redis_client_error(item)
        if label is not None:
            return EXIT_REDIS, label, item
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
