"""Scenes: what a picture holds (content), how it looks (style), where things sit; and `render`.

Why 32 x 32 RGB: the project trains its own diffusion model on 2 CPU cores. A 4x VAE turns a 32-px
picture into an 8 x 8 x 4 latent, small enough for a UNet to learn the world in minutes; 64 px would
quadruple every convolution. Shapes stay legible at 32 px because they are drawn 4x supersampled and
box-averaged (anti-aliased edges) and are 8 px wide (small) or 11 px (large) -- with 7-px small shapes
(and a glow that washed out edges) the first reader confused rings with circles and crosses with
diamonds. The shipped reader tells the six shapes apart on held-out renders (world/README.md).

Layout rules, in pixels from the centre (16, 16), with L_inf distance (max of |dx|, |dy|) and an
object's *gap* = 16 - L_inf(centre) - radius (its bounding box's distance to the nearest border):

* every object fits (gap >= 0.5) and objects keep apart (centres >= r_i + r_j + 2 px);
* a 2-object relation is dominant: "left of" means x0 < x1 and |dx| >= 2 |dy| (so it reads at once);
* composition: *spread* puts every object against a border (gap <= 1.5); *centered* keeps the
  objects' mean centre within 1 px of the picture centre; *offset* moves it >= 3.5 px away; both of
  the latter keep every gap >= 3.5. The reader can thus tell the three apart from object positions.

`render(scene)` is a pure function of the scene (noise and clutter are seeded by `scene.seed`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from world import draw
from world.rules import (AXES, CANVAS, CENTRE, COLOURS, DEFECT_AXES, MAX_LARGE_IN_THREE, MAX_OBJECTS,
                         RADIUS, RELATIONS, SHAPES, SIZES, STYLE_AXES, SUPERSAMPLE, check_value)

SPREAD_GAP = (0.5, 1.5)
INNER_GAP = 3.5  # centered and offset objects keep at least this far from the borders
CENTERED_SHIFT = 1.0
OFFSET_SHIFT = (3.5, 6.0)
SEPARATION = 2.0
MAX_TRIES = 5000


@dataclass(frozen=True)
class Item:
    """One object of a scene's content."""

    shape: str
    colour: str
    size: str

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class Content:
    """What a plain caption names: 1-3 items and, for exactly two, how the first sits to the second."""

    items: tuple[Item, ...]
    relation: Optional[str] = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.items) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, not {len(self.items)}")
        if (len(self.items) == 2) != (self.relation is not None):
            raise ValueError(f"a relation is given exactly for 2 objects (got {len(self.items)} objects, "
                             f"relation {self.relation!r})")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r} is not one of {list(RELATIONS)}")
        if len(self.items) == 3 and sum(i.size == "large" for i in self.items) > MAX_LARGE_IN_THREE:
            raise ValueError(f"a 3-object scene has at most {MAX_LARGE_IN_THREE} large object (32 px)")


@dataclass(frozen=True)
class Style:
    """One value per axis (see rules.AXES); the defect axes default to off."""

    background: str
    palette: str
    outline: str
    lighting: str
    composition: str
    texture: str
    blur: str = DEFECT_AXES["blur"][0]
    clutter: str = DEFECT_AXES["clutter"][0]

    def __post_init__(self) -> None:
        for axis, value in asdict(self).items():
            check_value(axis, value)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Scene:
    content: Content
    style: Style
    positions: tuple[tuple[float, float], ...]  # (x, y) centre of each item, final-picture pixels
    seed: int = 0  # seeds grain and clutter

    def __post_init__(self) -> None:
        assert len(self.positions) == len(self.content.items), (self.positions, self.content)


# ---------------------------------------------------------------- sampling

def sample_content(rng: np.random.Generator) -> Content:
    """Uniform count, shapes, colours, sizes and relation (at most one large object among three)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    while True:
        items = tuple(Item(str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), str(rng.choice(SIZES)))
                      for _ in range(n))
        if n < 3 or sum(i.size == "large" for i in items) <= MAX_LARGE_IN_THREE:
            break
    return Content(items, str(rng.choice(RELATIONS)) if n == 2 else None)


def sample_style(rng: np.random.Generator, given: Optional[dict[str, str]] = None,
                 defect_rate: float = 0.0) -> Style:
    """Style axes not in `given` drawn uniformly; defects on with probability `defect_rate` each."""
    given = dict(given or {})
    values = {}
    for axis, options in STYLE_AXES.items():
        values[axis] = given.pop(axis) if axis in given else str(rng.choice(options))
    for axis, (off, on) in DEFECT_AXES.items():
        values[axis] = given.pop(axis) if axis in given else (on if rng.random() < defect_rate else off)
    if given:
        raise ValueError(f"unknown style axes {sorted(given)}; axes are {list(AXES)}")
    return Style(**values)


def make_scene(content: Content, style: Style, rng: np.random.Generator) -> Scene:
    """Place the content for the style's composition and give the scene its noise seed."""
    positions = place(content, style.composition, rng)
    return Scene(content, style, positions, seed=int(rng.integers(2**31)))


def sample_scene(rng: np.random.Generator, defect_rate: float = 0.0) -> Scene:
    return make_scene(sample_content(rng), sample_style(rng, defect_rate=defect_rate), rng)


# ---------------------------------------------------------------- layout

def gap(x: float, y: float, size: str) -> float:
    """Distance from an object's bounding box to the nearest picture border, pixels."""
    return CANVAS / 2 - max(abs(x - CENTRE), abs(y - CENTRE)) - RADIUS[size]


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How the object centred at `a` sits relative to the one at `b` (the dominant direction)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _relation_holds(a, b, relation: str) -> bool:
    dx, dy = abs(a[0] - b[0]), abs(a[1] - b[1])
    major, minor = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    return major >= 2 * minor and relation_of(a, b) == relation


def _border_point(rng: np.random.Generator, size: str) -> tuple[float, float]:
    """A centre whose bounding box lies against a random border (gap within SPREAD_GAP)."""
    d = CANVAS / 2 - RADIUS[size] - rng.uniform(*SPREAD_GAP)
    along = rng.uniform(-d, d)
    side = int(rng.integers(4))
    x, y = [(-d, along), (d, along), (along, -d), (along, d)][side]
    return CENTRE + x, CENTRE + y


def _relative_layout(content: Content, rng: np.random.Generator) -> list[np.ndarray]:
    """Compact centres around 0: a 2-object pair along its relation, or a chain of near neighbours."""
    sizes = [item.size for item in content.items]
    if content.relation is not None:
        major = RADIUS[sizes[0]] + RADIUS[sizes[1]] + SEPARATION + rng.uniform(0.0, 4.0)
        minor = rng.uniform(-0.5, 0.5) * major
        step = {"left of": (major, minor), "right of": (-major, minor),  # where the 2nd sits
                "above": (minor, major), "below": (minor, -major)}[content.relation]
        return [np.zeros(2), np.asarray(step)]
    pts = [np.zeros(2)]
    for size in sizes[1:]:
        anchor = int(rng.integers(len(pts)))
        distance = RADIUS[size] + RADIUS[sizes[anchor]] + SEPARATION + rng.uniform(0.0, 3.0)
        angle = rng.uniform(0, 2 * np.pi)
        pts.append(pts[anchor] + distance * np.array([np.cos(angle), np.sin(angle)]))
    return pts


def _inner_layout(content: Content, composition: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """A compact relative layout translated by t, drawn from the translations that keep every object
    INNER_GAP from the borders: near 0 for centered, at least OFFSET_SHIFT[0] away for offset."""
    pts = _relative_layout(content, rng)
    mean = sum(pts) / len(pts)
    pts = [p - mean for p in pts]
    room = [CANVAS / 2 - RADIUS[item.size] - INNER_GAP for item in content.items]
    lo = np.max([-r - p for p, r in zip(pts, room)], axis=0)  # (2,) lowest t per axis
    hi = np.min([r - p for p, r in zip(pts, room)], axis=0)
    if composition == "centered":
        lo, hi = np.maximum(lo, -CENTERED_SHIFT), np.minimum(hi, CENTERED_SHIFT)
    else:
        lo, hi = np.maximum(lo, -OFFSET_SHIFT[1]), np.minimum(hi, OFFSET_SHIFT[1])
    t = rng.uniform(lo, np.maximum(lo, hi))  # an empty range gives a layout that layout_ok rejects
    return [(float(CENTRE + p[0] + t[0]), float(CENTRE + p[1] + t[1])) for p in pts]


def layout_ok(content: Content, composition: str, pts) -> bool:
    """Every layout rule of the module docstring, for centres `pts`."""
    sizes = [i.size for i in content.items]
    gaps = [gap(x, y, s) for (x, y), s in zip(pts, sizes)]
    if min(gaps) < SPREAD_GAP[0]:
        return False
    for i in range(len(pts)):
        for j in range(i):
            if math.hypot(pts[i][0] - pts[j][0], pts[i][1] - pts[j][1]) < RADIUS[sizes[i]] + RADIUS[sizes[j]] + SEPARATION:
                return False
    if content.relation is not None and not _relation_holds(pts[0], pts[1], content.relation):
        return False
    shift = max(abs(sum(p[0] for p in pts) / len(pts) - CENTRE), abs(sum(p[1] for p in pts) / len(pts) - CENTRE))
    if composition == "spread":
        return max(gaps) <= SPREAD_GAP[1]
    if min(gaps) < INNER_GAP:
        return False
    return shift <= CENTERED_SHIFT if composition == "centered" else shift >= OFFSET_SHIFT[0]


def place(content: Content, composition: str, rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    """Centres that satisfy every layout rule (rejection sampling from a composition-shaped proposal)."""
    check_value("composition", composition)
    for _ in range(MAX_TRIES):
        if composition == "spread":
            pts = [_border_point(rng, item.size) for item in content.items]
        else:
            pts = _inner_layout(content, composition, rng)
        if layout_ok(content, composition, pts):
            return tuple((round(x, 2), round(y, 2)) for x, y in pts)
    raise RuntimeError(f"no layout found for {content} with composition {composition!r} "
                       f"in {MAX_TRIES} tries (the layout rules cannot be met)")


# ---------------------------------------------------------------- rendering

def render(scene: Scene) -> np.ndarray:
    """The picture of a scene, (CANVAS, CANVAS, 3) uint8; deterministic.

    Order: background and clutter, then the glow halo under the objects, the objects (outlined),
    4x box downsampling, stripes, spotlight, monochrome, blur, grain -- so whole-picture effects
    touch objects and background alike, as a photographic look would."""
    st, hi = scene.style, CANVAS * SUPERSAMPLE
    layers = np.zeros((hi, hi, 11), dtype=np.float32)  # paint rgb, alpha, fill rgb, alpha, base rgb
    layers[..., 8:] = draw.background(st.background, hi)
    if st.clutter == "cluttered":
        _clutter(layers[..., 8:], scene)
    _draw_objects(layers[..., :8], scene)
    small = draw.box_down(layers, SUPERSAMPLE).astype(np.float64)
    paint, alpha, fill, fill_alpha, base = (small[..., :3], small[..., 3], small[..., 4:7],
                                            small[..., 7], small[..., 8:])
    if st.lighting == "glow":
        base = draw.glow(base, fill, fill_alpha)
    picture = paint + base * (1 - alpha[..., None])
    if st.texture == "stripes":
        picture = np.clip(picture + draw.stripes(CANVAS), 0, 255)
    if st.lighting == "spotlight":
        picture = draw.spotlight(picture)
    if st.palette == "monochrome":
        picture = draw.greyscale(picture)
    if st.blur == "blurry":
        picture = draw.gaussian_blur(picture, draw.BLUR_SIGMA)
    if st.texture == "grain":  # on the film, after the lens: a blurry picture keeps its grain
        picture = picture + draw.grain(CANVAS, scene.seed)
    out = np.clip(np.rint(picture), 0, 255).astype(np.uint8)
    assert out.shape == (CANVAS, CANVAS, 3), out.shape
    return out


def _window(cx: float, cy: float, half: float) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """The supersampled rows/columns within `half` px of (cx, cy), and their coordinates."""
    lo = lambda c: max(0, int((c - half) * SUPERSAMPLE))  # noqa: E731
    hi = lambda c: min(CANVAS * SUPERSAMPLE, int(np.ceil((c + half) * SUPERSAMPLE)))  # noqa: E731
    rows, cols = slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))
    coords = (np.arange(CANVAS * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords[cols], coords[rows])
    return rows, cols, x, y


def _draw_objects(layers: np.ndarray, scene: Scene) -> None:
    """Fill (hi, hi, 8) in place: premultiplied paint (fill + outline) rgb, its alpha, fill rgb, alpha."""
    st = scene.style
    width = draw.OUTLINE_WIDTH[st.outline]
    ink = np.asarray(draw.ink_rgb(st.background), dtype=np.float32)
    for item, (cx, cy) in zip(scene.content.items, scene.positions):
        rows, cols, x, y = _window(cx, cy, RADIUS[item.size] + width + 1.0)
        d = draw.shape_distance(item.shape, x - cx, y - cy, RADIUS[item.size])
        inside, band = d <= 0, (d > 0) & (d <= width)
        colour = np.asarray(draw.fill_rgb(item.colour, st.palette, st.background), dtype=np.float32)
        view = layers[rows, cols]
        view[inside, 0:3], view[band, 0:3] = colour, ink
        view[inside | band, 3] = 1.0
        view[inside, 4:7], view[inside, 7] = colour, 1.0


def _clutter(base: np.ndarray, scene: Scene) -> None:
    """Paint 5-8 specks and short strokes in random palette colours on `base` (in place), clear of
    the real objects."""
    rng = np.random.default_rng([scene.seed, 1])
    target, placed = int(rng.integers(5, 9)), 0
    for _ in range(200):  # tries; a crowded picture may hold fewer specks
        if placed == target:
            break
        a = rng.uniform(2, CANVAS - 2, size=2)
        b = a + rng.uniform(1.5, 3.0) * np.array([np.cos(t := rng.uniform(0, 2 * np.pi)), np.sin(t)])
        if any(max(abs(p[0] - cx), abs(p[1] - cy)) < RADIUS[i.size] + 2.5
               for p in (a, b) for i, (cx, cy) in zip(scene.content.items, scene.positions)):
            continue
        rows, cols, x, y = _window(*(a + b) / 2, 2.5)
        ab = b - a
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1]) / (ab @ ab), 0, 1)
        mask = np.hypot(x - a[0] - t * ab[0], y - a[1] - t * ab[1]) <= 0.6
        base[rows, cols][mask] = draw.fill_rgb(str(rng.choice(COLOURS)), scene.style.palette,
                                               scene.style.background)
        placed += 1
