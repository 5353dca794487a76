"""The online half of a learner batch: how many fresh trajectories to wait for, and what to say when
they do not come.

`learner.fresh_policy` decides the balance between the online half and replay:

- `wait` (default, the official code's balance): every micro-batch blocks until its fresh half,
  n·(1 − replay_ratio) newly scored trajectories, is there. The realised fresh fraction is then
  1 − replay_ratio whatever the reward workers' throughput. Waiting longer than
  `learner.fresh_timeout_s` ends the run with `FreshTimeoutError`, naming the reward workers.
- `fill` (throughput experiments): take what the fresh stream holds now and fill the rest from
  replay. `learner.max_updates_per_fresh` caps how far the learner may run ahead of the data: after
  every micro-batch, micro-batches done ≤ cap × (fresh trajectories used / fresh per micro-batch);
  when a micro-batch would break that, it waits for the missing fresh ones as `wait` does.

The sampler side of the same pipeline bounds the policy lag (`actors.sampler.lag_room`).
"""
from __future__ import annotations

import math
from typing import Optional

from common.errors import RunFailedError


class FreshTimeoutError(RunFailedError):
    """The fresh half of a batch did not arrive in time: the reward workers are down or too slow."""


def fresh_required(policy: str, n_fresh: int, micro_batches_done: int, fresh_used: int,
                   max_updates_per_fresh: Optional[float]) -> int:
    """Fresh trajectories the next micro-batch must wait for (0 … n_fresh).

    `micro_batches_done` and `fresh_used` count the run so far (before this micro-batch); the cap
    is in micro-batches per micro-batch's worth of fresh data, i.e. optimiser steps per step's worth.
    """
    if n_fresh <= 0:
        return 0
    if policy == "wait":
        return n_fresh
    if policy != "fill":
        raise ValueError(f"learner.fresh_policy must be 'wait' or 'fill', got {policy!r}")
    if max_updates_per_fresh is None:
        return 0
    # (done + 1) ≤ cap · (used + k) / n_fresh   ⇔   k ≥ (done + 1) · n_fresh / cap − used
    need = math.ceil((micro_batches_done + 1) * n_fresh / max_updates_per_fresh - fresh_used - 1e-9)
    return min(n_fresh, max(0, need))


def fresh_fraction(fresh: int, replay: int) -> float:
    """Share of the trajectories trained on that came from the fresh stream (nan before any)."""
    total = fresh + replay
    return fresh / total if total else float("nan")


def reward_worker_summary(run: str) -> str:
    """The run's reward workers as Ray knows them, for an error message; never raises."""
    try:
        import ray

        if not ray.is_initialized():
            return "no Ray in this process, so the reward workers could not be listed"
        from common.cluster import list_reward_workers

        names = list_reward_workers(run)
    except Exception as exc:  # noqa: BLE001 — a diagnostic must not hide the real error
        return f"the reward workers could not be listed ({type(exc).__name__}: {exc})"
    if not names:
        return f"no reward worker of run {run!r} is alive (start some: `pag workers scale N --run {run}`)"
    return f"reward workers alive: {', '.join(names)} (`pag workers list --run {run}` shows their counters)"


def timeout_message(run: str, got: int, wanted: int, waited_s: float, pending: int,
                    full: Optional[str] = None) -> str:
    """`full`: buffer.connection.full_message's account of a Redis at its maxmemory, the likeliest cause then."""
    if full:
        return f"only {got} of the {wanted} fresh trajectories of a micro-batch arrived in {waited_s:.0f}s: {full}"
    return (f"learner.fresh_policy=wait: only {got} of the {wanted} fresh trajectories of a micro-batch arrived "
            f"in {waited_s:.0f}s (learner.fresh_timeout_s); {pending} unscored trajectories wait in the pending "
            f"stream. {reward_worker_summary(run)}. Raise learner.fresh_timeout_s, add reward workers, or run "
            "with learner.fresh_policy=fill to train on replay meanwhile.")
