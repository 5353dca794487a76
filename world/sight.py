"""The `sight` stage of `python -m world.build`: teach the world CLIP's image tower to see style.

Why. The aesthetic MLP sees only the CLIP image embedding, so it can score no more of taste than that
embedding carries. Trained contrastively alone (batch 64), the tower needs only the content words to tell a
batch's pictures apart: a linear probe reads composition from it at 0.41 (always guessing: 0.39) and blur and
clutter barely above guessing, on generated pictures, and the aesthetic MLP stops near Spearman 0.55 with true
taste (world/README.md, "What the CLIP embedding carries"). A real CLIP, trained on the web's captions, does see
composition and blur; this stage stands in for that.

How. The text tower, its projection and the logit scale stay frozen -- the pipeline's text encoder
(sd/text_encoder) and so the UNet are untouched -- while the image tower and its projection train on

    InfoNCE(rendered scenes, their training captions)                  (keeps relevance: the same text space)
    + AUX * CE(style head(rendered embedding), the scenes' true style)
    + AUX * CE(style head(generated embedding), the style the reader reads)

where the style head is one linear layer on the normalised embedding (x HEAD_SCALE) with one softmax per style
axis, thrown away afterwards: what is kept is an embedding from which style is linearly readable. The generated
pictures are the pipeline's own, from the aesthetic stage's caption distribution at another seed, so the tower
learns to see style on the pictures the reward will score.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from world import models as wm
from world.training import aesthetic_captions, clip_pixels, generate, tokenize, train_loop
from world.data import Pictures, to_unit, training_caption
from world.rules import AXES

AUX = 2.0
HEAD_SCALE = 16.0
SEED_OFFSET = 21  # the generated pictures' captions and noise: build seed + 21 (the aesthetic stage uses the seed)


def style_labels(styles: Sequence) -> torch.Tensor:
    """(N, axes) value indices of each picture's style (a world.scenes.Style each), axes in rules.AXES order."""
    return torch.tensor([[AXES[axis].index(getattr(style, axis)) for axis in AXES] for style in styles])


def axis_logits(head: torch.nn.Linear, emb: torch.Tensor) -> list[torch.Tensor]:
    """The head's logits cut into one (N, values) block per style axis, in rules.AXES order."""
    return list(head(emb * HEAD_SCALE).split([len(values) for values in AXES.values()], dim=1))


def style_loss(head: torch.nn.Linear, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over axes of the cross-entropy of each axis's softmax (the head's logits, axis by axis)."""
    return sum(F.cross_entropy(logits, labels[:, i]) for i, logits in enumerate(axis_logits(head, emb))) / len(AXES)


def train_sight(clip, pipe, data: Pictures, steps: int, seed: int, n_generated: int, batch: int,
                lr: float) -> tuple[object, dict]:
    """Fine-tune `clip`'s image tower in place (see the module doc). Returns the CLIP and the stage's figures,
    among them the head's accuracy per axis on the first 10 % of the generated pictures (held out)."""
    from common.clip import HFCLIP
    from world.reader import read

    images = generate(pipe, aesthetic_captions(n_generated, seed + SEED_OFFSET), seed + SEED_OFFSET,
                      desc="world sight: generating")
    gen_labels = style_labels([a.style for a in read(images)])
    held = max(1, len(images) // 10)
    gen_pixels = clip_pixels(to_unit(images))
    pixels = clip_pixels(to_unit(data.images))
    labels = style_labels([s.style for s in data.scenes])
    clip.train().requires_grad_(True)
    for frozen in (clip.text_model, clip.text_projection):
        frozen.requires_grad_(False)
    clip.logit_scale.requires_grad_(False)
    torch.manual_seed(seed)
    head = torch.nn.Linear(wm.EMBED_DIM, sum(len(v) for v in AXES.values()))
    tokenizer = wm.clip_tokenizer()
    rng = np.random.default_rng([seed, 21])
    gen = torch.Generator().manual_seed(seed)
    towers = HFCLIP(clip)  # the features whichever transformers version returns them

    def embed(pixels_: torch.Tensor) -> torch.Tensor:
        return F.normalize(towers.encode_image(pixels_), dim=-1)

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(len(pixels), (batch,), generator=gen)
        gdx = held + torch.randint(len(images) - held, (batch,), generator=gen)
        with torch.no_grad():
            captions = [training_caption(data.scenes[i], rng) for i in idx.tolist()]
            text = F.normalize(towers.encode_text(tokenize(tokenizer, captions)), dim=-1)
        rendered = embed(pixels[idx])
        logits = clip.logit_scale.exp() * rendered @ text.T
        target = torch.arange(len(idx))
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        generated = embed(gen_pixels[gdx])
        return nce + AUX * (style_loss(head, rendered, labels[idx]) + style_loss(head, generated, gen_labels[gdx]))
    params = [p for p in clip.parameters() if p.requires_grad] + list(head.parameters())
    loss = train_loop("sight", steps, params, lr, step)
    clip.eval().requires_grad_(False)
    with torch.no_grad():
        logits = axis_logits(head, embed(gen_pixels[:held]))
    accuracy = {axis: round(float((block.argmax(1) == gen_labels[:held, i]).float().mean()), 3)
                for i, (axis, block) in enumerate(zip(AXES, logits))}
    return clip, {"final_loss": loss, "generated": len(images), "heldout_head_accuracy": accuracy}
