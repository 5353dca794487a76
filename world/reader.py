"""The attribute reader: what a picture shows, measured from its pixels alone.

`read(images) -> list[Attributes]`: the objects (shape, colour, size, centre) and all eight style
values of each picture. It never sees a caption, so taste.py and relevance checks can trust it on
generated pictures as on rendered ones.

How: a small CNN (`ReaderNet`, shipped in world/assets/reader.safetensors, trained by
`python -m world.reader_train`) with two heads, in the manner of a one-stage detector:

* a *cell* head on an 8 x 8 grid of 4-px cells: per cell, is an object's centre here (logit), and
  the shape, colour, size and centre (in cell units) of the object nearest it. Centres are at least
  9 px apart, so no two share a cell; neighbouring cells that fire for one object are merged by
  keeping the stronger within MERGE_PX.
* a *style* head over the pooled features (plus a coarse spatial map, since composition, spotlight
  and the sky gradient are about *where*): one softmax per axis.

Colour is reported as None on a monochrome picture: there is no colour to see.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from world.rules import AXES, CANVAS, COLOURS, SHAPES, SIZES
from world.scenes import Style

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "reader.safetensors"
GRID = 8  # cells per side
CELL = CANVAS // GRID  # pixels per cell
MERGE_PX = 5.0
#: channels of the cell head, in order
CELL_FIELDS = {"object": 1, "shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES), "offset": 2}
N_CELL = sum(CELL_FIELDS.values())
N_STYLE = sum(len(v) for v in AXES.values())


@dataclass(frozen=True)
class SeenObject:
    shape: str
    colour: Optional[str]  # None when the picture is monochrome
    size: str
    x: float  # centre, pixels
    y: float
    confidence: float = 1.0


@dataclass(frozen=True)
class Attributes:
    """What the reader sees in one picture."""

    objects: tuple[SeenObject, ...]
    style: Style

    @property
    def count(self) -> int:
        return len(self.objects)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2 if stride == 1 else (kernel - stride) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ReaderNet(nn.Module):
    """(B, 3, 32, 32) in 0..1 -> cell logits (B, N_CELL, 8, 8) and style logits (B, N_STYLE).

    Small on purpose (about 9 M multiply-adds a picture) so it trains in minutes on 2 CPU cores;
    most of them at 16 x 16, where the details that tell 8-px shapes apart still exist."""

    def __init__(self, fine: int = 32, coarse: int = 48) -> None:
        super().__init__()
        self.fine = nn.Sequential(_conv(3, fine, stride=2, kernel=4), _conv(fine, fine), _conv(fine, fine))
        self.coarse = nn.Sequential(_conv(fine, coarse, stride=2, kernel=4), _conv(coarse, coarse),
                                    _conv(coarse, coarse, dilation=2))
        self.cells = nn.Conv2d(coarse, N_CELL, 1)
        self.where = nn.Sequential(nn.Conv2d(coarse, 8, 1), nn.ReLU(inplace=True))
        self.style = nn.Sequential(nn.Linear(2 * coarse + fine + 8 * GRID * GRID, 128), nn.ReLU(inplace=True),
                                   nn.Linear(128, N_STYLE))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.shape[1:] == (3, CANVAS, CANVAS), x.shape
        fine = self.fine(x)  # (B, fine, 16, 16): texture and blur live here
        h = self.coarse(fine)  # (B, coarse, 8, 8)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3)), fine.std((2, 3)), self.where(h).flatten(1)], dim=1)
        return self.cells(h), self.style(pooled)


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in 0..1."""
    arr = np.asarray(images)
    assert arr.ndim == 4 and arr.shape[1:] == (CANVAS, CANVAS, 3) and arr.dtype == np.uint8, (arr.shape, arr.dtype)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)


def split_cells(cells: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cell head's channels by field name: (B, n, 8, 8) each."""
    out, start = {}, 0
    for name, n in CELL_FIELDS.items():
        out[name] = cells[:, start:start + n]
        start += n
    return out


def split_style(style: torch.Tensor) -> dict[str, torch.Tensor]:
    """The style head's logits by axis: (B, n_values) each."""
    out, start = {}, 0
    for axis, values in AXES.items():
        out[axis] = style[:, start:start + len(values)]
        start += len(values)
    return out


def decode(cells: torch.Tensor, style: torch.Tensor, threshold: float = 0.5) -> list[Attributes]:
    """Network outputs -> Attributes per picture (objects above `threshold`, merged within MERGE_PX)."""
    parts = split_cells(cells)
    prob = torch.sigmoid(parts["object"][:, 0])  # (B, 8, 8)
    axes = {axis: logits.argmax(1) for axis, logits in split_style(style).items()}
    out = []
    for b in range(cells.shape[0]):
        values = {axis: AXES[axis][int(idx[b])] for axis, idx in axes.items()}
        mono = values["palette"] == "monochrome"
        found = []
        for gy, gx in torch.nonzero(prob[b] > threshold).tolist():
            off = parts["offset"][b, :, gy, gx]  # centre in cell units from the cell's corner
            found.append(SeenObject(
                shape=SHAPES[int(parts["shape"][b, :, gy, gx].argmax())],
                colour=None if mono else COLOURS[int(parts["colour"][b, :, gy, gx].argmax())],
                size=SIZES[int(parts["size"][b, :, gy, gx].argmax())],
                x=float((gx + off[0]) * CELL), y=float((gy + off[1]) * CELL),
                confidence=float(prob[b, gy, gx])))
        out.append(Attributes(_merge(found), Style(**values)))
    return out


def _merge(found: list[SeenObject]) -> tuple[SeenObject, ...]:
    kept: list[SeenObject] = []
    for obj in sorted(found, key=lambda o: -o.confidence):
        if all(np.hypot(obj.x - k.x, obj.y - k.y) > MERGE_PX for k in kept):
            kept.append(obj)
    return tuple(sorted(kept, key=lambda o: (o.x, o.y)))


@lru_cache(maxsize=2)
def load_reader(path: str | Path = WEIGHTS) -> ReaderNet:
    """The shipped reader (eval mode, float32); a clear error if the weights file is missing."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reader weights {path} are missing; train them with "
                                f"`python -m world.reader_train` (see world/README.md)")
    net = ReaderNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval()


@torch.no_grad()
def read(images: Sequence[np.ndarray] | np.ndarray, net: Optional[ReaderNet] = None,
         batch_size: int = 256) -> list[Attributes]:
    """Attributes of each uint8 (32, 32, 3) picture."""
    net = net if net is not None else load_reader()
    images = np.asarray(images)
    out: list[Attributes] = []
    for start in range(0, len(images), batch_size):
        out.extend(decode(*net(to_tensor(images[start:start + batch_size]))))
    return out
