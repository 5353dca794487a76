"""`pag buffer stats|top N|show ID|export FILE.jsonl|check [--quarantine] --run RUN [--redis-url URL]`.

--redis-url defaults to the environment variable PAG_REDIS_URL, else redis://127.0.0.1:6379/0.
Standalone: `python -m buffer.cli stats --run demo --redis-url redis://127.0.0.1:6380/0`.
Exit codes: 0 done, 1 run or id not found (check: problems found), 2 bad arguments, 3 Redis unreachable
or refusing (one line on stderr naming the URL; common/errors.py).
Nothing here writes to Redis except the shared decode-error counter and `check --quarantine`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Callable, Optional

from buffer.check import PROBLEMS, check_buffer
from buffer.check import __doc__ as check_doc
from buffer.connection import REDIS_URL_ENV, default_url
from buffer.replay import BufferNotFoundError, ReplayBuffer
from common.errors import run_handled


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--run", required=True, help="run name (keys pag:{run}:*)")
    parent.add_argument("--redis-url", default=None,
                        help=f"redis[s]://[user:password@]host:port/db (default: ${REDIS_URL_ENV} "
                             "or redis://127.0.0.1:6379/0)")
    return parent


def _add_actions(sub: Any) -> None:
    parent = _common()
    p = sub.add_parser("stats", parents=[parent], help="size, capacity, stream lengths, counters")
    p.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    p.set_defaults(func=handler, action="stats")
    p = sub.add_parser("top", parents=[parent], help="the N best trajectories by log-reward")
    p.add_argument("n", type=int, help="how many")
    p.set_defaults(func=handler, action="top")
    p = sub.add_parser("show", parents=[parent], help="one trajectory as JSON")
    p.add_argument("id", help="trajectory id (the part after pag:{run}:traj:)")
    p.set_defaults(func=handler, action="show")
    p = sub.add_parser("export", parents=[parent], help="every stored trajectory, best first, as JSON lines")
    p.add_argument("file", help="output .jsonl path ('-' for stdout)")
    p.set_defaults(func=handler, action="export")
    p = sub.add_parser("check", parents=[parent], help="find corrupt, invalid, unindexed and foreign entries; "
                       "exit 1 when there are any", description=check_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quarantine", action="store_true",
                   help="rename bad trajectory hashes to pag:{run}:quarantine:{id} and drop dangling prio members")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids must be below this (default: the vocab_size the learner recorded in meta)")
    p.add_argument("--json", action="store_true", help="the whole report as one JSON object")
    p.set_defaults(func=handler, action="check")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `buffer` with its sub-commands to a `pag` argparse subparsers object."""
    parser = subparsers.add_parser("buffer", help="inspect a run's replay buffer in Redis",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_actions(parser.add_subparsers(dest="buffer_command", required=True, metavar="{stats,top,show,export,check}"))
    return parser


def _record(traj: Any) -> dict[str, Any]:
    return dataclasses.asdict(traj)


def _stats(buf: ReplayBuffer, args: argparse.Namespace) -> int:
    stats = buf.stats()
    if args.json:
        print(json.dumps(stats, sort_keys=False))
        return 0
    meta = stats.pop("meta")
    width = max(len(k) for k in list(stats) + list(meta))
    for key, value in stats.items():
        print(f"{key:<{width}}  {value}")
    for key, value in meta.items():
        print(f"{key:<{width}}  {value}  (meta)")
    return 0


def _top(buf: ReplayBuffer, args: argparse.Namespace) -> int:
    for rank, traj in enumerate(buf.top(args.n), 1):
        print(f"{rank:>4}  {traj.log_reward:>10.4g}  {traj.id}  {traj.prompt!r} -> {traj.response!r}")
    return 0


def _show(buf: ReplayBuffer, args: argparse.Namespace) -> int:
    traj = buf.get(args.id)
    if traj is None:
        print(f"no decodable trajectory {args.id!r} in run {args.run!r}", file=sys.stderr)
        return 1
    print(json.dumps(_record(traj), indent=2))
    return 0


def _export(buf: ReplayBuffer, args: argparse.Namespace) -> int:
    count = 0
    out = sys.stdout if args.file == "-" else open(args.file, "w", encoding="utf-8")
    try:
        for traj in buf.iter_best():
            out.write(json.dumps(_record(traj)) + "\n")
            count += 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {count} trajectories to {args.file}", file=sys.stderr)
    return 0


def _check(buf: ReplayBuffer, args: argparse.Namespace) -> int:
    report = check_buffer(buf.client, args.run, vocab_size=args.vocab_size, move=args.quarantine)
    if args.json:
        print(json.dumps(report))
    else:
        vocab = report["vocab_size"] if report["vocab_size"] is not None else "unknown: ids checked for >= 0 only"
        print(f"run {args.run}: {report['trajectories']} trajectory hashes, vocabulary {vocab}, "
              f"{report['already_quarantined']} already in quarantine, {report['fresh_gone']} fresh entries "
              "naming a trajectory that is gone (skipped by the learner)")
        for kind in PROBLEMS:
            items = report[kind]
            print(f"{kind:<10} {len(items)}")
            for item in items[:5]:
                print(f"    {item['key']}: {item['reason']}")
            if len(items) > 5:
                print(f"    … {len(items) - 5} more (--json lists all)")
        if args.quarantine:
            print(f"quarantined {report['quarantined']} trajectory hashes; foreign keys left as they are")
    return 1 if report["problems"] else 0


_ACTIONS: dict[str, Callable[[ReplayBuffer, argparse.Namespace], int]] = {
    "stats": _stats, "top": _top, "show": _show, "export": _export, "check": _check,
}


def handler(args: argparse.Namespace) -> int:
    url = args.redis_url = args.redis_url or default_url()  # named by the error line if unreachable
    try:
        buf = ReplayBuffer.attach(url, args.run, reconnect_retries=2)
    except (BufferNotFoundError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    # a Redis connection error propagates: common/errors.py makes it one line naming the URL, exit 3
    try:
        return _ACTIONS[args.action](buf, args)
    finally:
        buf.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buffer.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_actions(parser.add_subparsers(dest="buffer_command", required=True, metavar="{stats,top,show,export,check}"))
    args = parser.parse_args(argv)
    return run_handled(args.func, args, "python -m buffer.cli")


if __name__ == "__main__":
    sys.exit(main())
