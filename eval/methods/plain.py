"""`plain`: the prompt without a rewrite -- one rewrite, the baseline text itself (`reward.baseline`), so its
aesthetic gain is 0 by construction: on `sd14` the policy's input "x Rephrase:\n", which the official eval.py
renders for its plain row (`manual=True`: the prompt tokens of the policy input); with `reward.baseline=plain`
the user's text, exactly."""
from __future__ import annotations

from typing import Callable, Sequence

from eval.methods.base import Method, MethodOutput, Rewrite


class PlainMethod(Method):
    name = "plain"

    def __init__(self, baseline: Callable[[str], str] = str) -> None:
        self.baseline = baseline

    def identity(self) -> dict:
        return {"name": self.name, "baseline": self.baseline("{x}")}  # the template, for the cache key

    def rewrite(self, prompts: Sequence[str], n: int) -> list[MethodOutput]:
        return [MethodOutput(p, [Rewrite(self.baseline(p))]) for p in prompts]
