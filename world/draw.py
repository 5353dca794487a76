"""Pixel primitives for `scenes.render`: shape masks, colours, backgrounds and whole-picture effects.

Every function is pure (numpy in, numpy out) and works in float RGB 0..255, shape (H, W, 3), except
the shape distances, which are in pixels of the final 32-px picture so one formula serves the 4x
supersampled drawing. Shapes are signed distances (negative inside): the outline is then simply the
band 0 < d <= width outside the shape, so a thick outline never eats a small shape's fill colour.
"""
from __future__ import annotations

import numpy as np

from world.rules import CANVAS

RGB = tuple[int, int, int]

#: object fill colours per palette; monochrome has one grey ink (see `fill_rgb`)
PALETTES: dict[str, dict[str, RGB]] = {
    "natural": {"red": (200, 45, 40), "orange": (230, 125, 30), "yellow": (225, 200, 40),
                "green": (50, 150, 60), "cyan": (40, 170, 180), "blue": (40, 70, 190),
                "purple": (125, 60, 165), "pink": (225, 115, 165)},
    "neon": {"red": (255, 20, 50), "orange": (255, 130, 0), "yellow": (255, 250, 0),
             "green": (0, 255, 60), "cyan": (0, 240, 255), "blue": (30, 60, 255),
             "purple": (180, 0, 255), "pink": (255, 0, 180)},
    "pastel": {"red": (245, 150, 150), "orange": (250, 195, 140), "yellow": (250, 240, 150),
               "green": (165, 225, 160), "cyan": (160, 230, 230), "blue": (160, 180, 245),
               "purple": (200, 165, 240), "pink": (245, 175, 215)},
}
BACKGROUNDS: dict[str, tuple[RGB, RGB]] = {  # (top, bottom): only the sky is a gradient
    "white": ((245, 245, 242), (245, 245, 242)),
    "dark": ((24, 24, 36), (24, 24, 36)),
    "sky": ((70, 130, 220), (175, 210, 245)),
    "sand": ((205, 170, 115), (205, 170, 115)),
}
OUTLINE_WIDTH = {"none": 0.0, "thin": 1.0, "thick": 2.0}  # pixels
STRIPE_AMPLITUDE = 18.0  # +-, added to every channel
STRIPE_PERIOD = 4  # pixels along x + y: 2-px diagonal bands
GRAIN_SIGMA = 14.0  # luminance noise, per pixel
BLUR_SIGMA = 1.1  # the "blurry" defect; far above the softness a decoder adds
GLOW_SIGMA = 3.0
GLOW_STRENGTH = 0.75
GLOW_GAP = 0.7  # pixels (a Gaussian's sigma): the band of background kept around a glowing object


def is_dark(background: str) -> bool:
    return background == "dark"


def fill_rgb(colour: str, palette: str, background: str) -> RGB:
    """The fill of an object. Monochrome has no colours, only one grey ink that contrasts the
    background: that is the point of the "ink noir" mode's tension with relevance."""
    if palette == "monochrome":
        return (170, 170, 170) if is_dark(background) else (70, 70, 70)
    return PALETTES[palette][colour]


def ink_rgb(background: str) -> RGB:
    """Outline ink: black, or near-white on the dark background (black would vanish there)."""
    return (240, 240, 240) if is_dark(background) else (15, 15, 15)


def background(name: str, size: int) -> np.ndarray:
    """(size, size, 3) float: flat, or for the sky a vertical gradient (deep at the top)."""
    top, bottom = (np.asarray(c, dtype=np.float64) for c in BACKGROUNDS[name])
    t = (np.arange(size) + 0.5) / size
    column = top[None, :] * (1 - t[:, None]) + bottom[None, :] * t[:, None]  # (size, 3)
    return np.repeat(column[:, None, :], size, axis=1)


def coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of pixel centres of a size x size raster, in pixels of the final CANVAS picture."""
    c = (np.arange(size) + 0.5) * CANVAS / size
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def _box(dx: np.ndarray, dy: np.ndarray, hx: float, hy: float) -> np.ndarray:
    return np.maximum(np.abs(dx) - hx, np.abs(dy) - hy)


def shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (approximate at corners) from a shape of half-extent `r` centred at 0.

    The half-extents are tuned so the six shapes cover similar areas and differ at 8 px."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return _box(dx, dy, 0.85 * r, 0.85 * r)
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.1 * r) / np.sqrt(2)
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.25 * r  # a hole half the ring's width
    if shape == "cross":
        arm = 0.3 * r  # thin arms: concave corners that a diamond lacks
        return np.minimum(_box(dx, dy, r, arm), _box(dx, dy, arm, r))
    if shape == "triangle":  # apex (0, -r), base y = 0.8 r from x = -r to r
        side = (1.8 * np.abs(dx) - (dy + r)) / np.hypot(1.8, 1.0)  # distance past a slanted side
        return np.maximum(side, dy - 0.8 * r)
    raise ValueError(f"unknown shape {shape!r}")


def box_down(image: np.ndarray, factor: int) -> np.ndarray:
    """Average factor x factor blocks of an (H, W, C) array: exact area sampling, so edges come out
    anti-aliased."""
    h, w, c = image.shape
    assert h % factor == 0 and w % factor == 0, (image.shape, factor)
    out = image.reshape(h // factor, factor, w, c).sum(axis=1)
    return out.reshape(h // factor, w // factor, factor, c).sum(axis=2) / (factor * factor)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) or (H, W) array, edges renormalised (no dark rim)."""
    h, w = image.shape[:2]
    rows, cols = _blur_matrix(h, sigma), _blur_matrix(w, sigma)
    if image.ndim == 2:
        return rows @ image @ cols.T
    out = np.tensordot(rows, image, axes=(1, 0))  # (H, W, C) blurred down the columns
    return np.tensordot(out, cols, axes=(1, 1)).transpose(0, 2, 1)  # and along the rows


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    i = np.arange(n)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def glow(base: np.ndarray, fill: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Tint the picture around the objects with a halo of their own fill colour.

    The halo leaves a thin band of background right at each object's edge (GLOW_GAP) and is at
    most GLOW_STRENGTH opaque, so the silhouette stays crisp: a glow must neither read as blur nor
    hide an 8-px shape, and it must show even for a grey ink on a grey background."""
    spread = gaussian_blur(alpha, GLOW_SIGMA)
    colour = gaussian_blur(fill, GLOW_SIGMA) / np.maximum(spread, 1e-6)[..., None]
    edge = np.clip(4.0 * gaussian_blur(alpha, GLOW_GAP), 0.0, 1.0)  # ~1 within a pixel of an object
    strength = GLOW_STRENGTH * (np.clip(3.0 * spread, 0.0, 1.0) * (1 - edge))[..., None]
    return base * (1 - strength) + colour * strength


def stripes(size: int) -> np.ndarray:
    """(size, size, 1) additive diagonal bands of +-STRIPE_AMPLITUDE."""
    x, y = np.meshgrid(np.arange(size), np.arange(size))
    band = ((x + y) % STRIPE_PERIOD) < STRIPE_PERIOD // 2
    return np.where(band, STRIPE_AMPLITUDE, -STRIPE_AMPLITUDE)[..., None]


def grain(size: int, seed: int) -> np.ndarray:
    """(size, size, 1) luminance noise, seeded by the scene so a render is reproducible."""
    return np.random.default_rng(seed).normal(0.0, GRAIN_SIGMA, size=(size, size, 1))


def spotlight(image: np.ndarray) -> np.ndarray:
    """A pool of light in the centre, falling off to 30 % at the corners.

    The pool also brightens (it lifts the dark background), so the effect shows on every background."""
    size = image.shape[0]
    x, y = coordinates(size)
    r = np.hypot(x - CANVAS / 2, y - CANVAS / 2)
    s = np.clip((19.0 - r) / 10.0, 0.0, 1.0)
    s = (s * s * (3 - 2 * s))[..., None]  # smoothstep: 1 inside r=9, 0 outside r=19
    return image * (0.3 + 0.7 * s) + 60.0 * s * (1 - image / 255.0)


def greyscale(image: np.ndarray) -> np.ndarray:
    lum = image @ np.array([0.299, 0.587, 0.114])
    return np.repeat(lum[..., None], 3, axis=-1)
