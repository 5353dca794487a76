"""IPGO seconds and peak memory per iteration (one prompt: K = 2 differentiated steps of S, VAE decode,
reward, backward, Adam step), ours against the notebook's way measured side by side in this process.

    python bench/ipgo.py --preset tiny --out ipgo.json                      # CPU, tiny models (~1 min)
    python bench/ipgo.py --preset sd14-arch --device cuda --out ipgo.json   # 512², the full-size architectures

Variants (same models, prompt, noise and tokens):
  ours           the first S − K steps under no_grad, the last K and the decode differentiated
  notebook_like  the first S − K steps with autograd on and the UNet output detached (the reference notebook)
  checkpointing  ours with gradient checkpointing of the K UNet calls and the decode

Peak memory: CUDA — torch.cuda.max_memory_allocated over the iteration above the start; CPU — the peak of
the C heap in use (glibc mallinfo2) above the start, sampled every 2 ms (an estimate: a peak shorter than
the sampling period can be missed).
`run(...)` is what bench/gpu.py's `ipgo` part calls.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PROMPT = "a red car parked in front of an old house"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class _HeapPeak:
    """Peak of the C heap in use (glibc mallinfo2: allocated arena bytes + mmapped blocks) above its value at
    the start of the block, sampled every 2 ms: what torch's CPU tensors occupy, unlike RSS, which keeps
    freed pages and so shows no growth once the allocator is warm."""

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self.mallinfo = libc.mallinfo2
        self.peak = 0

    def _in_use(self) -> int:
        info = self.mallinfo()
        return int(info.uordblks + info.hblkhd)

    def __enter__(self) -> "_HeapPeak":
        self.start, self.peak, self.stop = self._in_use(), 0, False

        def sample() -> None:
            while not self.stop:
                self.peak = max(self.peak, self._in_use() - self.start)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self._in_use() - self.start)


def _notebook_like(sampler):
    """The same sampler, its first S − K steps run the notebook's way (autograd on, output detached)."""
    from ipgo.draft import DraftSampler

    class NotebookLike(DraftSampler):
        _frozen = staticmethod(torch.enable_grad)

        def _eps(self, latents, t, context, differentiated):
            eps = super()._eps(latents, t, context, differentiated)
            return eps if differentiated else eps.detach()

    clone = NotebookLike.__new__(NotebookLike)
    clone.__dict__.update(sampler.__dict__)
    return clone


def _iteration(trainer, device) -> tuple[float, int]:
    """Seconds and peak bytes of one IPGO iteration."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        trainer.forward_backward(PROMPT)
        trainer.step()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - base
    with _HeapPeak() as peak:
        t0 = time.perf_counter()
        trainer.forward_backward(PROMPT)
        trainer.step()
        seconds = time.perf_counter() - t0
    return seconds, peak.peak


def run(preset: str = "tiny", device: str = "auto", quick: bool = False, overrides: list[str] | tuple[str, ...] = (),
        budget_s: float = 120.0) -> dict[str, Any]:
    from common.config import load_config
    from common.models import resolve_device
    from ipgo.optimize import _Trainer, build_models

    dev = resolve_device(device)
    extra = [f"run.device={dev}"] + (["ipgo.num_gpus=0"] if dev.type == "cpu" else [])
    cfg = load_config(preset, overrides=[*extra, *overrides])
    t0 = time.perf_counter()
    models = build_models(cfg, dev)
    build_s = time.perf_counter() - t0
    ours = models.sampler
    variants = {"ours": ours, "notebook_like": _notebook_like(ours), "checkpointing": None}
    deadline = time.monotonic() + budget_s
    reps = 1 if quick else 3
    out: dict[str, Any] = {"preset": preset, "device": str(dev), "image_size": cfg.model.image_size,
                           "steps": cfg.ipgo.steps, "grad_steps": cfg.ipgo.grad_steps, "fp16": models.half,
                           "build_s": round(build_s, 2), "torch_threads": torch.get_num_threads(), "variants": {}}
    for name, sampler in variants.items():
        ours.checkpointing = name == "checkpointing"
        models.sampler = sampler if sampler is not None else ours
        trainer = _Trainer(models)
        _iteration(trainer, dev)  # warm-up (allocator, first-call costs)
        times, peaks = [], []
        for _ in range(reps):
            if times and time.monotonic() > deadline:
                break
            seconds, peak = _iteration(trainer, dev)
            times.append(seconds)
            peaks.append(peak)
        out["variants"][name] = {"s_per_iteration": round(statistics.median(times), 4), "reps": len(times),
                                 "peak_memory_mib": round(max(peaks) / 2**20, 1)}
    models.sampler, ours.checkpointing = ours, False
    v = out["variants"]
    out["ratio_time_notebook_over_ours"] = round(v["notebook_like"]["s_per_iteration"] / v["ours"]["s_per_iteration"], 3)
    out["ratio_memory_notebook_over_ours"] = round(v["notebook_like"]["peak_memory_mib"] / max(v["ours"]["peak_memory_mib"], 0.1), 3)
    out["memory_what"] = "torch.cuda.max_memory_allocated above the start" if dev.type == "cuda" else \
        "glibc heap in use above the start, sampled every 2 ms (estimate)"
    out["rows"] = [{"measure": f"IPGO s/iteration ({cfg.model.image_size}², S={cfg.ipgo.steps}, K={cfg.ipgo.grad_steps})",
                    "value": v["ours"]["s_per_iteration"], "baseline": v["notebook_like"]["s_per_iteration"],
                    "ratio": out["ratio_time_notebook_over_ours"],
                    "note": f"peak {v['ours']['peak_memory_mib']} MiB vs notebook-like {v['notebook_like']['peak_memory_mib']} MiB; "
                            f"checkpointing {v['checkpointing']['s_per_iteration']} s, {v['checkpointing']['peak_memory_mib']} MiB"}]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = run(args.preset, args.device, args.quick, args.overrides, args.budget_s)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
