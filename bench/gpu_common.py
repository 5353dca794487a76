"""Shared pieces of bench/gpu.py: the run context, time budgets, timing, memory, the matmul ceiling
that MFU is measured against, and the markdown summary."""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


class Skip(RuntimeError):
    """A part that cannot run here (a missing package, no GPU): reported, not failed."""


class Deadline:
    """A part's time budget: loops ask `left()` and stop repeating when it runs out."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


@dataclass
class Context:
    preset: str
    device: torch.device
    overrides: list[str]
    quick: bool
    cache: dict[str, Any] = field(default_factory=dict)

    def cfg(self, extra: list[str] | tuple[str, ...] = ()):
        from common.config import load_config

        device = [f"run.device={self.device}"]
        gpu = ["reward.num_gpus=0", "learner.num_gpus=0"] if self.device.type == "cpu" else []
        return load_config(self.preset, overrides=[*device, *gpu, *self.overrides, *extra])


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return device


def describe_machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], Any], device: torch.device, deadline: Deadline, min_reps: int = 1, max_reps: int = 5) -> list[float]:
    """Wall seconds of `fn` (already warm), at least min_reps times, more while the budget allows."""
    times: list[float] = []
    while len(times) < max_reps:
        if len(times) >= min_reps and not deadline.allows(2 * (statistics.median(times) if times else 0.0)):
            break
        times.append(timed(fn, device)[0])
    return times


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """CUDA: the allocator's peak since the last reset. CPU: the process's peak RSS (monotone, whole process)."""
    if device.type == "cuda":
        return {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3), "what": "torch.cuda.max_memory_allocated"}
    return {"peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "what": "process peak RSS (CPU)"}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_ceiling(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """TFLOP/s of a large matmul on this device, now: bf16 8192³ on CUDA (the issue's MFU reference;
    fp16 runs at the same tensor-core rate), fp32 on CPU (what the CPU runs the models in)."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        n, dtype, reps = (512 if quick else 1024), torch.float32, (3 if quick else 5)
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    times = [timed(lambda: a @ b, device)[0] for _ in range(reps)]
    best = statistics.median(times)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "tflops": round(2 * n**3 / best / 1e12, 4)}


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)
    if "markdown" in result:
        path.with_suffix(".md").write_text(result["markdown"] + "\n")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    """One row per part: its headline figure, the baseline it is measured against, the ratio."""
    where = result.get("gpu") or f"CPU ({result.get('cpu')}, {result.get('torch_threads')} threads)"
    lines = [f"bench/gpu.py --preset {result['preset']} on {where}, torch {result['torch']}",
             "", "| part | measure | this system | baseline | ratio | note |", "|---|---|---:|---:|---:|---|"]
    for name, part in result["parts"].items():
        if part.get("status") != "ok":
            lines.append(f"| {name} | — | — | — | — | {part.get('status')}: {part.get('reason') or part.get('error', '')} |")
            continue
        for row in part.get("rows", []):
            lines.append("| " + " | ".join([name, row["measure"], _fmt(row.get("value")), _fmt(row.get("baseline")),
                                            _fmt(row.get("ratio")), row.get("note", "")]) + " |")
    return "\n".join(lines)
