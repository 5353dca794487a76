"""One reader for both ways a learner fills a micro-batch from the buffer.

    replay mix  (fl-db, db, tb)   n·(1 − replay_ratio) fresh, the rest prioritised replay;
                                  `learner.fresh_policy` says how many fresh to wait for (learner/fresh.py)
    on-policy   (ppo)             n fresh, all waited for, never replay

Each objective states what it needs as a `ReadPlan` (fresh slots, replay slots, fresh ones to wait
for); `read_micro_batch` serves any plan. Fresh-stream entries are returned by id so the learner
acknowledges them after its step, used or not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Mapping, MutableMapping

from buffer.connection import full_message
from common.trajectory import Trajectory
from learner.fresh import FreshTimeoutError, fresh_required, timeout_message

if TYPE_CHECKING:
    from buffer import ReplayBuffer
    from common.config import LearnerConfig


@dataclass(frozen=True)
class ReadPlan:
    """What one micro-batch takes from the buffer."""

    fresh: int  # slots for newly scored trajectories (the fresh stream)
    replay: int  # slots drawn from prioritised replay
    required: int  # fresh ones to wait for; the other fresh slots are filled from replay when the stream is dry
    label: str = ""  # names the mode in a timeout message ("objective=ppo (on-policy)")


@dataclass
class MicroBatch:
    trajectories: list[Trajectory]  # the fresh ones first, then replay
    entry_ids: list[str]  # fresh-stream entries read, valid or not: acknowledge them after the step
    fresh: int
    replay: int
    filled: int  # fresh slots filled from replay

    def counts(self) -> dict[str, int]:
        return {"fresh": self.fresh, "replay": self.replay, "filled": self.filled}


def replay_mix(lc: "LearnerConfig", n: int, counters: Mapping[str, int]) -> ReadPlan:
    """n·(1 − replay_ratio) fresh and the rest replay; `learner.fresh_policy=wait` waits for the whole fresh
    part, `fill` only for what `learner.max_updates_per_fresh` requires (counted over the run in `counters`)."""
    n_replay = int(round(n * lc.replay_ratio))
    n_fresh = n - n_replay
    required = fresh_required(lc.fresh_policy, n_fresh, counters["micro_batches"], counters["fresh_total"],
                              lc.max_updates_per_fresh)
    return ReadPlan(fresh=n_fresh, replay=n_replay, required=required)


def on_policy(n: int, label: str) -> ReadPlan:
    """n fresh trajectories and nothing else, whatever `learner.fresh_policy` says."""
    return ReadPlan(fresh=n, replay=0, required=n, label=label)


def read_micro_batch(buffer: "ReplayBuffer", consumer: str, plan: ReadPlan, timeout: float,
                     valid: Callable[[Trajectory], bool], counters: MutableMapping[str, int],
                     holding: Collection[str] = ()) -> MicroBatch:
    """The trajectories of `plan`: fresh ones from the stream, then replay for the rest.

    Blocks for the `plan.required` fresh ones (FreshTimeoutError naming the reward workers after
    `timeout` s), and while the buffer is empty (TimeoutError). Trajectories that fail `valid` are
    dropped and counted; `counters` (the learner's run totals) are updated in place. `holding`: fresh
    entries read for this step and not acknowledged yet (earlier micro-batches), never read again."""
    start = time.monotonic()
    fresh, entry_ids = _read_fresh(buffer, consumer, plan, timeout, valid, counters, start, holding)
    filled = plan.fresh - len(fresh)
    while plan.fresh == 0 and len(buffer) == 0:  # replay only: wait for a first scored trajectory
        if time.monotonic() - start > timeout:
            raise TimeoutError(_nothing_arrived(timeout))
        time.sleep(0.2)
    drawn = buffer.sample(plan.replay + filled) if plan.replay + filled > 0 else []
    replay = [t for t in drawn if valid(t)]
    counters["dropped_invalid"] += len(drawn) - len(replay)
    if not fresh and not replay:
        raise RuntimeError("every collected trajectory breaks the sampler's EOS rule (sampler.min_len changed?)")
    counters["micro_batches"] += 1
    counters["fresh_total"] += len(fresh)
    counters["replay_total"] += len(replay)
    return MicroBatch(fresh + replay, entry_ids, fresh=len(fresh), replay=len(replay), filled=filled)


def _read_fresh(buffer: "ReplayBuffer", consumer: str, plan: ReadPlan, timeout: float,
                valid: Callable[[Trajectory], bool], counters: MutableMapping[str, int],
                start: float, holding: Collection[str]) -> tuple[list[Trajectory], list[str]]:
    """Read the stream until `plan.fresh` are there, or, once `plan.required` are, until it runs dry. What this
    step holds is left out: waiting past the stream's reclaim idle time would otherwise hand it back a second time."""
    fresh: list[Trajectory] = []
    entry_ids: list[str] = []
    while len(fresh) < plan.fresh:
        short = len(fresh) < plan.required or (len(buffer) == 0 and not fresh)
        got = buffer.read_fresh(consumer, plan.fresh - len(fresh), block_ms=200 if short else 0,
                                holding={*holding, *entry_ids})
        entry_ids += [e for e, _ in got]
        kept = [t for _, t in got if valid(t)]
        counters["dropped_invalid"] += len(got) - len(kept)
        fresh += kept
        if len(fresh) >= plan.required and (fresh or len(buffer) > 0) and (not got or len(fresh) >= plan.fresh):
            break
        if short and time.monotonic() - start > timeout:
            if plan.required:
                full = full_message(buffer.client, buffer.url, buffer.capacity)
                message = timeout_message(buffer.run, len(fresh), plan.required, time.monotonic() - start,
                                          buffer.pending_len(), full)
                raise FreshTimeoutError(f"{plan.label}: {message}" if plan.label else message)
            raise TimeoutError(_nothing_arrived(timeout))
    return fresh, entry_ids


def _nothing_arrived(timeout: float) -> str:
    return f"no scored trajectories arrived in {timeout:.0f}s: are the reward workers running?"
