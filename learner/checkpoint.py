"""Checkpoints in safetensors: policy (Hugging Face layout), flow head, optimiser moments, RNG,
and a small JSON of counters. Written into a temporary directory and renamed, so a crash never
leaves a half checkpoint; `latest` names the newest complete one.

    runs/<name>/checkpoints/step_000040/
        policy/model.safetensors, config.json, tokenizer files
        flow.safetensors  optim.safetensors  rng.safetensors  state.json
        value.safetensors                      (objective=ppo: every module in `heads`)
    runs/<name>/checkpoints/latest          → "step_000040"

With `run.storage_path`, each checkpoint is then copied to run storage (common/storage.py).
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from common.errors import RunFailedError
from common.runs import checkpoint_root, install_checkpoint, latest_checkpoint  # noqa: F401 — part of this module's interface

KEEP = 3

log = logging.getLogger(__name__)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointWriteError(RunFailedError):
    """A checkpoint could not be written (a full disk, a read-only mount); the previous one stays."""

    label = "checkpoint"


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, flow: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, counters: dict[str, Any],
                    heads: Optional[dict[str, torch.nn.Module]] = None, extra: Optional[dict[str, Any]] = None) -> Path:
    """`heads`: further modules, one `{name}.safetensors` each (PPO's value head); `extra`: JSON state
    kept in state.json (PPO's KL controller). A write that fails (ENOSPC …) leaves no partial directory
    behind, keeps `latest` where it was and raises CheckpointWriteError naming the directory."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write(tmp, step, policy, tokenizer, flow, optimizer, counters, heads, extra)
        final = install_checkpoint(tmp, root, name)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(root, name, exc)) from exc
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, step: int, policy, tokenizer, flow: torch.nn.Module, optimizer: torch.optim.Optimizer,
           counters: dict[str, Any], heads: Optional[dict[str, torch.nn.Module]], extra: Optional[dict[str, Any]]) -> None:
    policy.save_pretrained(tmp / "policy", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "policy")
    for head_name, module in {"flow": flow, **(heads or {})}.items():
        kind = getattr(module, "kind", None)  # the flow head's architecture: same keys, other maths
        save_file({k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()},
                  str(tmp / f"{head_name}.safetensors"), metadata={"kind": kind} if kind else None)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, str(tmp / "optim.safetensors"))
    rng = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "counters": counters, "optimizer": opt_meta,
        "python_random": [py_state[0], list(py_state[1]), py_state[2]], "extra": extra or {},
    }, indent=1))


def _write_failure(root: Path, name: str, exc: OSError) -> str:
    previous = latest_checkpoint(root.parent)
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    kept = f"the previous checkpoint {previous.name} stays and --resume starts from it" if previous else \
        "there is no earlier checkpoint"
    return (f"could not write checkpoint {name} in {root} ({exc.strerror or exc}; {free}): {kept}. "
            "Free some space (or move run.runs_dir) and run again with --resume.")


def persist_checkpoint(storage, run_dir: Path, path: Path) -> Path:
    """Copy a written checkpoint to run storage (None: nothing to do). A failed copy is logged, not
    raised: training goes on with the local checkpoint, and the next one tries again."""
    if storage is not None:
        try:
            log.info("checkpoint copied to %s", storage.push_checkpoint(run_dir, path, keep=KEEP))
        except Exception:  # noqa: BLE001 — storage is a copy; losing a step of training to it is worse
            log.exception("could not copy checkpoint %s to %s", path.name, storage.uri)
    return path


def _check_flow_kind(file: Path, flow: torch.nn.Module) -> None:
    """Both flow heads have the same tensor names, so a checkpoint of one would load into the other without
    a word; the kind is in the file's metadata (absent before issue 19: those were all `film`)."""
    from safetensors import safe_open

    want = getattr(flow, "kind", None)
    with safe_open(str(file), "pt") as f:
        saved = (f.metadata() or {}).get("kind", "film")
    if want is not None and saved != want:
        raise ValueError(f"{file} holds a learner.flow_head={saved!r} head but this run's config says {want!r}: "
                         f"resume with learner.flow_head={saved} or start a new run")


def load_checkpoint(path: Path, policy, flow: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    restore_rng: bool = True, heads: Optional[dict[str, torch.nn.Module]] = None) -> dict[str, Any]:
    """Load weights, optimiser and RNG in place; returns state.json (step, counters, extra)."""
    from transformers import GPT2LMHeadModel

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved = GPT2LMHeadModel.from_pretrained(path / "policy")
    policy.load_state_dict(saved.state_dict())
    _check_flow_kind(path / "flow.safetensors", flow)
    flow.load_state_dict(load_file(str(path / "flow.safetensors")))
    for name, module in (heads or {}).items():
        if not (path / f"{name}.safetensors").is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {name}.safetensors: it was written by a run with "
                                    f"another learner.objective; resume with that objective or start a new run")
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    state.setdefault("extra", {})
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optim.safetensors")), state["optimizer"]))
    if restore_rng:
        rng = load_file(str(path / "rng.safetensors"))
        torch.random.set_rng_state(rng["torch_cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, inner, gauss = state["python_random"]
        random.setstate((version, tuple(inner), gauss))
    return state
