"""Training and measuring the attribute reader: `python -m world.reader_train` (seeded, minutes on
2 CPU cores) writes world/assets/reader.safetensors and its MANIFEST.json entry;
`python -m world.reader_train --eval 2000` prints per-attribute accuracy of the shipped weights.

Data: freshly rendered scenes (`sample_scene`, defects on 25 % of the time each), with
augmentations that imitate imperfect generated pictures -- mild softening, pixel noise, small
brightness shifts, horizontal mirroring (targets mirrored too) -- kept well below the "blurry" and
"grain" styles so those stay recognisable.

Accuracy per attribute (`evaluate`): count = exactly the right number of objects; shape, size and
colour = per true object, counted wrong when no detection lies within MATCH_PX of it (colour only on
non-monochrome pictures); relation = on 2-object scenes, the relation between the two matched
detections; each style axis = the right value.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from itertools import permutations
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from world.reader import (ASSETS, CELL, GRID, WEIGHTS, Attributes, ReaderNet, read, split_cells,
                          split_style, to_tensor)
from world.rules import AXES, COLOURS, SHAPES, SIZES
from world.scenes import Scene, relation_of, render, sample_scene

MATCH_PX = 3.5
IGNORE = -100
IGNORE_OBJECT = -1.0
NEAR_PX = 4.0  # cells whose centre is this close to an object's centre also read that object
POS_WEIGHT = 4.0  # an object's centre cell is rare (2 of 64 cells): weigh it up
CLASS_WEIGHT = {"shape": 2.0, "colour": 1.0, "size": 1.0}  # shape is the hardest read at 8 px
TRAIN_DEFECT_RATE = 0.25
MANIFEST = ASSETS / "MANIFEST.json"


def targets(scene: Scene) -> dict[str, np.ndarray]:
    """Training targets of one scene.

    `object` is 1 in the cell holding an object's centre, IGNORE_OBJECT in the other cells whose
    centre lies within NEAR_PX of it (a centre near a cell border is fairly claimed by both), 0
    elsewhere. Shape, colour, size and offset (the object centre in cell units, relative to the
    cell's corner) are taught in all those cells, so whichever of them fires reads the object right."""
    obj = np.zeros((GRID, GRID), np.float32)
    cls = {k: np.full((GRID, GRID), IGNORE, np.int64) for k in ("shape", "colour", "size")}
    offset = np.zeros((2, GRID, GRID), np.float32)
    mono = scene.style.palette == "monochrome"
    centres = (np.arange(GRID) + 0.5) * CELL
    for item, (x, y) in zip(scene.content.items, scene.positions):
        gx, gy = min(int(x // CELL), GRID - 1), min(int(y // CELL), GRID - 1)
        near = np.hypot(centres[None, :] - x, centres[:, None] - y) <= NEAR_PX  # (gy, gx)
        near[gy, gx] = True
        obj[near & (obj == 0)] = IGNORE_OBJECT
        obj[gy, gx] = 1.0
        cls["shape"][near] = SHAPES.index(item.shape)
        cls["size"][near] = SIZES.index(item.size)
        cls["colour"][near] = IGNORE if mono else COLOURS.index(item.colour)
        offset[0][near] = (x / CELL - np.arange(GRID))[None, :].repeat(GRID, 0)[near]
        offset[1][near] = (y / CELL - np.arange(GRID))[:, None].repeat(GRID, 1)[near]
    style = np.array([AXES[a].index(v) for a, v in scene.style.as_dict().items()], np.int64)
    return {"object": obj, **cls, "offset": offset, "style": style}


def make_data(n: int, seed: int, defect_rate: float = TRAIN_DEFECT_RATE) -> tuple[torch.Tensor, dict]:
    """n rendered scenes: images (n, 3, 32, 32) float and stacked targets."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, defect_rate) for _ in range(n)]
    images = to_tensor(np.stack([render(s) for s in scenes]))
    per = [targets(s) for s in scenes]
    return images, {k: torch.from_numpy(np.stack([t[k] for t in per])) for k in per[0]}


def augment(x: torch.Tensor, t: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Mirror half the batch (targets too), soften, add noise and shift brightness, mildly."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    t = dict(t)
    for k in ("object", "shape", "colour", "size"):
        t[k] = torch.where(flip[:, None, None], t[k].flip(2), t[k])
    off = torch.where(flip[:, None, None, None], t["offset"].flip(3), t["offset"])
    off_x = torch.where(flip[:, None, None], 1.0 - off[:, 0], off[:, 0])  # x -> 32 - x, cell gx -> 7 - gx
    t["offset"] = torch.stack([off_x, off[:, 1]], dim=1)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    soft = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    mix = torch.rand(b, 1, 1, 1, generator=gen) * 0.35
    x = x * (1 - mix) + soft * mix
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.02
    x = x + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.03
    return x.clamp(0, 1), t


def loss_fn(cells: torch.Tensor, style: torch.Tensor, t: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Objectness BCE everywhere; class and offset losses only where an object's centre lies."""
    parts = split_cells(cells)
    obj = t["object"]
    weight = (obj >= 0).float() * (1 + (POS_WEIGHT - 1) * obj.clamp(min=0))
    terms = {"object": F.binary_cross_entropy_with_logits(parts["object"][:, 0], obj.clamp(min=0), weight)}
    for k in ("shape", "colour", "size"):
        target = t[k]
        terms[k] = CLASS_WEIGHT[k] * F.cross_entropy(parts[k], target, ignore_index=IGNORE) \
            if (target != IGNORE).any() else parts[k].sum() * 0.0
    mask = (t["size"] != IGNORE)[:, None].expand_as(t["offset"])
    terms["offset"] = F.smooth_l1_loss(parts["offset"][mask], t["offset"][mask], beta=0.25) if mask.any() \
        else parts["offset"].sum() * 0.0
    for i, (axis, logits) in enumerate(split_style(style).items()):
        terms[axis] = F.cross_entropy(logits, t["style"][:, i])
    total = sum(terms.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"reader loss is not finite: { {k: float(v) for k, v in terms.items()} }")
    return total, {k: float(v.detach()) for k, v in terms.items()}


def train(n_scenes: int = 20000, steps: int = 2000, batch: int = 128, seed: int = 0,
          lr: float = 3e-3, log_every: int = 250) -> ReaderNet:
    """A reader trained from scratch; deterministic for a seed (single-threaded data, seeded torch)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0, c0 = time.time(), time.process_time()
    images, tgt = make_data(n_scenes, seed)
    print(f"rendered {n_scenes} scenes in {time.time() - t0:.0f} s", flush=True)
    net = ReaderNet().to(memory_format=torch.channels_last)  # ~25 % faster convolutions on CPU
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_scenes, (batch,), generator=gen)
        x, t = augment(images[idx], {k: v[idx] for k, v in tgt.items()}, gen)
        loss, terms = loss_fn(*net(x.contiguous(memory_format=torch.channels_last)), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.3f} " + " ".join(
                f"{k}={v:.3f}" for k, v in terms.items() if v > 0.02)
                + f" ({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s cpu)", flush=True)
    return net.eval()


def _match(truth: Sequence[tuple[float, float]], seen: Attributes) -> list[int | None]:
    """For each true centre, the index of its detection (None if none within MATCH_PX); the
    assignment with the smallest total distance (<= 3 objects: brute force)."""
    objs = seen.objects
    best, best_cost = [None] * len(truth), float("inf")
    for perm in permutations(range(len(objs)), min(len(objs), len(truth))):
        pairs = list(zip(range(len(truth)), perm))
        dist = [np.hypot(truth[i][0] - objs[j].x, truth[i][1] - objs[j].y) for i, j in pairs]
        cost = sum(min(d, MATCH_PX) for d in dist)
        if cost < best_cost:
            best_cost = cost
            best = [None] * len(truth)
            for (i, j), d in zip(pairs, dist):
                best[i] = j if d <= MATCH_PX else None
    return best


def score_one(scene: Scene, seen: Attributes) -> dict[str, list[bool]]:
    """Right/wrong per attribute for one picture (see the module docstring)."""
    out: dict[str, list[bool]] = {"count": [seen.count == len(scene.content.items)]}
    match = _match(scene.positions, seen)
    for k in ("shape", "size", "colour"):
        out[k] = []
    for item, j in zip(scene.content.items, match):
        obj = seen.objects[j] if j is not None else None
        out["shape"].append(obj is not None and obj.shape == item.shape)
        out["size"].append(obj is not None and obj.size == item.size)
        if scene.style.palette != "monochrome":
            out["colour"].append(obj is not None and obj.colour == item.colour)
    if scene.content.relation is not None:
        a, b = match
        ok = a is not None and b is not None and relation_of(
            (seen.objects[a].x, seen.objects[a].y), (seen.objects[b].x, seen.objects[b].y)) == scene.content.relation
        out["relation"] = [ok]
    for axis, value in scene.style.as_dict().items():
        out[axis] = [getattr(seen.style, axis) == value]
    return out


def evaluate(scenes: Sequence[Scene], net: ReaderNet | None = None) -> dict[str, float]:
    """Accuracy per attribute of the reader on the pictures of `scenes`."""
    seen = read(np.stack([render(s) for s in scenes]), net)
    tally: dict[str, list[bool]] = {}
    for scene, attrs in zip(scenes, seen):
        for k, v in score_one(scene, attrs).items():
            tally.setdefault(k, []).extend(v)
    return {k: float(np.mean(v)) for k, v in tally.items() if v}


def save(net: ReaderNet, path: Path, command: str, seed: int) -> str:
    """Weights as float16 safetensors (half the bytes; accuracy unchanged) and an entry in the
    MANIFEST.json beside them: the file's sha256, the command that made it, the seed. Returns the sha256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()
               if v.is_floating_point()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path = path.parent / MANIFEST.name  # beside the weights
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[path.name] = {"sha256": digest, "bytes": path.stat().st_size, "command": command, "seed": seed,
                           "what": "world attribute reader (world/reader.py ReaderNet), float16"}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return digest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m world.reader_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=20000, help="rendered training scenes")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps of 128 pictures")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="only measure the weights at --out on N fresh scenes (seed 12345)")
    p.add_argument("--defect-rate", type=float, default=0.2, help="for --eval: defects' probability each")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # on a shared 2-core machine a second thread mostly spins
    if args.eval:
        from world.reader import load_reader
        rng = np.random.default_rng(12345)
        acc = evaluate([sample_scene(rng, args.defect_rate) for _ in range(args.eval)], load_reader(args.out))
        print(json.dumps({k: round(v, 4) for k, v in acc.items()}, indent=1))
        return 0 if min(acc.values()) >= 0.95 else 1
    t0 = time.time()
    net = train(args.scenes, args.steps, seed=args.seed)
    command = "python -m world.reader_train " + " ".join(sys.argv[1:] if argv is None else argv)
    digest = save(net, args.out, command.strip(), args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest[:12]}…) in {time.time() - t0:.0f} s")
    rng = np.random.default_rng(12345)
    print(json.dumps({k: round(v, 4) for k, v in evaluate([sample_scene(rng, 0.2) for _ in range(500)], net).items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
