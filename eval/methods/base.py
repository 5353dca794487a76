"""The method interface: prompts in, rewrites out — text, or conditioning for methods (IPGO) that
optimise prompt embeddings instead of writing words.

    method = build_method(spec, cfg)             # eval.methods.build_method
    outputs = method.rewrite(["a cat on a sofa"], n=16)
    outputs[0].rewrites[0].text                  # what is shown in the report
    outputs[0].rewrites[0].conditioning          # None for text methods

A new method is one file: a subclass of `Method` with `rewrite`, registered in eval/methods/__init__.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Conditioning:
    """Prompt embeddings to render from instead of text: `prompt_embeds` (77, D) float32 as SD's text
    encoder would produce, optional `negative_prompt_embeds` the same shape. `label` is the text
    shown in reports; the cache keys on a hash of the arrays."""

    prompt_embeds: np.ndarray
    negative_prompt_embeds: Optional[np.ndarray] = None
    label: str = ""

    def digest(self) -> str:
        h = hashlib.sha256()
        for array in (self.prompt_embeds, self.negative_prompt_embeds):
            if array is not None:
                a = np.ascontiguousarray(array, dtype=np.float32)
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Rewrite:
    """One rewrite of a prompt: its text, and (conditioning methods) what to render instead of the text."""

    text: str
    conditioning: Optional[Conditioning] = None

    def render_key(self) -> str:
        """What identifies the render: the text, or `embeds:<sha>` for conditioning."""
        return self.text if self.conditioning is None else f"embeds:{self.conditioning.digest()}"


@dataclass
class MethodOutput:
    """The rewrites of one plain prompt, best first where the method ranks them (beam scores). `info`:
    a method's own per-prompt measurements (IPGO: training-noise / held-out-seed reward, cost), which
    the report carries; not cached."""

    prompt: str
    rewrites: list[Rewrite] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class Method:
    """prompts → rewrites. `name` is the row label in the report; `identity` is what the rewrites
    depend on (checkpoint path, decoding settings) so generated rewrites can be cached and reused."""

    name: str = "method"

    def identity(self) -> dict:
        return {"name": self.name}

    def rewrite(self, prompts: Sequence[str], n: int) -> list[MethodOutput]:
        raise NotImplementedError

    def close(self) -> None:
        """Free models (called once all prompt sets are done)."""
