"""Synthetic trajectories shaped like real ones, for the tests and bench/buffer.py."""
from __future__ import annotations

from typing import Optional

import numpy as np

from common.trajectory import Trajectory

_WORDS = ("highly detailed", "digital painting", "artstation", "concept art", "sharp focus",
          "illustration", "cinematic lighting", "octane render", "by greg rutkowski", "trending",
          "intricate", "elegant", "smooth", "matte painting", "8k", "volumetric light")
_PROMPTS = ("a cat on a sofa", "a lighthouse at dusk", "portrait of an old sailor", "a red sports car",
            "a bowl of fruit on a table", "a castle in the mountains", "a robot reading a book")


def make_trajectory(i: int, log_reward: float = 0.0, *, prompt: Optional[str] = None,
                    response: Optional[str] = None, length: int = 45, run: str = "",
                    rng: Optional[np.random.Generator] = None) -> Trajectory:
    """Trajectory number i: a distinct response unless `response` is given; `length` tokens."""
    rng = rng if rng is not None else np.random.default_rng(i)
    prompt = prompt if prompt is not None else _PROMPTS[i % len(_PROMPTS)]
    if response is None:
        words = rng.choice(len(_WORDS), size=6)
        response = f"{prompt}, " + ", ".join(_WORDS[w] for w in words) + f" #{i}"
    return Trajectory(
        prompt=prompt,
        response=response,
        prompt_ids=[int(x) for x in rng.integers(0, 50257, size=8)],
        response_ids=[int(x) for x in rng.integers(0, 50257, size=length)],
        ref_logprobs=[float(x) for x in -rng.exponential(2.0, size=length)],
        policy_version=i // 100,
        run=run,
        scores={"aes": float(rng.normal(0.1, 0.3)), "rel": float(min(0.0, rng.normal(0.0, 0.2)))},
        log_reward=float(log_reward),
    )
