"""Picture grids for reports (`pag train`'s samples.png, `pag eval`'s grid_<set>.png) and PNG encoding."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np


def image_grid(rows: list[tuple[str, list[np.ndarray]]], path: Path, tile: int = 128) -> None:
    """One row per prompt: the plain prompt's image, then its rewrites' images."""
    from PIL import Image, ImageDraw

    label_h = 18
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (cols * tile, len(rows) * (tile + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (tile + label_h)
        draw.text((4, y + 2), label[:cols * tile // 7], fill="black")
        for c, img in enumerate(images):
            grid.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (c * tile, y + label_h))
    grid.save(path)


def png_bytes(image, size: Optional[int] = None) -> bytes:
    """A (3, H, W) float tensor in [0, 1] as PNG bytes, resized (bicubic) to size × size when given."""
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    if size is not None:
        picture = picture.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()
