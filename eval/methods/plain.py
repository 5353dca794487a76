"""`plain`: the prompt as the user wrote it — one rewrite, the prompt itself, so its aesthetic gain is
0 by construction. (The official eval.py renders the plain prompt with the policy's " Rephrase:"
template leaked into it; here it is the user's text, exactly.)"""
from __future__ import annotations

from typing import Sequence

from eval.methods.base import Method, MethodOutput, Rewrite


class PlainMethod(Method):
    name = "plain"

    def rewrite(self, prompts: Sequence[str], n: int) -> list[MethodOutput]:
        return [MethodOutput(p, [Rewrite(p)]) for p in prompts]
