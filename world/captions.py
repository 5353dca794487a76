"""Captions: plain English for content, comma-separated modifiers for style, and their parsers.

A plain caption names content only ("a red circle above a small blue square"); large is the unmarked
size, so "small" is the only size word written (the parser also takes "large" and "big"). An
engineered caption appends modifiers: "a red circle, neon palette, dark background, soft glow".

Modifiers are of three kinds:

* *phrasings* (`PHRASINGS`): 1-3 per style value, each sets that value ("soft glow" -> lighting=glow);
* *no-effect words* (`NO_EFFECT`): the world's "trending on artstation"; they change nothing;
* *harmful* phrasings: the phrasings of a defect's "on" value ("blurry", "cluttered"), and of the
  grain texture ("noisy"), which taste.py penalises.

`parse_modifiers` finds phrasings anywhere in the text (whole words, longest first); when an axis is
mentioned twice the last mention wins. Axes not mentioned are drawn at random by
`scene_from_caption` -- a plain prompt gets an average picture.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import numpy as np

from world.rules import COLOURS, DEFECT_AXES, SHAPES
from world.scenes import Content, Item, Scene, Style, make_scene, sample_style

PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "background": {"white": ("white background", "plain white backdrop"),
                   "dark": ("dark background", "black backdrop", "night scene"),
                   "sky": ("sky background", "blue sky", "sky gradient"),
                   "sand": ("sand background", "desert sand", "beige backdrop")},
    "palette": {"natural": ("natural colors", "realistic colors"),
                "neon": ("neon palette", "neon colors", "vivid neon"),
                "pastel": ("pastel palette", "pastel colors", "soft pastels"),
                "monochrome": ("monochrome", "black and white", "grayscale")},
    "outline": {"none": ("no outlines", "borderless"),
                "thin": ("thin outline", "fine linework"),
                "thick": ("thick outline", "bold outlines", "heavy ink lines")},
    "lighting": {"flat": ("flat lighting", "even light"),
                 "glow": ("soft glow", "glowing", "bloom"),
                 "spotlight": ("spotlight", "vignette", "dramatic spotlight")},
    "composition": {"centered": ("centered", "symmetrical composition"),
                    "offset": ("off-center", "rule of thirds"),
                    "spread": ("spread out", "wide spacing", "edge to edge")},
    "texture": {"flat": ("smooth shading", "flat color"),
                "stripes": ("striped pattern", "stripes", "pinstripes"),
                "grain": ("film grain", "grainy", "noisy")},
    "blur": {"sharp": ("sharp focus", "crisp"),
             "blurry": ("blurry", "out of focus", "motion blur")},
    "clutter": {"tidy": ("minimalist", "uncluttered"),
                "cluttered": ("cluttered", "messy", "busy details")},
}
NO_EFFECT = ("highly detailed", "8k", "4k", "masterpiece", "trending on artstation", "award winning",
             "intricate", "octane render", "unreal engine", "hyperrealistic", "best quality",
             "professional", "cinematic", "epic", "stunning", "beautiful", "digital art",
             "concept art", "photorealistic", "ultra hd", "studio quality", "artstation hq",
             "detailed", "hdr", "amazing")
HARMFUL = tuple(p for axis, (_, on) in DEFECT_AXES.items() for p in PHRASINGS[axis][on]) \
    + PHRASINGS["texture"]["grain"]

_PHRASE_TO = {p: (axis, value) for axis, vals in PHRASINGS.items() for value, ps in vals.items() for p in ps}
_PHRASE_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(p) for p in sorted(_PHRASE_TO, key=len, reverse=True))
                        + r")(?![\w-])")
_SIZE = r"(?:(small|large|big) )?"
_OBJ = rf"an? {_SIZE}({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_REL = r"(?:to the )?(left of|right of)|(above|below)"
_CONTENT = [  # most objects first, so a 1-object pattern never claims part of a longer caption
    (3, re.compile(rf"{_OBJ}, {_OBJ},? and {_OBJ}")),
    (2, re.compile(rf"{_OBJ} (?:{_REL}) {_OBJ}")),
    (1, re.compile(_OBJ)),
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(item: Item) -> str:
    words = ("small " if item.size == "small" else "") + f"{item.colour} {item.shape}"
    return f"{_article(words)} {words}"


def plain_caption(content: Content | Scene) -> str:
    """Content only, in plain English."""
    content = content.content if isinstance(content, Scene) else content
    phrases = [_noun_phrase(i) for i in content.items]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        relation = content.relation if content.relation in ("above", "below") else f"to the {content.relation}"
        return f"{phrases[0]} {relation} {phrases[1]}"
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]}"


def engineered_caption(content: Content | Scene, modifiers: Sequence[str]) -> str:
    """The plain caption followed by ", " and the modifiers, comma-separated."""
    return ", ".join([plain_caption(content), *modifiers])


def style_phrases(style: Style | dict[str, str], rng: Optional[np.random.Generator] = None,
                  axes: Optional[Iterable[str]] = None) -> list[str]:
    """One phrasing per axis (all axes, or `axes`) that sets the style's value; defects only when on.

    The first phrasing of each value, or a random one with `rng`."""
    values = style.as_dict() if isinstance(style, Style) else dict(style)
    out = []
    for axis in axes if axes is not None else values:
        value = values[axis]
        if axis in DEFECT_AXES and value == DEFECT_AXES[axis][0] and axes is None:
            continue
        options = PHRASINGS[axis][value]
        out.append(options[int(rng.integers(len(options)))] if rng is not None else options[0])
    return out


def parse_modifiers(text: str) -> dict[str, str]:
    """{axis: value} for every axis a phrasing in `text` sets; the last mention of an axis wins."""
    found: dict[str, str] = {}
    for match in _PHRASE_RE.finditer(_normal(text)):
        axis, value = _PHRASE_TO[match.group(1)]
        found[axis] = value
    return found


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _item(size: Optional[str], colour: str, shape: str) -> Item:
    return Item(shape, colour, "small" if size == "small" else "large")


def parse_content(text: str) -> Content:
    """The content a caption names; raises ValueError quoting the text when it names none."""
    normal = _normal(text)
    for n, pattern in _CONTENT:
        match = pattern.search(normal)
        if match is None:
            continue
        g = match.groups()
        if n == 1:
            return Content((_item(*g),))
        if n == 3:
            return Content((_item(*g[0:3]), _item(*g[3:6]), _item(*g[6:9])))
        relation = g[3] or g[4]
        return Content((_item(*g[0:3]), _item(*g[5:8])), relation)
    raise ValueError(f"caption {text!r} names no object: expected e.g. 'a red circle', "
                     f"'a red circle above a small blue square' or 'a red circle, a blue ring and a "
                     f"green cross', with a colour of {list(COLOURS)} and a shape of {list(SHAPES)}")


def scene_from_caption(text: str, rng: np.random.Generator) -> Scene:
    """A scene the caption describes: its content, the style its modifiers set, and random values
    for every style axis it leaves open (defects stay off unless asked for)."""
    content = parse_content(text)
    style = sample_style(rng, parse_modifiers(text))
    return make_scene(content, style, rng)

