"""The client half of `ReplayBuffer.add`: a batch of scored trajectories as the ADD script's ARGV.

Everything is checked here, before the script runs, so a bad trajectory raises with its id and
changes nothing in Redis. The layout is the one documented above `lua.ADD`: a header, then per
trajectory its id, score, dedup digest, field count and the hash's fields (blob last).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from common.trajectory import Trajectory, to_redis_hash


@dataclass
class AddResult:
    """What one `add` call did, as counted by the script."""

    stored: int
    duplicates: int
    evicted: int
    repeats: int


def dedup_sha(prompt: str, response: str) -> str:
    """The same digest the Lua script computes with redis.sha1hex on eviction."""
    return hashlib.sha1(prompt.encode() + b"\0" + response.encode()).hexdigest()


def add_args(trajs: list[Trajectory], traj_prefix: str, capacity: int, dedup: bool, fifo: bool,
             fresh_maxlen: int) -> list[Any]:
    """ARGV for `lua.ADD`; raises ValueError naming the first trajectory that cannot be stored."""
    argv: list[Any] = [traj_prefix, capacity, int(dedup), int(fifo), fresh_maxlen, len(trajs)]
    for traj in trajs:
        if not math.isfinite(traj.log_reward):
            raise ValueError(f"trajectory {traj.id}: log_reward={traj.log_reward!r} is not finite; "
                             "only scored trajectories go into the replay buffer (use push_pending)")
        if not traj.id or ":" in traj.id:
            raise ValueError(f"trajectory id {traj.id!r} must be non-empty with no ':'")
        fields = to_redis_hash(traj)
        blob = fields.pop("blob")
        argv += [traj.id, repr(float(traj.log_reward)), dedup_sha(traj.prompt, traj.response),
                 2 * len(fields) + 2]
        for name, value in fields.items():
            argv += [name, value]
        argv += ["blob", blob]
    return argv
