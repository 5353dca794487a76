"""The official PAG replay priority: per-prompt groups (`buffer.priority_of=paper`).

The official buffer (dbsxodud-11/PAG utils.py:245-250) keeps one item per prompt batch and draws
items with

    P(group g)  ∝  exp( mean_{y ∈ g} [ log p_ref(y | x) / γ  +  r(x, y) / β ] ),

then trains on the whole group. Here a group is every stored rewrite of the same prompt, and the
per-trajectory value v = Σ_t ref_logprobs_t + log_reward (γ = 1, the official constant; log_reward
is r/β with the length penalty) is kept in its own readable index, next to — not instead of — the
`prio` ZSET (id → log_reward), which stays what `redis-cli ZREVRANGE` shows:

- `pag:{run}:gprio` ZSET: id → v
- `pag:{run}:group` HASH: id → sha1(prompt)[:16], the group

Both are written after a batch is stored (ids the dedup kept out are not indexed) and cleaned
lazily: an id no longer in `prio` (evicted) is dropped from them when a draw meets it. A draw reads
the whole index (O(N), N ≤ capacity), which is the price of a group mean that changes with every
addition and eviction; `reward` stays O(n log N) in Lua.

Drawing n trajectories: groups with replacement by the softmax above (divided by the buffer's
priority temperature), each drawn group contributing its members in random order, until n.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import numpy as np

from common.trajectory import Trajectory


def group_of(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def paper_value(traj: Trajectory, gamma: float = 1.0) -> float:
    """log p_ref(y | x) / γ + log R: the official per-trajectory `log_reward` (gfn_trainer.py:854)."""
    return float(sum(traj.ref_logprobs)) / gamma + float(traj.log_reward)


def group_probabilities(values: dict[str, list[float]], temperature: float = 1.0) -> tuple[list[str], np.ndarray]:
    """Groups and P(g) ∝ exp(mean(values_g) / temperature), computed stably."""
    names = sorted(values)
    means = np.array([np.mean(values[g]) for g in names], dtype=np.float64) / temperature
    if len(names) == 0:
        return names, means
    weights = np.exp(means - means.max())
    return names, weights / weights.sum()


def draw_groups(members: dict[str, list[str]], probs: np.ndarray, names: list[str], n: int,
                rng: np.random.Generator) -> list[str]:
    """n ids: groups drawn with replacement by `probs`, each giving its members in random order."""
    out: list[str] = []
    if not names:
        return out
    while len(out) < n:
        g = names[int(rng.choice(len(names), p=probs))]
        ids = list(members[g])
        rng.shuffle(ids)
        out += ids[: n - len(out)]
    return out


class GroupIndex:
    """The two Redis keys above, for one run, on a ReplayBuffer's client."""

    def __init__(self, client, prefix: str, prio_key: str) -> None:
        self.client = client
        self.gprio_key = prefix + "gprio"
        self.group_key = prefix + "group"
        self.prio_key = prio_key

    def index(self, trajs: list[Trajectory]) -> int:
        """Index the trajectories that `prio` holds now; returns how many."""
        if not trajs:
            return 0
        scores = self.client.zmscore(self.prio_key, [t.id for t in trajs])
        kept = [t for t, s in zip(trajs, scores) if s is not None]
        if not kept:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.gprio_key, {t.id: paper_value(t) for t in kept})
        pipe.hset(self.group_key, mapping={t.id: group_of(t.prompt) for t in kept})
        pipe.execute()
        return len(kept)

    def snapshot(self) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
        """Members and values per group of the ids still in `prio`; drops the evicted ones."""
        pairs = self.client.zrange(self.gprio_key, 0, -1, withscores=True)
        if not pairs:
            return {}, {}
        ids = [p[0] for p in pairs]
        alive = self.client.zmscore(self.prio_key, ids)
        groups = self.client.hmget(self.group_key, ids)
        members: dict[str, list[str]] = {}
        values: dict[str, list[float]] = {}
        gone = []
        for (tid, v), live, g in zip(pairs, alive, groups):
            if live is None or g is None or not math.isfinite(v):
                gone.append(tid)
                continue
            key = g.decode() if isinstance(g, bytes) else g
            name = tid.decode() if isinstance(tid, bytes) else tid
            members.setdefault(key, []).append(name)
            values.setdefault(key, []).append(float(v))
        if gone:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self.gprio_key, *gone)
            pipe.hdel(self.group_key, *gone)
            pipe.execute()
        return members, values

    def draw(self, n: int, rng: np.random.Generator, temperature: float = 1.0) -> list[str]:
        members, values = self.snapshot()
        names, probs = group_probabilities(values, temperature)
        return draw_groups(members, probs, names, n, rng)

    def clear(self) -> Optional[int]:
        return self.client.delete(self.gprio_key, self.group_key)
