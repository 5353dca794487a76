"""Part `reward` of bench/gpu.py: the reward worker against a bare diffusers loop, a batch sweep, MFU,
and each `reward.speed` switch against the defaults, all on one pipeline in this process.

The bare loop calls the worker's own StableDiffusionPipeline with the worker's settings (DPM-Solver++,
`reward.images.steps`, `render.guidance`, `reward.images.per_prompt` fixed latents per prompt, fp16 on GPU,
output_type="pt").
Classifier-free guidance is already one UNet batch of 2·N latents in diffusers, so it has no switch.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import gpu_common as G

PROMPTS = ["a cat sitting on a sofa", "a red car parked in the rain", "a castle on a hill at sunset",
           "a bowl of fruit on a wooden table", "an astronaut riding a horse", "a lighthouse in a storm",
           "a street market in the evening", "a dog playing in the snow"]
SUFFIX = ", highly detailed, digital painting, artstation, sharp focus"

#: (name, overrides, CUDA only, compiles), most informative first: the budget may not reach the end.
#: One compile covers UNet + VAE decoder (compiling the UNet alone would cost another minute of compile).
SWITCHES = [
    ("compile_unet+vae", ["reward.speed.compile_unet=true", "reward.speed.compile_vae=true"], False, True),
    ("cuda_graphs", ["reward.speed.compile_unet=true", "reward.speed.compile_vae=true",
                     "reward.speed.cuda_graphs=true"], True, True),
    ("channels_last", ["reward.speed.channels_last=true"], False, False),
    ("vae_fp16=false", ["reward.speed.vae_fp16=false"], True, False),
    ("attention=classic", ["reward.speed.attention=classic"], False, False),
]


def prompts(n: int, tag: str = "") -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + (f" #{i // len(PROMPTS)}" if i >= len(PROMPTS) else "") + tag for i in range(n)]


def flops_per_image(models, cfg) -> dict[str, float]:
    """FLOPs (multiply-add = 2) counted by FlopCounterMode on this pipeline, batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe, dev = models.renderer.pipe, models.device
    tokens = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(dev)
    latent = models.renderer.noise[:1]
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as c:
            text = pipe.text_encoder(tokens)[0]
        counts["text_encoder"] = c.get_total_flops()
        with FlopCounterMode(display=False) as c:
            pipe.unet(latent, torch.tensor([500], device=dev), encoder_hidden_states=text.to(latent.dtype))
        counts["unet_forward"] = c.get_total_flops()
        with FlopCounterMode(display=False) as c:
            pipe.vae.decode(latent.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor)
        counts["vae_decode"] = c.get_total_flops()
    images = cfg.reward.images
    cfg_factor = 2 if cfg.render.guidance > 1 else 1
    counts["per_image"] = (images.steps * cfg_factor * counts["unet_forward"] + counts["vae_decode"]
                           + cfg_factor * counts["text_encoder"] / images.per_prompt)
    return counts


class Bare:
    """The bare diffusers loop: the worker's pipeline, called directly with the worker's settings."""

    def __init__(self, models, cfg) -> None:
        self.pipe, self.noise, self.cfg = models.renderer.pipe, models.renderer.noise, cfg

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        images, size = self.cfg.reward.images, self.cfg.model.image_size
        return self.pipe(texts, num_inference_steps=images.steps, guidance_scale=self.cfg.render.guidance,
                         num_images_per_prompt=images.per_prompt, latents=self.noise.repeat(len(texts), 1, 1, 1),
                         height=size, width=size, output_type="pt").images


def sweep(bare: Bare, batches: list[int], k: int, device, deadline: G.Deadline) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        texts = prompts(b)
        G.reset_peak(device)
        try:
            first, _ = G.timed(lambda: bare(texts), device)
            if not deadline.allows(2 * first):
                rows.append({"batch": b, "skipped": "budget", "first_call_s": first})
                break
            times = G.repeat(lambda: bare(texts), device, deadline, min_reps=1, max_reps=2)
        except torch.OutOfMemoryError as exc:  # the sweep's end: record it, keep the smaller batches
            rows.append({"batch": b, "error": f"out of memory: {str(exc).splitlines()[0]}"})
            G.release(device)
            break
        rows.append({"batch": b, "images": b * k, "s_per_call": times, "images_per_s": b * k / statistics.median(times),
                     **G.peak_memory(device)})
    return rows


def breakdown(models, cfg, b: int, device) -> dict[str, float]:
    """Seconds of one pipeline call's pieces at batch b, measured alone: UNet × steps, VAE decode, text."""
    pipe, images = models.renderer.pipe, cfg.reward.images
    k = images.per_prompt
    latents = models.renderer.noise.repeat(b, 1, 1, 1)  # (b·k, C, h, w)
    cond = torch.zeros(2 * b * k, 77, pipe.text_encoder.config.hidden_size, device=device, dtype=latents.dtype)
    with torch.no_grad():
        tokens = pipe.tokenizer(prompts(b), padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device)
        G.timed(lambda: pipe.unet(torch.cat([latents] * 2), torch.tensor(500, device=device), encoder_hidden_states=cond), device)
        unet, _ = G.timed(lambda: pipe.unet(torch.cat([latents] * 2), torch.tensor(500, device=device),
                                            encoder_hidden_states=cond), device)
        vae, _ = G.timed(lambda: pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor), device)
        text, _ = G.timed(lambda: pipe.text_encoder(torch.cat([tokens] * 2)), device)
    return {"unet_all_steps_s": unet * images.steps, "vae_decode_s": vae, "text_encoder_s": text}


def run(ctx: G.Context, deadline: G.Deadline) -> dict[str, Any]:
    from scoring.render import build_reward_models
    from scoring.sd_speed import apply_speed, reset_speed

    cfg = ctx.cfg()
    images = cfg.reward.images
    t0 = time.perf_counter()
    models = build_reward_models(cfg, str(ctx.device))
    out: dict[str, Any] = {"build_s": time.perf_counter() - t0, "settings": {
        "steps": images.steps, "guidance": cfg.render.guidance, "images_per_prompt": images.per_prompt,
        "image_size": cfg.model.image_size,
        "dtype": str(models.dtype).removeprefix("torch."), "scheduler": type(models.renderer.pipe.scheduler).__name__,
        "speed": models.speed}}
    device, k, pipe = models.device, images.per_prompt, models.renderer.pipe
    counts = flops_per_image(models, cfg)
    ceiling = G.matmul_ceiling(device, ctx.quick)
    out.update(flops=counts, matmul_ceiling=ceiling)
    tflop = counts["per_image"] / 1e12

    def mfu(images_per_s: float) -> float:
        return images_per_s * tflop / ceiling["tflops"]

    bare = Bare(models, cfg)
    batches = [1, 2] if ctx.quick else [1, 4, 8, 16] if device.type == "cuda" else [1, 2, 4, 8]
    out["sweep"] = sweep(bare, batches, k, device, deadline)
    for row in out["sweep"]:
        if "images_per_s" in row:
            row["mfu"] = mfu(row["images_per_s"])
    measured = [row for row in out["sweep"] if "images_per_s" in row]
    best = max(measured, key=lambda row: row["images_per_s"])
    b = min(cfg.reward.batch_size, max(row["batch"] for row in measured))
    out["breakdown"] = _guard(lambda: {"batch": b, **breakdown(models, cfg, b, device)}, device)
    rows = [{"measure": f"bare loop images/s, best of batch sweep (batch {best['batch']})", "value": best["images_per_s"],
             "note": f"MFU {best['mfu']:.1%} of a {ceiling['dtype']} matmul at {ceiling['tflops']:.3g} TFLOP/s; "
                     f"{tflop:.3g} TFLOP/image"}]

    out["worker"] = _guard(lambda: worker_vs_bare(ctx, cfg, models, bare, b, deadline), device)
    if "worker_images_per_s" in out["worker"]:
        w = out["worker"]
        rows.append({"measure": f"images/s, reward worker vs bare loop (batch {b}, warm plain cache)",
                     "value": w["worker_images_per_s"], "baseline": w["bare_images_per_s"], "ratio": w["worker_over_bare"],
                     "note": f"target ≥ 0.90; MFU {mfu(w['worker_images_per_s']):.1%}"})

    # each switch against the defaults, side by side on the same pipeline, prompts and noise
    b = min(b, 4) if device.type == "cuda" else b  # 12 images per call: compile time, not batch, dominates
    texts = prompts(b, SUFFIX)
    with torch.no_grad():
        reference = bare(texts).float()
    out["switches"] = {}
    for name, overrides, cuda_only, compiles in SWITCHES:
        if cuda_only and device.type != "cuda":
            out["switches"][name] = {"skipped": "CUDA only"}
            continue
        if name == "vae_fp16=false" and models.dtype != torch.float16:
            out["switches"][name] = {"skipped": "the pipeline is not fp16"}
            continue
        default_s = statistics.median(G.repeat(lambda: bare(texts), device, deadline, 1, 2))
        estimate = default_s * 3 + (90 if compiles and device.type == "cuda" else 120 if compiles else 0)
        if not deadline.allows(estimate):
            out["switches"][name] = {"skipped": f"budget ({deadline.left():.0f}s left, needs ~{estimate:.0f}s)"}
            continue
        variant = ctx.cfg(overrides).reward.speed
        applied = apply_speed(pipe, variant)
        try:
            first, images = G.timed(lambda: bare(texts), device)
            times = G.repeat(lambda: bare(texts), device, deadline, 1, 2)
        except Exception as exc:  # noqa: BLE001 — one switch failing (OOM, a compile error) keeps the rest
            out["switches"][name] = {"applied": applied, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            continue
        finally:
            reset_speed(pipe, models.dtype)
            G.release(device)
        steady = statistics.median(times)
        diff = float((images.float() - reference).abs().max())
        out["switches"][name] = {"applied": applied, "default_s": default_s, "first_call_s": first, "steady_s": times,
                                 "compile_s": max(0.0, first - steady) if compiles else None,
                                 "speedup": default_s / steady, "max_abs_image_diff": diff}
        note = f"max abs image diff {diff:.2g}" + (f"; compile {first - steady:.0f} s" if compiles else "")
        rows.append({"measure": f"bare images/s with {name} (batch {b})", "value": len(texts) * k / steady,
                     "baseline": len(texts) * k / default_s, "ratio": default_s / steady, "note": note})
    out["overlap_scoring"] = _guard(lambda: overlap(ctx, cfg, models, b, deadline), device)
    if "ratio" in out["overlap_scoring"]:
        o = out["overlap_scoring"]
        rows.append({"measure": f"worker images/s with overlap_scoring (render_batch {o['render_batch']})",
                     "value": o["on_images_per_s"], "baseline": o["off_images_per_s"], "ratio": o["ratio"],
                     "note": f"scores equal: {o['scores_equal']}"})
    out["rows"] = rows
    return out


def _guard(fn, device) -> dict[str, Any]:
    """A sub-measurement that fails is recorded; the part's other figures stay."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        G.release(device)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


def _worker(ctx, cfg, models):
    from actors.reward_worker import RewardWorker
    from common.redis_server import RedisServer, RedisServerError

    tmp = tempfile.TemporaryDirectory(prefix="pag-gpu-")
    try:
        server = RedisServer(Path(tmp.name) / "redis").start()
    except (RedisServerError, OSError) as exc:
        tmp.cleanup()
        raise G.Skip(f"no redis-server: {exc}") from exc
    worker = RewardWorker(cfg, server.url, "benchgpu", "bench-0", models=models, block_ms=10)
    return worker, server, tmp


def _trajs(plain: list[str], tag: str):
    from common.trajectory import Trajectory

    return [Trajectory(prompt=p, response=f"{p}{SUFFIX}, {tag}", prompt_ids=[1, 2, 3], response_ids=[4, 5],
                       ref_logprobs=[-1.0, -2.0]) for p in plain]


def _pass(worker, trajs, device) -> float:
    worker.buffer.push_pending(trajs)
    wall, handled = G.timed(lambda: worker.run(max_items=len(trajs)), device)
    assert handled == len(trajs), (handled, len(trajs))
    return len(trajs) * worker.renderer.k / wall


def worker_vs_bare(ctx, cfg, models, bare: Bare, b: int, deadline: G.Deadline) -> dict[str, Any]:
    """images/s of RewardWorker.run (warm plain cache: read → render → score → add → ack) and of the
    bare loop on the same number of prompts, interleaved so outside load hits both alike."""
    try:
        worker, server, tmp = _worker(ctx, cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"batch_size": b})}), models)
    except G.Skip as exc:
        return {"skipped": str(exc)}
    try:
        plain = prompts(b)
        _pass(worker, _trajs(plain, "warm"), models.device)  # renders and caches the plain prompts
        bare_runs, worker_runs = [], []
        for rep in range(1 if ctx.quick else 3):
            if rep and not deadline.allows(2 * b * models.renderer.k / min(bare_runs + worker_runs)):
                break
            wall, _ = G.timed(lambda: bare([f"{p}{SUFFIX}, r{rep}" for p in plain]), models.device)
            bare_runs.append(b * models.renderer.k / wall)
            worker_runs.append(_pass(worker, _trajs(plain, f"r{rep}"), models.device))
        stats = worker.stats.as_dict()
    finally:
        worker.close()
        server.stop()
        tmp.cleanup()
    bare_ips, worker_ips = statistics.median(bare_runs), statistics.median(worker_runs)
    return {"batch": b, "bare_runs": bare_runs, "worker_runs": worker_runs, "bare_images_per_s": bare_ips,
            "worker_images_per_s": worker_ips, "worker_over_bare": worker_ips / bare_ips,
            "render_share": stats["render_s"] / max(1e-9, stats["render_s"] + stats["score_s"])}


def overlap(ctx, cfg, models, b: int, deadline: G.Deadline) -> dict[str, Any]:
    """The worker with reward.speed.overlap_scoring on and off, render_batch = b/2 (two chunks per step)."""
    if b < 2:
        return {"skipped": "needs a batch of at least 2"}
    chunk = b // 2
    speed = cfg.reward.speed.model_copy(update={"render_batch": chunk})
    variant = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"batch_size": b, "speed": speed})})
    try:
        worker, server, tmp = _worker(ctx, variant, models)
    except G.Skip as exc:
        return {"skipped": str(exc)}
    old_chunk = models.renderer.max_prompts
    models.renderer.max_prompts = chunk
    try:
        plain = prompts(b)
        _pass(worker, _trajs(plain, "warm"), models.device)
        runs: dict[bool, list[float]] = {False: [], True: []}
        scores: dict[bool, list] = {}
        for rep in range(1 if ctx.quick else 2):
            for on in (False, True):
                if rep and not deadline.allows(4 * b * models.renderer.k / min(runs[False])):
                    break
                worker.cfg.reward.speed.overlap_scoring = on
                trajs = _trajs(plain, f"o{rep}")
                runs[on].append(_pass(worker, trajs if not on else _trajs(plain, f"o{rep}x"), models.device))
                if rep == 0:
                    scores[on] = [t.scores for t in worker.score_batch(_trajs(plain, "check"))[0]]
    finally:
        models.renderer.max_prompts = old_chunk
        worker.close()
        server.stop()
        tmp.cleanup()
    equal = all(abs(a[key] - c[key]) <= 1e-3 * max(1.0, abs(a[key])) for a, c in zip(scores[False], scores[True]) for key in a)
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    return {"render_batch": chunk, "off_images_per_s": off, "on_images_per_s": on, "ratio": on / off, "runs": {"off": runs[False], "on": runs[True]},
            "scores_equal": equal}
