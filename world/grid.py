"""`python -m world.grid` draws docs/world/scenes.png: one row per style value, then one per taste
mode, so a person can see what every modifier does.

Each row shows the same six contents (1, 2 and 3 objects) on a plain baseline style -- white
background, natural palette, no outline, flat light, offset, flat texture, sharp, tidy -- with only
the row's value changed (or the mode's three values). Pictures are 32 px, shown 3x enlarged.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from common.images import image_grid
from world.captions import PHRASINGS, plain_caption
from world.rules import AXES
from world.scenes import Content, Style, make_scene, render, sample_content
from world.taste import MODES, taste

BASELINE = {"background": "white", "palette": "natural", "outline": "none", "lighting": "flat",
            "composition": "offset", "texture": "flat", "blur": "sharp", "clutter": "tidy"}
OUT = Path(__file__).resolve().parents[1] / "docs" / "world" / "scenes.png"


def contents(n: int = 6, seed: int = 3) -> list[Content]:
    """n contents with 1, 2 and 3 objects in turn."""
    rng = np.random.default_rng(seed)
    out: list[Content] = []
    while len(out) < n:
        c = sample_content(rng)
        if len(c.items) == len(out) % 3 + 1:
            out.append(c)
    return out


def row(label: str, values: dict[str, str], cs: Sequence[Content], seed: int) -> tuple[str, list[np.ndarray]]:
    style = Style(**{**BASELINE, **values})
    rng = np.random.default_rng(seed)
    return f"{label}  (taste {taste(style):.2f})", [render(make_scene(c, style, rng)) for c in cs]


def rows(cs: Sequence[Content]) -> list[tuple[str, list[np.ndarray]]]:
    out = []
    for axis, values in AXES.items():
        for value in values:
            label = f"{axis}={value}: " + " / ".join(PHRASINGS[axis][value])
            out.append(row(label, {axis: value}, cs, seed=len(out)))
    for name, values in MODES.items():
        out.append(row(f"mode {name}: " + ", ".join(values.values()), values, cs, seed=len(out)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m world.grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cs = contents()
    image_grid(rows(cs), args.out, tile=96)
    print(f"wrote {args.out}; columns: " + " | ".join(plain_caption(c) for c in cs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
