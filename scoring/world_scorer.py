"""The miniature world's ground truth as a scorer: `world` reads each picture with the world's attribute reader
(world/reader.py, pixels only) and returns the hidden taste it sees and which taste mode, if any, the picture
reaches (world/taste.py). It is an *eval* scorer -- `pag eval --preset mini --scorers world` -- for counting the
modes a method's rewrites reach in their pictures (bench/claim_mini.py); training never sees it.

Keys: `taste` in [0, 1], and per mode `mode_<name>` (spaces as underscores): 1.0 where the picture reaches that
mode, else 0.0, so a rewrite's mean over its images is the share of its pictures in the mode. Pictures of
another size are resized to the reader's 32 px (meaningful only for the world's own pipeline).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from scoring.registry import ScorerContext, ScoreFn, register_scorer
from world.reader import load_reader, read
from world.taste import MODES, mode_of, taste

#: the picture size the reader was trained on (world/README.md)
READER_SIZE = 32


def mode_key(mode: str) -> str:
    """`mode_<name>` with spaces as underscores: the score key of one taste mode."""
    return "mode_" + mode.replace(" ", "_")


MODE_KEYS = tuple(mode_key(m) for m in MODES)


def reader_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] → (N, 32, 32, 3) uint8, as world.scenes.render draws them."""
    images = images.detach().float().clamp(0, 1)
    if images.shape[-2:] != (READER_SIZE, READER_SIZE):
        images = F.interpolate(images, size=(READER_SIZE, READER_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@register_scorer("world", keys=("taste", *MODE_KEYS))
def world_scorer(ctx: ScorerContext) -> ScoreFn:
    net = load_reader()

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        seen = read(reader_pixels(images).numpy(), net)
        modes = [mode_of(s) for s in seen]
        out = {"taste": torch.tensor([taste(s) for s in seen], dtype=torch.float32)}
        for mode, key in zip(MODES, MODE_KEYS):
            out[key] = torch.tensor([float(m == mode) for m in modes], dtype=torch.float32)
        return out

    return fn
