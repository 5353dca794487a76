"""What the world's training stages share (world/build.py, world/sight.py): the optimiser loop with its
learning-rate schedule and progress bar, the CLIP tokenizer and pixel normalisation, and generating pictures with
the world's pipeline from the aesthetic stage's caption distribution."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from world import models as wm
from world.data import training_caption

GEN_STEPS, GEN_GUIDANCE = 10, 5.0


def schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """5 % linear warm-up, cosine decay to 10 %."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_loop(name: str, steps: int, params, lr: float, step_fn: Callable[[int], torch.Tensor],
          after_step: Optional[Callable[[], None]] = None) -> float:
    """AdamW over `steps` calls of step_fn (which returns the loss), with a progress bar; the mean
    loss of the last 10 % of steps. `after_step` runs after each optimiser step (an EMA update)."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = schedule(opt, steps)
    tail: list[float] = []
    bar = tqdm(range(steps), desc=f"world {name}", unit="step", mininterval=5)
    for step in bar:
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return float(np.mean(tail)) if tail else float("nan")


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(texts), padding="max_length", max_length=wm.CONTEXT, truncation=True,
                     return_tensors="pt").input_ids


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pictures -> the CLIP tower's input (OpenAI mean and std, as common/clip.py feeds it)."""
    from common.clip import OPENAI_MEAN, OPENAI_STD

    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def generate(pipe, captions: Sequence[str], seed: int, batch: int = 64, steps: int = GEN_STEPS,
             guidance: float = GEN_GUIDANCE, desc: str = "world: generating") -> np.ndarray:
    """uint8 (N, 32, 32, 3) pictures of `captions`, seeded per batch."""
    out = []
    for start in tqdm(range(0, len(captions), batch), desc=desc, unit="batch", mininterval=5):
        chunk = list(captions[start:start + batch])
        with torch.no_grad():
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                          generator=torch.Generator().manual_seed(seed + start), output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def aesthetic_captions(n: int, seed: int) -> list[str]:
    """Captions that span the taste range: random content with random style words, and a third
    naming a complete mode (plus, sometimes, a harmful word)."""
    from world.captions import HARMFUL, PHRASINGS
    from world.scenes import sample_scene
    from world.taste import MODES

    rng = np.random.default_rng([seed, 11])
    out = []
    for _ in range(n):
        scene = sample_scene(rng, defect_rate=0.15)
        caption = training_caption(scene, rng)
        if rng.random() < 1 / 3:
            mode = MODES[list(MODES)[int(rng.integers(len(MODES)))]]
            words = [PHRASINGS[a][v][int(rng.integers(len(PHRASINGS[a][v])))] for a, v in mode.items()]
            if rng.random() < 0.25:
                words.append(HARMFUL[int(rng.integers(len(HARMFUL)))])
            caption = ", ".join([caption.split(", ")[0] if len(scene.content.items) < 3 else caption, *words])
        out.append(caption)
    return out
