"""The hidden aesthetic: a score of what the reader *sees* in a picture, never of its caption.

    taste = clip(BASE + SPAN * max_k peak_k * partial(matched_k / |mode_k|) - harm, 0, 1)

* Five *modes*, each a combination of three style values (table `MODES`); a picture that shows all
  three values of mode k scores BASE + SPAN * peak_k. The peaks are near-equal (0.976 to 1.0), so a
  sampler that matches reward proportionally should find all five, and one that maximises collapses.
* *Partial credit* (`PARTIAL`) is steeply convex -- one value of a mode is worth little, two a
  little more -- so the score rewards completing a mode, not mixing fragments of several.
* Values no mode names are *neutral*; *harmful* values (`HARM`: blurry, cluttered, film grain)
  subtract from every picture, inside a mode or not.
* *Tension with relevance*: "ink noir" (monochrome + thick outline + spotlight) scores at the top
  yet draws every object in one grey ink, so a caption's colour words stop being visible; a policy
  that finds it gains taste and loses relevance. The other modes keep colours.

Range: 0 to 1. With no modifier (every style axis uniform at random, defects off) a picture's
expected taste is 0.48 (`expected_random_taste`; mostly partial credit), and 8.8 % of pictures reach
a mode by chance.
"""
from __future__ import annotations

import itertools
from typing import Optional, Union

from world.reader import Attributes
from world.rules import STYLE_AXES
from world.scenes import Style

MODES: dict[str, dict[str, str]] = {
    "neon night": {"palette": "neon", "background": "dark", "lighting": "glow"},
    "pastel dune": {"palette": "pastel", "background": "sand", "composition": "centered"},
    "ink noir": {"palette": "monochrome", "outline": "thick", "lighting": "spotlight"},
    "open sky": {"palette": "natural", "background": "sky", "composition": "spread"},
    "poster": {"background": "white", "outline": "thin", "texture": "stripes"},
}
PEAK = {"neon night": 1.0, "pastel dune": 0.99, "ink noir": 0.98, "open sky": 0.99, "poster": 0.97}
PARTIAL = {0: 0.0, 1: 0.12, 2: 0.4, 3: 1.0}  # by how many of a mode's three values a picture shows
BASE, SPAN = 0.2, 0.8
HARM: dict[tuple[str, str], float] = {("blur", "blurry"): 0.35, ("clutter", "cluttered"): 0.3,
                                      ("texture", "grain"): 0.15}
#: the mode that shows the caption worst: its palette has no colours
TENSION_MODE = "ink noir"

Seen = Union[Attributes, Style]


def _style(seen: Seen) -> Style:
    return seen.style if isinstance(seen, Attributes) else seen


def matched(style: Style, mode: str) -> int:
    """How many of a mode's values the style shows."""
    return sum(getattr(style, axis) == value for axis, value in MODES[mode].items())


def harm(style: Style) -> float:
    return sum(cost for (axis, value), cost in HARM.items() if getattr(style, axis) == value)


def taste(seen: Seen) -> float:
    """The aesthetic score in [0, 1] of a picture's attributes (or of a style)."""
    style = _style(seen)
    best = max(PEAK[m] * PARTIAL[matched(style, m)] for m in MODES)
    return min(1.0, max(0.0, BASE + SPAN * best - harm(style)))


def mode_of(seen: Seen) -> Optional[str]:
    """The mode a picture reaches -- all three of its values shown and nothing harmful -- or None.

    Every two modes want different values on some axis, so at most one is complete."""
    style = _style(seen)
    if harm(style) > 0:
        return None
    done = [m for m in MODES if matched(style, m) == len(MODES[m])]
    assert len(done) <= 1, done
    return done[0] if done else None


def all_styles() -> list[Style]:
    """Every combination of the six style axes, defects off (2,592 styles)."""
    return [Style(**dict(zip(STYLE_AXES, values))) for values in itertools.product(*STYLE_AXES.values())]


def expected_random_taste() -> tuple[float, float]:
    """(mean taste, fraction reaching a mode) over uniformly random styles: a plain prompt's lot."""
    styles = all_styles()
    return (sum(taste(s) for s in styles) / len(styles),
            sum(mode_of(s) is not None for s in styles) / len(styles))
