"""Quality gates of the miniature world's trained models; prints one JSON object.

    python bench/world.py [--assets DIR] [--n N] [--seed S] [--grid PATH] [--threads T]

Everything is measured on held-out content (the plain captions of
world/assets/prompts/world_heldout.txt, never a training caption) with seeds apart from training's:

1. `vae`          PSNR (dB) of encode -> posterior mean -> decode on N fresh renders; report only, with
                  the reader's accuracy on the reconstructions beside its accuracy on the originals.
2. `clip`         image -> text top-1 retrieval within groups of 32 held-out scenes and their full
                  captions (every style value named); gate >= 0.8. Plain captions: info.
3. `faithfulness` N generated pictures of held-out captions naming 1-3 random style axes, read back
                  by the attribute reader: count, shape, size, colour, relation and the named style
                  values; gate: their mean accuracy >= 0.8.
4. `style_words`  for every style value (the defects' "on" values too), k pictures of held-out
                  captions with its first phrasing appended, read as that value; gate: each >= 0.8.
5. `aesthetic`    the MLP on CLIP embeddings of N generated pictures vs 10 x the true taste the reader
                  sees; gate: Spearman >= 0.8.
6. `grid`         a PNG (docs/world/generated.png) of held-out captions, plain and with each taste
                  mode's phrasings, a few seeds each, 4x enlarged, captions beside.

A failing gate is reported in the JSON ("all_pass": false), not by the exit code.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from itertools import permutations
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ heads sys.path and this file would shadow the `world` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.clip import HFCLIP  # noqa: E402
from world import build as wb  # noqa: E402
from world import models as wm  # noqa: E402
from world.captions import PHRASINGS, parse_content, plain_caption  # noqa: E402
from world.data import DEFECT_RATE, full_caption, pictures, to_unit, training_caption  # noqa: E402
from world.reader import Attributes, read  # noqa: E402
from world.rules import AXES  # noqa: E402
from world.scenes import Content, make_scene, relation_of, sample_style  # noqa: E402

THRESHOLDS = {"clip_top1": 0.8, "faithfulness": 0.8, "style_words": 0.8, "aesthetic_spearman": 0.8}
GROUP = 32  # captions a picture is retrieved among
HELDOUT = Path("prompts") / "world_heldout.txt"
DEFAULT_SEED = 12345  # training uses seed 0
DEFAULT_GRID = ROOT / "docs" / "world" / "generated.png"
GRID_SEEDS, GRID_TILE, GRID_LABEL = 6, 128, 300
CONTENT_KEYS = ("count", "shape", "size", "colour", "relation")


def heldout_captions(assets: Path) -> list[str]:
    """The held-out plain captions: under `assets` if it has them, else the shipped ones."""
    path = assets / HELDOUT if (assets / HELDOUT).is_file() else wm.ASSETS / HELDOUT
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no captions; write it with `python -m world.corpus`")
    return lines


def _draw(captions: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """n captions, without replacement while they last."""
    order = np.concatenate([rng.permutation(len(captions)) for _ in range(math.ceil(n / len(captions)))])
    return [captions[i] for i in order[:n]]


def _finite(x: float) -> Optional[float]:
    return round(float(x), 4) if x is not None and math.isfinite(float(x)) else None


# ---------------------------------------------------------------- 1. VAE

def vae_figure(vae, n: int, seed: int) -> dict:
    """PSNR of reconstructions of n fresh renders, and the reader's accuracy on both."""
    from world.reader_train import score_one

    data = pictures(n, seed, desc="bench: rendering")
    x = to_unit(data.images) * 2 - 1
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample.clamp(-1, 1)
                           for i in range(0, n, 64)])
    mse = ((recon - x) / 2).pow(2).mean((1, 2, 3)).clamp_min(1e-10)  # on the [0, 1] scale
    psnr = 10 * torch.log10(1 / mse)
    recon_u8 = ((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

    def accuracy(images: np.ndarray) -> dict[str, float]:
        tally: dict[str, list[bool]] = {}
        for scene, seen in zip(data.scenes, read(images)):
            for key, ok in score_one(scene, seen).items():
                tally.setdefault(key, []).extend(ok)
        return {k: float(np.mean(v)) for k, v in tally.items() if v}
    recon_acc, orig_acc = accuracy(recon_u8), accuracy(data.images)
    return {"n": n, "psnr_db": _finite(psnr.mean()), "psnr_db_p10": _finite(psnr.quantile(0.1)),
            "reader_accuracy_reconstructed": _finite(np.mean(list(recon_acc.values()))),
            "reader_accuracy_original": _finite(np.mean(list(orig_acc.values()))),
            "reader_by_attribute_reconstructed": {k: _finite(v) for k, v in recon_acc.items()}}


# ---------------------------------------------------------------- 2. CLIP

def _text_features(clip, texts: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        out = HFCLIP(clip).encode_text(wb.tokenize(wm.clip_tokenizer(), texts))
    return F.normalize(out, dim=-1)


def clip_figure(clip, captions: Sequence[str], n: int, seed: int) -> dict:
    """Image -> text top-1 accuracy within groups of GROUP held-out scenes (full and plain captions)."""
    from world.scenes import render

    rng = np.random.default_rng([seed, 2])
    groups = max(1, n // GROUP)
    hits: dict[str, list[float]] = {"full": [], "plain": [], "full_text_to_image": []}
    for _ in range(groups):
        chosen = [captions[i] for i in rng.choice(len(captions), min(GROUP, len(captions)), replace=False)]
        scenes = [make_scene(parse_content(c), sample_style(rng, defect_rate=DEFECT_RATE), rng) for c in chosen]
        image = wb.embed_images(clip, np.stack([render(s) for s in scenes]))
        target = torch.arange(len(scenes))
        for key, texts in (("full", [full_caption(s) for s in scenes]), ("plain", [plain_caption(s) for s in scenes])):
            sims = image @ _text_features(clip, texts).T
            hits[key].append(float((sims.argmax(1) == target).float().mean()))
            if key == "full":
                hits["full_text_to_image"].append(float((sims.argmax(0) == target).float().mean()))
    return {"groups": groups, "group_size": len(chosen), "top1_full": _finite(np.mean(hits["full"])),
            "top1_plain": _finite(np.mean(hits["plain"])),
            "text_to_image_top1_full": _finite(np.mean(hits["full_text_to_image"]))}


# ---------------------------------------------------------------- 3. faithfulness

def match_content(content: Content, seen: Attributes) -> dict[str, list[bool]]:
    """Right/wrong per content attribute of a generated picture, whose true positions are unknown:
    the caption's objects are paired with the detections that agree with them most (brute force over
    <= 3 objects); colour is skipped when the picture is monochrome, relation scored on 2 objects."""
    items, objs = content.items, seen.objects
    slots = list(range(len(objs))) + [None] * len(items)
    best, best_score = None, -1.0
    for perm in dict.fromkeys(permutations(slots, len(items))):  # unique, in order
        agree = sum(j is not None and (objs[j].shape == it.shape) + (objs[j].size == it.size)
                    + (objs[j].colour == it.colour) for it, j in zip(items, perm))
        rel = content.relation is not None and None not in perm and relation_of(
            (objs[perm[0]].x, objs[perm[0]].y), (objs[perm[1]].x, objs[perm[1]].y)) == content.relation
        if agree + 0.5 * rel > best_score:
            best, best_score = (perm, rel), agree + 0.5 * rel
    perm, rel = best
    pick = [objs[j] if j is not None else None for j in perm]
    out = {"count": [seen.count == len(items)],
           "shape": [o is not None and o.shape == it.shape for it, o in zip(items, pick)],
           "size": [o is not None and o.size == it.size for it, o in zip(items, pick)],
           "colour": [] if seen.style.palette == "monochrome" else
           [o is not None and o.colour == it.colour for it, o in zip(items, pick)]}
    if content.relation is not None:
        out["relation"] = [bool(rel)]
    return out


def faithful_captions(captions: Sequence[str], n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """n held-out plain captions, each with 1-3 random axes named by a random phrasing of a random value."""
    out = []
    for caption in _draw(captions, n, rng):
        axes = rng.choice(list(AXES), int(rng.integers(1, 4)), replace=False)
        named = {str(a): str(rng.choice(AXES[a])) for a in axes}
        words = [str(rng.choice(PHRASINGS[a][v])) for a, v in named.items()]
        out.append((", ".join([caption, *words]), named))
    return out


def faithfulness_figure(pipe, captions: Sequence[str], n: int, seed: int, clip=None) -> dict:
    """Content and named-style accuracy of generated pictures, read back by the reader; with `clip`, also
    the cosine between each picture and its plain caption, as the `clip` relevance scorer measures it (its
    10th percentile is where preset mini puts reward.clip_threshold, as 0.28 sits for real CLIP)."""
    asked = faithful_captions(captions, n, np.random.default_rng([seed, 3]))
    images = wb.generate(pipe, [c for c, _ in asked], seed + 3000, desc="bench: faithfulness")
    tally: dict[str, list[bool]] = {k: [] for k in CONTENT_KEYS}
    by_axis: dict[str, list[bool]] = {a: [] for a in AXES}
    for (caption, named), seen in zip(asked, read(images)):
        for key, ok in match_content(parse_content(caption), seen).items():
            tally[key].extend(ok)
        for axis, value in named.items():
            by_axis[axis].append(getattr(seen.style, axis) == value)
    acc = {k: float(np.mean(v)) for k, v in tally.items() if v}
    acc["named_style"] = float(np.mean([ok for v in by_axis.values() for ok in v]))
    out = {"n": len(asked), "attribute_accuracy": _finite(np.mean(list(acc.values()))),
           "by_attribute": {k: _finite(v) for k, v in acc.items()},
           "named_style_by_axis": {a: _finite(np.mean(v)) for a, v in by_axis.items() if v}}
    if clip is not None:
        plain = [plain_caption(parse_content(caption)) for caption, _ in asked]
        cos = (wb.embed_images(clip, images) * _text_features(clip, plain)).sum(-1).numpy()
        out["relevance_cosine"] = {"p10": _finite(np.percentile(cos, 10)), "p50": _finite(np.percentile(cos, 50))}
    return out


# ---------------------------------------------------------------- 4. style words

def style_words_figure(pipe, captions: Sequence[str], n: int, seed: int) -> dict:
    """For each style value, the fraction of k pictures (k = n / values) read as that value."""
    values = [(axis, value) for axis, vals in AXES.items() for value in vals]
    k = max(1, math.ceil(n / len(values)))
    rng = np.random.default_rng([seed, 4])
    asked = [(axis, value, f"{c}, {PHRASINGS[axis][value][0]}")
             for axis, value in values for c in _draw(captions, k, rng)]
    images = wb.generate(pipe, [c for _, _, c in asked], seed + 4000, desc="bench: style words")
    hits: dict[str, list[bool]] = {}
    for (axis, value, _), seen in zip(asked, read(images)):
        hits.setdefault(f"{axis}={value}", []).append(getattr(seen.style, axis) == value)
    table = {key: float(np.mean(v)) for key, v in hits.items()}
    worst = min(table, key=table.get)
    return {"k": k, "by_value": {key: _finite(v) for key, v in table.items()},
            "worst": {"value": worst, "accuracy": _finite(table[worst])},
            "values_below_threshold": sorted(key for key, v in table.items() if v < THRESHOLDS["style_words"])}


# ---------------------------------------------------------------- 5. aesthetic

def taste_captions(captions: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """As world.build.aesthetic_captions, on held-out content: a training-style caption (random style
    words, defects named), or for a third the plain caption with a complete mode (and, a quarter of
    those, a harmful word)."""
    from world.captions import HARMFUL
    from world.taste import MODES

    out = []
    for caption in _draw(captions, n, rng):
        scene = make_scene(parse_content(caption), sample_style(rng, defect_rate=0.15), rng)
        text = training_caption(scene, rng)
        if rng.random() < 1 / 3:
            mode = MODES[list(MODES)[int(rng.integers(len(MODES)))]]
            words = [str(rng.choice(PHRASINGS[a][v])) for a, v in mode.items()]
            if rng.random() < 0.25:
                words.append(str(rng.choice(HARMFUL)))
            text = ", ".join([caption, *words])
        out.append(text)
    return out


def load_aesthetic(assets: Path):
    from common.clip import load_aesthetic as load

    return load(assets / "aesthetic.safetensors")


def aesthetic_figure(pipe, clip, mlp, captions: Sequence[str], n: int, seed: int) -> dict:
    """Spearman of the MLP's scores vs 10 x the true taste of n generated held-out pictures."""
    texts = taste_captions(captions, n, np.random.default_rng([seed, 5]))
    images = wb.generate(pipe, texts, seed + 5000, desc="bench: aesthetic")
    truth = wb.true_taste(images) * 10.0
    with torch.no_grad():
        pred = mlp(wb.embed_images(clip, images)).numpy()
    rho = wb.spearman(pred, truth) if np.ptp(truth) > 0 and np.ptp(pred) > 0 else float("nan")
    return {"n": len(texts), "spearman": _finite(rho), "taste_mean": _finite(truth.mean() / 10),
            "mae": _finite(np.abs(pred - truth).mean())}


# ---------------------------------------------------------------- 6. the picture grid

def grid_rows(captions: Sequence[str], seed: int) -> list[str]:
    """Captions of the grid's rows: one held-out caption of 1, 2 and 3 objects, each plain and then
    with every taste mode's first phrasings."""
    from world.taste import MODES

    rng = np.random.default_rng([seed, 6])
    picked = []
    for count in (1, 2, 3):
        pool = [c for c in captions if len(parse_content(c).items) == count] or list(captions)
        picked.append(pool[int(rng.integers(len(pool)))])
    return [text for c in picked for text in
            [c, *(", ".join([c, *(PHRASINGS[a][v][0] for a, v in mode.items())]) for mode in MODES.values())]]


def grid_figure(pipe, captions: Sequence[str], seed: int, path: Path) -> dict:
    """Generate GRID_SEEDS pictures per row and draw them, 4x enlarged, with the caption beside."""
    from PIL import Image, ImageDraw, ImageFont

    rows = grid_rows(captions, seed)
    images = wb.generate(pipe, [r for r in rows for _ in range(GRID_SEEDS)], seed + 6000, desc="bench: grid")
    tastes = wb.true_taste(images).reshape(len(rows), GRID_SEEDS)
    width, height = GRID_LABEL + GRID_SEEDS * (GRID_TILE + 4), len(rows) * (GRID_TILE + 4)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        font = ImageFont.load_default()
    for r, text in enumerate(rows):
        y = r * (GRID_TILE + 4)
        label = "\n".join(textwrap.wrap(text, 40)) + f"\n\ntaste read: {' '.join(f'{t:.2f}' for t in tastes[r])}"
        draw.multiline_text((6, y + 6), label, fill="black", font=font, spacing=3)
        for c in range(GRID_SEEDS):
            tile = Image.fromarray(images[r * GRID_SEEDS + c]).resize((GRID_TILE, GRID_TILE), Image.NEAREST)
            sheet.paste(tile, (GRID_LABEL + c * (GRID_TILE + 4), y + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return {"path": str(path), "rows": len(rows), "columns": GRID_SEEDS, "scale": GRID_TILE // 32}


# ---------------------------------------------------------------- gates and the command line

def gates(figures: dict) -> dict:
    """Each gate's value, threshold and pass (a missing or undefined value fails)."""
    values = {"clip_top1": figures["clip"]["top1_full"],
              "faithfulness": figures["faithfulness"]["attribute_accuracy"],
              "style_words": figures["style_words"]["worst"]["accuracy"],
              "aesthetic_spearman": figures["aesthetic"]["spearman"]}
    return {k: {"value": v, "threshold": THRESHOLDS[k], "pass": v is not None and v >= THRESHOLDS[k]}
            for k, v in values.items()}


def run(assets: Path, n: int, seed: int, grid: Optional[Path]) -> dict:
    """Every figure and gate on the models under `assets`."""
    started = time.time()
    captions = heldout_captions(assets)
    clip, pipe = wb.load_clip(assets), wb.load_pipeline(assets)
    figures: dict = {"vae": vae_figure(wb.load_vae(assets), n, seed)}
    figures["clip"] = clip_figure(clip, captions, n, seed)
    figures["faithfulness"] = faithfulness_figure(pipe, captions, n, seed, clip)
    figures["style_words"] = style_words_figure(pipe, captions, n, seed)
    figures["aesthetic"] = aesthetic_figure(pipe, clip, load_aesthetic(assets), captions, n, seed)
    if grid is not None:
        figures["grid"] = grid_figure(pipe, captions, seed, grid)
    checked = gates(figures)
    return {"assets": str(assets), "n": n, "seed": seed, "figures": figures, "gates": checked,
            "all_pass": all(g["pass"] for g in checked.values()), "seconds": round(time.time() - started, 1)}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python bench/world.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", type=Path, default=wm.ASSETS, help="the world build to measure (default world/assets)")
    ap.add_argument("--n", type=int, default=256, help="pictures per figure (default 256)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed, apart from training's (default {DEFAULT_SEED})")
    ap.add_argument("--grid", default=str(DEFAULT_GRID), help="where the picture grid goes ('' for none)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    torch.set_num_threads(args.threads)
    report = run(args.assets, args.n, args.seed, Path(args.grid) if args.grid else None)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
