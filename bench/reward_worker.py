"""Benchmark of the reward worker; prints one JSON object.

    python bench/reward_worker.py                          # tiny preset, CPU, 1 torch thread
    python bench/reward_worker.py --preset sd14 --device cuda --trajectories 64

Measures, in one process, against a private redis-server in a temp dir:
  * images/s of a bare diffusers loop — the worker's own StableDiffusionPipeline called with
    identical settings (steps, guidance, size, images per prompt, batch of `reward.batch_size`
    prompts, the same fixed latents, output_type="pt") — beside images/s of `RewardWorker.run`
    with a warm plain cache (read pending → render → score → add → ack), interleaved `--repeats`
    times so that load from other processes hits both alike; medians are reported;
  * UNet evaluations per trajectory (latents through the UNet; ×2 for classifier-free guidance)
    and renders per trajectory with the plain cache cold (every trajectory a new prompt), cold
    with K rewrites per prompt in a batch (the sampler's shape), and warm;
  * FLOPs of one UNet forward, one VAE decode and one text encoding, counted with
    torch.utils.flop_counter.FlopCounterMode, hence FLOPs per image and effective TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.reward_worker import RewardWorker  # noqa: E402
from scoring.render import build_reward_models  # noqa: E402
from common.config import load_config  # noqa: E402
from common.redis_server import RedisServer  # noqa: E402
from common.trajectory import Trajectory  # noqa: E402

PROMPTS = ROOT / "common" / "assets" / "prompts" / "coco_prompts.txt"
SUFFIXES = ("highly detailed", "digital painting", "artstation", "sharp focus", "cinematic lighting",
            "octane render", "trending", "intricate", "elegant", "8k", "volumetric light", "matte painting")


def prompts(n: int, offset: int = 0) -> list[str]:
    lines = [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [lines[(offset + i) % len(lines)] + ("" if offset + i < len(lines) else f" #{offset + i}") for i in range(n)]


def trajectories(plain: list[str], per_prompt: int, tag: str) -> list[Trajectory]:
    out = []
    for j, prompt in enumerate(plain):
        for r in range(per_prompt):
            words = ", ".join(SUFFIXES[(j + r + i) % len(SUFFIXES)] for i in range(3))
            response = f"{prompt}, {words}, {tag}{r}"
            out.append(Trajectory(prompt=prompt, response=response, prompt_ids=[1, 2, 3], response_ids=[4, 5],
                                  ref_logprobs=[-1.0, -2.0]))
    return out


def flops(models, cfg) -> dict[str, float]:
    """FLOPs (multiply-add = 2) of the pieces of one image, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = models.renderer.pipe
    latent = models.renderer.noise[:1]
    tokens = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(models.device)
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            text = pipe.text_encoder(tokens)[0]
        counts["text_encoder"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            pipe.unet(latent, torch.tensor([500], device=models.device), encoder_hidden_states=text)
        counts["unet_forward"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            pipe.vae.decode(latent / pipe.vae.config.scaling_factor)
        counts["vae_decode"] = counter.get_total_flops()
    k, steps = cfg.reward.images.per_prompt, cfg.reward.images.steps
    cfg_factor = 2 if cfg.render.guidance > 1 else 1
    counts["per_image"] = steps * cfg_factor * counts["unet_forward"] + counts["vae_decode"] + cfg_factor * counts["text_encoder"] / k
    counts["per_image_unet_only"] = steps * cfg_factor * counts["unet_forward"]
    return counts


def bare_loop(models, cfg, texts: list[str], calls: int) -> float:
    """images/s of the pipeline alone, batch of reward.batch_size prompts per call."""
    r, pipe, noise = cfg.reward, models.renderer.pipe, models.renderer.noise
    b = r.batch_size
    start = time.perf_counter()
    with torch.no_grad():
        for c in range(calls):
            part = texts[c * b:(c + 1) * b]
            pipe(part, num_inference_steps=r.images.steps, guidance_scale=cfg.render.guidance,
                 num_images_per_prompt=r.images.per_prompt,
                 latents=noise.repeat(len(part), 1, 1, 1), height=cfg.model.image_size, width=cfg.model.image_size,
                 output_type="pt")
    return calls * b * r.images.per_prompt / (time.perf_counter() - start)


def worker_pass(worker: RewardWorker, trajs: list[Trajectory]) -> dict[str, float]:
    """Push, then time worker.run over exactly these trajectories."""
    renderer, stats = worker.renderer, worker.stats
    before = (renderer.unet_rows, renderer.unet_calls, stats.images, stats.plain_cache_hits, stats.plain_cache_misses,
              stats.render_s, stats.score_s)
    worker.buffer.push_pending(trajs)
    start = time.perf_counter()
    handled = worker.run(max_items=len(trajs))
    wall = time.perf_counter() - start
    assert handled == len(trajs), (handled, len(trajs))
    rows, calls, images, hits, misses, render_s, score_s = (a - b for a, b in zip(
        (renderer.unet_rows, renderer.unet_calls, stats.images, stats.plain_cache_hits, stats.plain_cache_misses,
         stats.render_s, stats.score_s), before))
    n, k = len(trajs), worker.renderer.k
    return {
        "trajectories": n, "wall_s": wall, "images": images, "images_per_s": images / wall,
        "trajectories_per_s": n / wall, "unet_evals_per_traj": rows / n, "unet_forward_calls_per_traj": calls / n,
        "renders_per_traj": images / k / n, "plain_cache_hits": hits, "plain_cache_misses": misses,
        "render_share": render_s / wall, "score_share": score_s / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU; more than the free cores makes OpenMP spin)")
    parser.add_argument("--trajectories", type=int, default=24, help="per timed pass (a multiple of reward.batch_size)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved bare/worker pairs")
    parser.add_argument("--rewrites-per-prompt", type=int, default=4, help="K for the cold-with-K pass")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides=args.overrides)
    n = args.trajectories
    with tempfile.TemporaryDirectory(prefix="pag-bench-") as tmp, RedisServer(Path(tmp) / "redis") as server:
        t0 = time.perf_counter()
        models = build_reward_models(cfg, args.device)
        build_s = time.perf_counter() - t0
        worker = RewardWorker(cfg, server.url, "bench", "bench-0", models=models, block_ms=10)
        counted = flops(models, cfg)

        # warm-up (allocators, first-call paths), then the cache experiments
        worker_pass(worker, trajectories(prompts(cfg.reward.batch_size, offset=10_000), 1, "warmup"))
        bare_loop(models, cfg, prompts(cfg.reward.batch_size, offset=20_000), 1)
        plain = prompts(n)
        cold = worker_pass(worker, trajectories(plain, 1, "cold"))
        k = args.rewrites_per_prompt
        cold_k = worker_pass(worker, trajectories(prompts(n // k, offset=n), k, "coldk"))

        bare_runs, warm_runs = [], []
        for rep in range(args.repeats):
            bare_runs.append(bare_loop(models, cfg, [f"{p}, {SUFFIXES[rep]}" for p in plain], n // cfg.reward.batch_size))
            warm_runs.append(worker_pass(worker, trajectories(plain, 1, f"warm{rep}-")))
        worker.close()

    bare = statistics.median(bare_runs)
    warm = statistics.median(r["images_per_s"] for r in warm_runs)
    tflop = counted["per_image"] / 1e12
    result = {
        "benchmark": "reward_worker",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": args.device, "cpu": platform.processor() or platform.machine(), "torch_threads": args.threads,
        "torch": torch.__version__, "gpu_lent": False,
        "preset": args.preset, "overrides": args.overrides,
        "settings": {"steps": cfg.reward.images.steps, "guidance": cfg.render.guidance,
                     "images_per_prompt": cfg.reward.images.per_prompt, "batch_size": cfg.reward.batch_size,
                     "image_size": cfg.model.image_size, "scorers": cfg.reward.scorers,
                     "dtype": str(models.dtype).removeprefix("torch.")},
        "model_build_s": build_s,
        "bare_pipeline_images_per_s": bare, "bare_runs": bare_runs,
        "worker_images_per_s_warm": warm, "worker_warm_runs": warm_runs,
        "worker_over_bare": warm / bare,
        "cold": cold, "cold_k": {"rewrites_per_prompt": k, **cold_k},
        "renders_per_traj": {"cold": cold["renders_per_traj"], f"cold_k{k}": cold_k["renders_per_traj"],
                             "warm": statistics.median(r["renders_per_traj"] for r in warm_runs)},
        "unet_evals_per_traj": {"cold": cold["unet_evals_per_traj"], f"cold_k{k}": cold_k["unet_evals_per_traj"],
                                "warm": statistics.median(r["unet_evals_per_traj"] for r in warm_runs)},
        "flops": counted,
        "effective_tflops": {"bare": bare * tflop, "worker_warm": warm * tflop, "worker_cold": cold["images_per_s"] * tflop},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
