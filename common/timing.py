"""Where each role's time goes: phases timed in the process, added up in the run's meta hash.

Every role keeps a `PhaseClock` and flushes it into `pag:{run}:meta` once a loop turn (one HINCRBY per
phase, whole milliseconds, the remainder kept), so the totals of all samplers, all reward workers and the
learner sit beside the other counters, readable with redis-cli, and survive any single process:

    HGETALL pag:{run}:meta    →   time_ms:sampler:sample  184220,  time_ms:reward:render  902114, …

    role      phases
    sampler   weights (pull + load a new version), sample (decode + reference log-probs), push (to the
              pending stream), wait (held back: the pipeline is full or the policy lag is at its bound)
    reward    read (waiting on the pending stream), render, score, other (plain-prompt cache, checks),
              store (the buffer's insert, failures, acknowledgements)
    learner   collect (reading, waiting for the fresh half), update (the objective's step), diagnostics
              (logging steps' dormant ratios and text diversity), publish (weights), checkpoint

The learner turns the totals into shares per role between logging steps (`time/{role}/{phase}` in
metrics.jsonl and TensorBoard), and the report tabulates them for the whole run.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping

from common.constants import NS_TIME, metric

#: prefix of the meta fields holding milliseconds per role and phase
PREFIX = "time_ms:"


class PhaseClock:
    """Seconds per phase of one role in one process, until `flush` adds them to the run's meta."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._pending: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._pending[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self._pending[name] += max(0.0, seconds)

    def flush(self, buffer) -> None:
        """Whole milliseconds into meta (`buffer.incr_counter`); what is below a millisecond, or was not
        written because Redis failed, stays for the next flush."""
        for name in list(self._pending):
            ms = int(self._pending[name] * 1000)
            if ms:
                buffer.incr_counter(f"{PREFIX}{self.role}:{name}", ms)
                self._pending[name] -= ms / 1000


def role_times(meta: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """{role: {phase: seconds}} from the run's meta hash (`ReplayBuffer.meta()`)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in meta.items():
        if key.startswith(PREFIX):
            role, _, phase = key[len(PREFIX):].partition(":")
            out[role][phase] = int(value) / 1000
    return dict(out)


def shares(now: Mapping[str, Mapping[str, float]],
           before: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`time/{role}/{phase}`: each phase's share of its role's time between two `role_times` readings."""
    out: dict[str, float] = {}
    for role, phases in now.items():
        deltas = {phase: seconds - before.get(role, {}).get(phase, 0.0) for phase, seconds in phases.items()}
        total = sum(deltas.values())
        if total > 0:
            out.update({metric(NS_TIME, f"{role}/{phase}"): delta / total for phase, delta in sorted(deltas.items())})
    return out


def time_table(times: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Markdown rows: each role's seconds per phase (all its processes together) and each phase's share."""
    if not times:
        return ["(no phase times in the run's meta: the run predates them, or its Redis is gone)"]
    lines = ["| role | phase | seconds | share of the role |", "|---|---|---:|---:|"]
    for role in sorted(times):
        total = sum(times[role].values()) or 1.0
        for phase, seconds in sorted(times[role].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {role} | {phase} | {seconds:.1f} | {seconds / total:.1%} |")
    return lines
