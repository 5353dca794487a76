"""The `world` scorer reads the miniature world's hidden taste and its modes from pictures alone, as the world's
attribute reader sees them (scoring/world_scorer.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scoring.registry import ScorerContext
from scoring.scorers import SCORE_KEYS, SCORERS
from scoring.world_scorer import MODE_KEYS, mode_key
from world import taste
from world.scenes import Content, Item, Style, make_scene, render

BASE = Style("white", "natural", "none", "flat", "offset", "flat")


def _pictures(styles: list[Style], size: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(5)
    content = Content((Item("circle", "red", "large"), Item("square", "blue", "small")), "left of")
    arrays = np.stack([render(make_scene(content, s, rng)) for s in styles])
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    return torch.nn.functional.interpolate(images, size=(size, size), mode="nearest") if size != 32 else images


@pytest.mark.parametrize("size", [32, 64])
def test_the_world_scorer_reads_each_mode_and_its_taste_from_the_pictures(size):
    from common.config import load_config

    styles = [dataclasses.replace(BASE, **values) for values in taste.MODES.values()] + [BASE]
    fn = SCORERS["world"](ScorerContext(model=load_config(preset="mini").model))
    out = fn(_pictures(styles, size), ["a red circle to the left of a small blue square"] * len(styles))
    assert list(out) == list(SCORE_KEYS["world"]) == ["taste", *MODE_KEYS]
    for i, mode in enumerate(taste.MODES):
        assert out[mode_key(mode)][i] == 1.0, f"{mode} not read in its own picture"
        assert sum(float(out[k][i]) for k in MODE_KEYS) == 1.0
        assert out["taste"][i] > 0.9
    assert all(float(out[k][-1]) == 0.0 for k in MODE_KEYS), "a neutral style reaches no mode"
    assert out["taste"][-1] < 0.6
