"""The layout of a run directory that every role reads: where its checkpoints are and which is the
newest complete one (learner/checkpoint.py writes them)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None
