"""Temperature schedules as functions of the learner step.

Three temperatures move during training (docs/design.md):

- sampling temperature: exploration of the samplers, 2.0 → 0.5 over 5000 steps. It only changes
  the behaviour policy; the balance objectives are off-policy, so log P_F is always at temperature 1.
- reward temperature τ: the whole target is raised to 1/τ, τ = 2 → 1 (a flatter target first).
- reference temperature γ: reference log-probs are divided by γ; constant by default.

After `steps` steps every schedule stays at `end`; `steps = 0` means "at `end` from step 0".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["linear", "exponential", "constant"]


def _progress(step: int, steps: int) -> float:
    if steps <= 0:
        return 1.0
    return min(max(step, 0) / steps, 1.0)


def linear_anneal(step: int, start: float, end: float, steps: int) -> float:
    """start + (end − start) · min(step/steps, 1)."""
    return start + (end - start) * _progress(step, steps)


def exponential_anneal(step: int, start: float, end: float, steps: int) -> float:
    """Geometric interpolation start · (end/start)^min(step/steps, 1); start and end must be positive."""
    if start <= 0 or end <= 0:
        raise ValueError(f"exponential anneal needs positive start and end, got {start} and {end}")
    return start * math.exp(math.log(end / start) * _progress(step, steps))


@dataclass(frozen=True)
class Anneal:
    """A schedule value(step); `kind` picks linear, exponential (geometric) or constant (= start)."""

    start: float
    end: float
    steps: int
    kind: Kind = "linear"

    def __call__(self, step: int) -> float:
        if self.kind == "linear":
            return linear_anneal(step, self.start, self.end, self.steps)
        if self.kind == "exponential":
            return exponential_anneal(step, self.start, self.end, self.steps)
        if self.kind == "constant":
            return self.start
        raise ValueError(f"unknown schedule kind {self.kind!r}; choose linear, exponential or constant")


def sampling_temperature(
    step: int, start: float = 2.0, end: float = 0.5, steps: int = 5000, kind: Kind = "linear"
) -> float:
    """Temperature the samplers divide the policy's logits by (paper: 2.0 → 0.5 over 5000 steps)."""
    return Anneal(start, end, steps, kind)(step)


def reward_temperature(
    step: int, start: float = 2.0, end: float = 1.0, steps: int = 5000, kind: Kind = "linear"
) -> float:
    """τ: the target [p_ref^(1/γ) · exp(r/β)]^(1/τ) starts flat (τ = 2) and sharpens to τ = 1."""
    return Anneal(start, end, steps, kind)(step)


def reference_temperature(step: int, gamma: float = 1.0) -> float:
    """γ: reference log-probs are divided by γ; constant (the step is accepted for a uniform interface)."""
    del step
    return gamma


@dataclass(frozen=True)
class Schedules:
    """The three schedules of one run, each a callable of the learner step."""

    sampling_temperature: Anneal
    reward_temperature: Anneal
    reference_temperature: Anneal

    @classmethod
    def from_config(cls, cfg: Any) -> "Schedules":
        """From a `common.config.Config` (read by attribute, so this module stays import-light)."""
        sampler, learner = cfg.sampler, cfg.learner
        return cls(
            sampling_temperature=Anneal(sampler.temp_start, sampler.temp_end, sampler.temp_anneal_steps),
            reward_temperature=Anneal(
                learner.reward_temp_start, learner.reward_temp_end, learner.reward_temp_anneal_steps
            ),
            reference_temperature=Anneal(learner.ref_temp, learner.ref_temp, 0, "constant"),
        )

    def at(self, step: int) -> dict[str, float]:
        """All three values at `step`, keyed as metrics."""
        return {
            "sampling_temperature": self.sampling_temperature(step),
            "reward_temperature": self.reward_temperature(step),
            "reference_temperature": self.reference_temperature(step),
        }
