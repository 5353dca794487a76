"""`python -m world.build` (or `pag world build`): train the miniature world's models from seeds and
ship them under world/assets/ with their MANIFEST.json entries.

Stages, each seeded and resumable on its own (`--only vae,clip`):

1. `vae`       AutoencoderKL on rendered scenes: MSE + a local high-frequency energy match (so grain
               and stripes survive the 4x reduction) + a tiny KL; the latent scale is measured after.
2. `clip`      CLIPModel, contrastive (symmetric InfoNCE) on rendered scenes and training captions.
3. `unet`      UNet2DConditionModel, epsilon-prediction on VAE latents (SD v1.4's noise schedule),
               conditioned on the frozen CLIP text tower, 10 % caption dropout for guidance.
4. `sight`     the CLIP image tower again, text tower frozen: contrastive as before plus a style head on
               rendered scenes and on generated pictures, so that style is readable from the embedding
               the aesthetic MLP sees (world/sight.py).
5. `aesthetic` the LAION MLP, its commented-out ReLUs switched on, on CLIP image embeddings of *generated*
               pictures, regressing 10 x the hidden taste the attribute reader sees (world/taste.py).

Every stage writes its weights as soon as it finishes; the pipeline directory (sd/) is assembled
from the VAE, the text tower and the UNet with SD v1.4's DPM-Solver++ scheduler.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from world import models as wm
from world.data import Pictures, pictures, to_unit, training_caption
from world.training import aesthetic_captions, clip_pixels, generate, tokenize, train_loop  # noqa: F401 (bench/)
from world.weights import MANIFEST, load_clip, load_pipeline, load_vae, pipeline, record, save_stage, text_tower  # noqa: F401

STAGES = ("vae", "clip", "unet", "sight", "aesthetic")
STEPS = {"vae": 3000, "clip": 1500, "unet": 4000, "sight": 5000, "aesthetic": 1500}
BATCH = {"vae": 32, "clip": 64, "unet": 64, "sight": 64, "aesthetic": 128}
LR = {"vae": 1e-3, "clip": 5e-4, "unet": 4e-4, "sight": 5e-4, "aesthetic": 1e-3}
N_PICTURES = 24000
CAPTION_DROPOUT = 0.1
HF_WEIGHT = 0.5
KL_WEIGHT = 1e-6
GENERATED = 6000  # pictures generated for the aesthetic stage (10 % held out; world/README.md says why 6,000)
SIGHT_GENERATED = 6000  # and for the sight stage
EMA_DECAY = 0.999


def _high_frequency(x: torch.Tensor) -> torch.Tensor:
    """Local energy of the Laplacian, pooled over 4-px cells: what grain and stripes add."""
    kernel = torch.tensor([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=x.dtype, device=x.device)
    lap = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), kernel.view(1, 1, 3, 3), padding=1)
    return F.avg_pool2d(lap.abs(), 4).view(x.shape[0], -1)


def train_vae(data: Pictures, steps: int, seed: int):
    vae = wm.new_vae(seed).train()
    images = to_unit(data.images) * 2 - 1
    gen = torch.Generator().manual_seed(seed)

    def step(_: int) -> torch.Tensor:
        x = images[torch.randint(len(images), (BATCH["vae"],), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        hf = F.l1_loss(_high_frequency(recon), _high_frequency(x))
        return F.mse_loss(recon, x) + HF_WEIGHT * hf + KL_WEIGHT * posterior.kl().mean()
    loss = train_loop("vae", steps, vae.parameters(), LR["vae"], step)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.sample(generator=gen)
                             for i in range(0, min(len(images), 4096), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, {"final_loss": loss, "scaling_factor": vae.config.scaling_factor}


def train_clip(data: Pictures, steps: int, seed: int):
    clip = wm.new_clip(seed).train()
    tokenizer = wm.clip_tokenizer()
    pixels = clip_pixels(to_unit(data.images))
    rng = np.random.default_rng([seed, 3])
    gen = torch.Generator().manual_seed(seed)

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(len(pixels), (BATCH["clip"],), generator=gen)
        ids = tokenize(tokenizer, [training_caption(data.scenes[i], rng) for i in idx.tolist()])
        return clip(input_ids=ids, pixel_values=pixels[idx], return_loss=True).loss
    loss = train_loop("clip", steps, clip.parameters(), LR["clip"], step)
    return clip.eval(), {"final_loss": loss}


def encode_text(text_encoder, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(tokenize(tokenizer, texts))[0]


def _ema(model: torch.nn.Module, decay: float) -> tuple[torch.nn.Module, Callable[[], None]]:
    """A frozen copy of `model` and the update that moves it `1 - decay` of the way to `model` (the
    exponential moving average diffusion models are sampled from)."""
    import copy

    shadow = copy.deepcopy(model).eval().requires_grad_(False)
    live, kept = list(model.parameters()), list(shadow.parameters())

    def update() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(kept, live, 1 - decay)
    return shadow, update


def train_unet(data: Pictures, vae, clip, steps: int, seed: int, start=None, lr: float = LR["unet"]):
    """Train a UNet (from seeds, or go on training `start`) and return its EMA weights."""
    from diffusers import DDPMScheduler

    unet = (start if start is not None else wm.new_unet(seed)).train()
    ema, update = _ema(unet, EMA_DECAY)
    tokenizer = wm.clip_tokenizer()
    text_encoder = text_tower(clip)
    noise = DDPMScheduler(**{k: v for k, v in wm.SCHEDULE.items() if k != "steps_offset"})
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 5])
    images = to_unit(data.images) * 2 - 1
    with torch.no_grad():  # the posterior's mean and std of every picture, sampled afresh each step
        moments = torch.cat([vae.encode(images[i:i + 256]).latent_dist.parameters
                             for i in tqdm(range(0, len(images), 256), desc="world unet: encoding", mininterval=5)])
    scale = vae.config.scaling_factor

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(len(moments), (BATCH["unet"],), generator=gen)
        mean, logvar = moments[idx].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=gen)) * scale
        captions = [training_caption(data.scenes[i], rng) if rng.random() >= CAPTION_DROPOUT else ""
                    for i in idx.tolist()]
        t = torch.randint(0, noise.config.num_train_timesteps, (len(idx),), generator=gen)
        eps = torch.randn(latents.shape, generator=gen)
        pred = unet(noise.add_noise(latents, eps, t), t, encode_text(text_encoder, tokenizer, captions)).sample
        return F.mse_loss(pred, eps)
    loss = train_loop("unet", steps, unet.parameters(), lr, step, after_step=update)
    return ema, {"final_loss": loss, "ema_decay": EMA_DECAY, "resumed": start is not None, "lr": lr}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    return float(np.corrcoef(ranks(np.asarray(a, float)), ranks(np.asarray(b, float)))[0, 1])


def true_taste(images: np.ndarray) -> np.ndarray:
    from world.reader import read
    from world.taste import taste

    return np.array([taste(a) for a in read(images)], dtype=np.float32)


def embed_images(clip, images: np.ndarray) -> torch.Tensor:
    from common.clip import HFCLIP

    towers = HFCLIP(clip)  # its features whichever transformers version returns them
    with torch.no_grad():
        feats = [towers.encode_image(clip_pixels(to_unit(images[i:i + 256]))) for i in range(0, len(images), 256)]
    return F.normalize(torch.cat(feats), dim=-1)


def train_aesthetic(pipe, clip, steps: int, seed: int, n: int = GENERATED):
    from common.clip import AestheticMLP

    captions = aesthetic_captions(n, seed)
    images = generate(pipe, captions, seed)
    target = torch.from_numpy(true_taste(images)) * 10.0
    emb = embed_images(clip, images)
    held = len(images) // 10
    torch.manual_seed(seed)
    mlp = AestheticMLP(wm.EMBED_DIM, relu=True).train()  # taste is an AND of style values: not linear
    gen = torch.Generator().manual_seed(seed)

    def step(_: int) -> torch.Tensor:
        idx = held + torch.randint(len(images) - held, (BATCH["aesthetic"],), generator=gen)
        return F.mse_loss(mlp(emb[idx]), target[idx])
    loss = train_loop("aesthetic", steps, mlp.parameters(), LR["aesthetic"], step)
    mlp.eval()
    with torch.no_grad():
        pred = mlp(emb[:held])
    rho = spearman(pred.numpy(), target[:held].numpy())
    return mlp, {"final_loss": loss, "heldout_spearman": rho, "generated": len(images),
                 "taste_mean": float(target.mean() / 10)}


def _stage_steps(text: str) -> dict[str, int]:
    """"unet=6000,aesthetic=2000" -> {"unet": 6000, "aesthetic": 2000}; ValueError naming the bad part."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition("=")
        if name not in STAGES or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{part!r} is not STAGE=N with STAGE one of {list(STAGES)} and N a positive integer")
        out[name] = int(count)
    return out


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m world.build", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(STAGES),
                    help=f"comma-separated stages to (re)build, in order {','.join(STAGES)}; the others are loaded "
                         "from --out (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every stage's steps and the picture count (0.01: a smoke run)")
    ap.add_argument("--steps", default="", metavar="STAGE=N,...",
                    help="training steps of some stages instead of the defaults "
                         f"({', '.join(f'{k}={v}' for k, v in STEPS.items())}), before --scale")
    ap.add_argument("--resume-unet", action="store_true",
                    help="go on training the UNet under --out (at half the learning rate) instead of a fresh one")
    ap.add_argument("--out", type=Path, default=wm.ASSETS, help="where the weights go (default world/assets)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in STAGES]
    if bad:
        print(f"--only: unknown stage(s) {bad}; choose from {list(STAGES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    try:
        chosen = {**STEPS, **_stage_steps(args.steps)}
    except ValueError as err:
        print(f"--steps: {err}", file=sys.stderr)
        return 2
    steps = {k: max(2, int(v * args.scale)) for k, v in chosen.items()}
    command = "python -m world.build " + " ".join(sys.argv[1:] if argv is None else argv)
    needs_data = any(s in only for s in ("vae", "clip", "unet", "sight"))
    data = pictures(max(64, int(N_PICTURES * args.scale)), args.seed) if needs_data else None
    started = time.time()
    vae = clip = pipe = None
    for stage in STAGES:
        if stage not in only:
            continue
        t0 = time.time()
        if stage == "vae":
            vae, figures = train_vae(data, steps["vae"], args.seed)
            model = vae
        elif stage == "clip":
            clip, figures = train_clip(data, steps["clip"], args.seed)
            model = clip
        elif stage == "unet":
            vae = vae or load_vae(root)
            clip = clip or load_clip(root)
            start = load_pipeline(root).unet if args.resume_unet else None
            unet, figures = train_unet(data, vae, clip, steps["unet"], args.seed, start,
                                       LR["unet"] / 2 if start is not None else LR["unet"])
            model = pipe = pipeline(vae, clip, unet)
        elif stage == "sight":
            from world.sight import train_sight

            pipe = pipe or load_pipeline(root)
            clip, figures = train_sight(clip or load_clip(root), pipe, data, steps["sight"], args.seed,
                                        max(64, int(SIGHT_GENERATED * args.scale)), BATCH["sight"], LR["sight"])
            model = clip
        else:
            pipe = pipe or load_pipeline(root)
            clip = clip or load_clip(root)
            model, figures = train_aesthetic(pipe, clip, steps["aesthetic"], args.seed,
                                            max(64, int(GENERATED * args.scale)))
        figures = {**figures, "steps": steps[stage], "seconds": round(time.time() - t0, 1)}
        record(root, stage, save_stage(stage, model, root), args.seed, figures, command)
        print(json.dumps({"stage": stage, **figures}), flush=True)
    print(json.dumps({"built": only, "seconds": round(time.time() - started, 1), "out": str(root)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
