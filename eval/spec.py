"""`--methods plain,rule,sft,pag:runs/a,tb:runs/b,ppo:runs/c,promptist:DIR` → validated method specs.

Every problem is found here, before a model loads: an unknown method, a duplicate label, a missing
path or a run without a checkpoint raises MethodSpecError (a ConfigError: `pag` exits 2) naming the
entry and what would be right.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from common.config import ConfigError

#: methods that take no path; `sft` takes an optional one; `promptist` needs one
BUILTIN = ("plain", "rule", "sft", "promptist", "ipgo")
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class MethodSpecError(ConfigError):
    """A bad --methods entry; the message names it."""


@dataclass(frozen=True)
class MethodSpec:
    """One entry: `label` (the report's row), `kind` (plain, rule, sft, promptist, ipgo or policy) and a
    resolved `path` (a directory of Hugging Face weights for policy kinds; None where none is needed)."""

    label: str
    kind: str
    path: Optional[str] = None
    run_dir: Optional[str] = None  # the training run a policy checkpoint belongs to (its config.yaml)
    raw: str = ""


def resolve_policy_dir(path: str, entry: str) -> tuple[str, Optional[str]]:
    """A run directory (runs/<name>: its latest checkpoint), a checkpoint directory (…/step_N: its
    policy/), or a Hugging Face model directory (config.json) → (weights dir, run dir or None)."""
    p = Path(path)
    if not p.exists():
        raise MethodSpecError(f"--methods entry {entry!r}: {path} does not exist (expected a run directory "
                              "runs/<name>, a checkpoint directory or a Hugging Face model directory)")
    if (p / "checkpoints").is_dir() or (p / "config.yaml").is_file():
        from common.runs import latest_checkpoint

        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise MethodSpecError(f"--methods entry {entry!r}: run {path} has no complete checkpoint "
                                  f"({p}/checkpoints/latest missing or pointing at nothing); train it further "
                                  "or name a checkpoint directory")
        return str(ckpt / "policy"), str(p)
    if (p / "policy" / "config.json").is_file():  # a checkpoint directory runs/<name>/checkpoints/step_N
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
        return str(p / "policy"), str(run_dir) if run_dir and (run_dir / "config.yaml").is_file() else None
    if (p / "config.json").is_file():
        return str(p), None
    raise MethodSpecError(f"--methods entry {entry!r}: {path} is neither a run directory (config.yaml, "
                          "checkpoints/), a checkpoint directory (policy/) nor a model directory (config.json)")


def run_method_name(run_dir: Optional[str]) -> Optional[str]:
    """`run.method` from a run's config.yaml (set by the training command), if it records one."""
    if not run_dir:
        return None
    try:
        raw = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    method = (raw.get("run") or {}).get("method")
    return str(method) if method else None


def parse_methods(text: str) -> list[MethodSpec]:
    """Parse and validate the comma-separated --methods list (see module doc)."""
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise MethodSpecError(f"--methods {text!r}: empty entry; give a comma-separated list such as "
                              "plain,rule,sft,pag:runs/<name>")
    specs: list[MethodSpec] = []
    for entry in entries:
        label, _, path = entry.partition(":")
        label, path = label.strip(), path.strip()
        if not _LABEL.match(label):
            raise MethodSpecError(f"--methods entry {entry!r}: {label!r} is not a method name (letters, digits, "
                                  f"'_', '-', '.'; known: {', '.join(BUILTIN)}, or LABEL:RUN_DIR for a trained run)")
        if label in ("plain", "rule"):
            if path:
                raise MethodSpecError(f"--methods entry {entry!r}: {label} takes no path")
            specs.append(MethodSpec(label, label, raw=entry))
        elif label == "sft":
            weights = resolve_policy_dir(path, entry)[0] if path else None
            specs.append(MethodSpec(label, "sft", weights, raw=entry))
        elif label == "promptist":
            if not path:
                raise MethodSpecError(f"--methods entry {entry!r}: promptist needs the directory of a local copy of "
                                      "the public Promptist checkpoint: promptist:DIR (download microsoft/Promptist "
                                      "with `hf download microsoft/Promptist --local-dir DIR`)")
            specs.append(MethodSpec(label, "promptist", resolve_policy_dir(path, entry)[0], raw=entry))
        elif label == "ipgo" or label.startswith("ipgo-"):  # ipgo-batch:runs/x, ipgo-hps:runs/y, …
            specs.append(MethodSpec(label, "ipgo", path or None, raw=entry))
        else:
            if not path:
                raise MethodSpecError(f"--methods entry {entry!r}: unknown method {label!r}; known: "
                                      f"{', '.join(BUILTIN)}, or LABEL:RUN_DIR (e.g. pag:runs/a) for a trained run")
            weights, run_dir = resolve_policy_dir(path, entry)
            specs.append(MethodSpec(label, "policy", weights, run_dir, raw=entry))
    labels = [s.label for s in specs]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise MethodSpecError(f"--methods {text!r}: label {dupes[0]!r} is used twice; give each entry its own "
                              "label (e.g. pag:runs/a,pag2:runs/b)")
    return specs
