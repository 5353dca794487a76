"""`rule`: the prompt plus a fixed modifier suffix (`eval.rule_suffix`; the default is listed in the
README's "Evaluation" section): the rule-based baseline of Promptist and PAG. One rewrite per prompt."""
from __future__ import annotations

from typing import Sequence

from eval.methods.base import Method, MethodOutput, Rewrite


class RuleMethod(Method):
    name = "rule"

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def identity(self) -> dict:
        return {"name": self.name, "suffix": self.suffix}

    def rewrite(self, prompts: Sequence[str], n: int) -> list[MethodOutput]:
        return [MethodOutput(p, [Rewrite(p.rstrip() + self.suffix)]) for p in prompts]
