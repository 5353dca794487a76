"""Captioned pictures for training the world's models.

A training caption always names the content (the plain caption) and names each style axis only
now and then, so a model learns that an unnamed axis is drawn at random -- a plain prompt gets an
average picture -- while a named one is obeyed. Defects are named whenever they are on (they stay
off unless asked for), and no-effect words are sprinkled in, as people write them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from world.captions import NO_EFFECT, PHRASINGS, plain_caption
from world.rules import DEFECT_AXES, STYLE_AXES
from world.scenes import Scene, render, sample_scene

NAME_AXIS = 0.45  # chance that a training caption names a style axis's value
NAME_OFF_DEFECT = 0.08  # chance it says "sharp focus" / "minimalist" when the defect is off
NO_EFFECT_WORDS = (0, 3)  # how many no-effect words a caption carries, inclusive
DEFECT_RATE = 0.12  # chance of each defect in a training scene


@dataclass
class Pictures:
    scenes: list[Scene]
    images: np.ndarray  # (N, 32, 32, 3) uint8


def pictures(n: int, seed: int, defect_rate: float = DEFECT_RATE, desc: str = "rendering scenes") -> Pictures:
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng, defect_rate=defect_rate) for _ in range(n)]
    images = np.stack([render(s) for s in tqdm(scenes, desc=desc, unit="scene", mininterval=2)])
    return Pictures(scenes, images)


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def training_caption(scene: Scene, rng: np.random.Generator, name_axis: float = NAME_AXIS) -> str:
    """The plain caption, then modifiers in random order: some style values, every defect that is
    on, and a few no-effect words."""
    style = scene.style.as_dict()
    mods = [_pick(rng, PHRASINGS[axis][style[axis]]) for axis in STYLE_AXES if rng.random() < name_axis]
    for axis, (off, _) in DEFECT_AXES.items():
        if style[axis] != off or rng.random() < NAME_OFF_DEFECT:
            mods.append(_pick(rng, PHRASINGS[axis][style[axis]]))
    mods += [_pick(rng, NO_EFFECT) for _ in range(int(rng.integers(NO_EFFECT_WORDS[0], NO_EFFECT_WORDS[1] + 1)))]
    order = rng.permutation(len(mods))
    return ", ".join([plain_caption(scene), *(mods[i] for i in order)])


def full_caption(scene: Scene) -> str:
    """The plain caption with every style value named (the first phrasing of each)."""
    style = scene.style.as_dict()
    mods = [PHRASINGS[axis][style[axis]][0] for axis in STYLE_AXES]
    mods += [PHRASINGS[axis][style[axis]][0] for axis, (off, _) in DEFECT_AXES.items() if style[axis] != off]
    return ", ".join([plain_caption(scene), *mods])


def to_unit(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float tensor (N, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
