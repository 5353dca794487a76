"""The layout of a run directory that every role reads: where its checkpoints are and which is the
newest complete one (learner/checkpoint.py writes them)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` names, or, should that one be gone (a crash while a checkpoint of the same
    step replaced it), the newest complete `step_*`; None when there is none."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if (path / "state.json").is_file():
        return path
    complete = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) of a run directory or one of its checkpoints; ValueError naming
    what is missing. What `pag adapt` and `pag serve` load."""
    path = Path(path)
    if (path / "policy").is_dir():
        ckpt, run_dir = path, path.parent.parent
    else:
        run_dir, ckpt = path, latest_checkpoint(path)
        if ckpt is None:
            raise ValueError(f"{path} has no checkpoint (expected {path}/checkpoints/latest): give a run directory "
                             "(runs/<name>) of a run that saved one, or a checkpoint directory")
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir}/config.yaml not found: give a run directory (runs/<name>) or one of its "
                         "checkpoints")
    return run_dir, ckpt


def install_checkpoint(tmp: Path, root: Path, name: str) -> Path:
    """Move a complete checkpoint written in `tmp` to `root/name` (replacing one of that name), then point
    `root/latest` at it with an atomic rename: a reader sees the old checkpoint or the new one, never half.
    Files and directories are fsynced before each rename, so this holds across a power loss too."""
    fsync_tree(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(root)
    pointer = root / ".latest.tmp"
    with open(pointer, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    pointer.replace(root / "latest")
    fsync_dir(root)
    return final


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory, deepest first."""
    dirs = [Path(path)]
    for item in sorted(Path(path).rglob("*")):
        if item.is_dir():
            dirs.append(item)
        elif item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    for directory in reversed(dirs):
        fsync_dir(directory)
