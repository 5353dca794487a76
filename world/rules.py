"""The world's vocabulary in one place: what a scene may hold and how it may look.

Content (what a plain caption names): 1-3 objects, each a shape x colour x size; a 2-object scene
also has a relation (the first object is left of / right of / above / below the second).

Style (what engineered modifiers set) is eight axes. The first six (`STYLE_AXES`) are drawn at
random when a caption does not mention them -- a plain prompt gets an average picture. The last two
(`DEFECT_AXES`) are defects, off unless a harmful modifier ("blurry", "cluttered") turns them on.

Geometry is in pixels of the final 32 x 32 picture (x to the right, y downwards, centre 16, 16).
"""
from __future__ import annotations

CANVAS = 32  # final picture side, pixels (see scenes.py for why 32)
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-averaged down: anti-aliased edges stay legible
CENTRE = CANVAS / 2

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")

#: half the side of an object's bounding box, pixels: small shapes are 8 px wide, large 11 px
RADIUS = {"small": 4.0, "large": 5.5}
#: the most objects a scene holds, and the most large ones among three (32 px fit no more uncrowded)
MAX_OBJECTS = 3
MAX_LARGE_IN_THREE = 1

STYLE_AXES: dict[str, tuple[str, ...]] = {
    "background": ("white", "dark", "sky", "sand"),
    "palette": ("natural", "neon", "pastel", "monochrome"),
    "outline": ("none", "thin", "thick"),
    "lighting": ("flat", "glow", "spotlight"),
    "composition": ("centered", "offset", "spread"),
    "texture": ("flat", "stripes", "grain"),
}
#: defect axes: (off value, on value); off unless a caption asks for the defect
DEFECT_AXES: dict[str, tuple[str, str]] = {
    "blur": ("sharp", "blurry"),
    "clutter": ("tidy", "cluttered"),
}
AXES: dict[str, tuple[str, ...]] = {**STYLE_AXES, **DEFECT_AXES}


def check_value(axis: str, value: str) -> None:
    """Raise a ValueError naming the axis and its allowed values when `value` is not one of them."""
    if axis not in AXES:
        raise ValueError(f"unknown style axis {axis!r}; axes are {list(AXES)}")
    if value not in AXES[axis]:
        raise ValueError(f"{axis}={value!r} is not a value of {axis}; choose one of {list(AXES[axis])}")
