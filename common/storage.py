"""Run storage that outlives a node: a copy of a run directory at `run.storage_path`/<run>.

Each node writes the run directory where it runs (`run.runs_dir`, node-local on a `ray up` cluster);
with `run.storage_path` set, what matters is copied to a location every node can reach, the way
Ray Train's `storage_path` does it — through fsspec, so any URI it knows works:

    file:///mnt/shared/pag-runs     a shared filesystem (NFS, EFS, a ReadWriteMany volume) or a local test
    s3://bucket/pag-runs            pip install 'pag[s3]' (s3fs); credentials as boto does (instance
                                    profile, AWS_* variables); AWS_ENDPOINT_URL for MinIO or another S3
    gs://bucket/pag-runs            pip install 'pag[gcs]' (gcsfs); application default credentials

What goes there and when:

* the learner, after each checkpoint: `checkpoints/step_N/…` file by file, then `checkpoints/latest`
  (so `latest` never names a half-copied checkpoint), keeping the newest `keep` remotely too;
* the driver: `config.yaml` (password redacted) at the start — a storage path that cannot be written
  stops the run before any role starts — `metrics.jsonl` and `tb/` as the learner checkpoints, and at
  the end the report (`report.md`, `curves.png`, `samples.png`).

On `--resume`, and when Ray restarts the learner on another node, the newest checkpoint is fetched
from storage when the local run directory lacks it (or has an older one); `pag train --resume` also
fetches `config.yaml` and `metrics.jsonl` when the run directory is not on this node.
"""
from __future__ import annotations

import logging
import posixpath
import shutil
from pathlib import Path
from typing import Any, Optional

from common.errors import UsageError
from common.runs import checkpoint_root, install_checkpoint, latest_checkpoint
from common.urls import redact

log = logging.getLogger("pag.storage")

#: the extra that brings each protocol's fsspec implementation
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageError(UsageError):
    """`run.storage_path` cannot be used: an unknown protocol, a missing extra, no access (exit 2)."""

    label = "run storage"


def _filesystem(uri: str) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:  # fsspec is a dependency of pag; this is a broken install
        raise StorageError(f"run.storage_path needs fsspec: pip install fsspec ({exc})") from exc
    try:
        return url_to_fs(uri)
    except ImportError as exc:
        protocol = uri.split("://", 1)[0]
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'pag[{extra}]'" if extra else f"install the fsspec implementation of {protocol}://"
        raise StorageError(f"run.storage_path {redact(uri)}: {hint} ({exc})") from exc
    except ValueError as exc:
        raise StorageError(f"run.storage_path {redact(uri)}: {exc}") from exc


class RunStorage:
    """The copy of one run directory at `<storage_path>/<run>`."""

    def __init__(self, storage_path: str, run: str) -> None:
        self.fs, root = _filesystem(storage_path)
        self.root = posixpath.join(root.rstrip("/"), run)
        self.uri = redact(storage_path.rstrip("/") + "/" + run)

    @classmethod
    def from_config(cls, cfg: Any, run: Optional[str] = None) -> Optional["RunStorage"]:
        """None when `run.storage_path` is unset."""
        path = cfg.run.storage_path
        return cls(path, run or cfg.run.name) if path else None

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r})"

    # -------------------------------------------------------------- paths

    def remote(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        try:
            return bool(self.fs.exists(self.remote(rel)))
        except Exception as exc:  # noqa: BLE001 — credentials, network: say where
            raise StorageError(f"cannot read {self.uri}/{rel}: {exc}") from exc

    def _put_file(self, local: Path, rel: str) -> None:
        target = self.remote(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        self.fs.put_file(str(local), target)

    # -------------------------------------------------------------- whole files and directories

    def push(self, run_dir: Path, *rels: str) -> list[str]:
        """Copy these files or directories of `run_dir` (those that exist) to storage; what was copied."""
        done = []
        for rel in rels:
            local = Path(run_dir) / rel
            try:
                if local.is_dir():
                    for path in sorted(p for p in local.rglob("*") if p.is_file()):
                        self._put_file(path, posixpath.join(rel, path.relative_to(local).as_posix()))
                elif local.is_file():
                    self._put_file(local, rel)
                else:
                    continue
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 — the fsspec backends raise their own types
                raise StorageError(f"cannot write {local} to {self.uri}/{rel}: {exc}") from exc
            done.append(rel)
        return done

    def pull(self, run_dir: Path, *rels: str) -> list[str]:
        """Copy these files or directories from storage into `run_dir` (overwriting); what was copied."""
        done = []
        for rel in rels:
            source = self.remote(rel)
            try:
                if not self.fs.exists(source):
                    continue
                if self.fs.isdir(source):
                    for path in self.fs.find(source):
                        self._get_file(path, Path(run_dir) / rel / posixpath.relpath(path, source))
                else:
                    self._get_file(source, Path(run_dir) / rel)
            except Exception as exc:  # noqa: BLE001
                raise StorageError(f"cannot read {self.uri}/{rel} into {run_dir}: {exc}") from exc
            done.append(rel)
        return done

    def _get_file(self, source: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")
        self.fs.get_file(source, str(tmp))
        tmp.replace(local)

    # -------------------------------------------------------------- checkpoints

    def latest(self) -> Optional[str]:
        """The name (`step_000040`) of the newest complete checkpoint in storage, or None."""
        pointer = self.remote("checkpoints/latest")
        try:
            if not self.fs.exists(pointer):
                return None
            return self.fs.cat_file(pointer).decode().strip() or None
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot read {self.uri}/checkpoints/latest: {exc}") from exc

    def push_checkpoint(self, run_dir: Path, checkpoint: Path, keep: int = 3) -> str:
        """Copy a complete checkpoint directory, then point `checkpoints/latest` at it, then drop all but
        the newest `keep` checkpoints in storage. Returns the checkpoint's URI (for the log)."""
        name = Path(checkpoint).name
        rel = posixpath.join("checkpoints", name)
        self.push(run_dir, rel)
        try:
            self.fs.pipe_file(self.remote("checkpoints/latest"), name.encode())
            stored = sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.remote("checkpoints"), detail=False))
            for old in [n for n in stored if n.startswith("step_")][:-keep]:
                self.fs.rm(self.remote(posixpath.join("checkpoints", old)), recursive=True)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot update {self.uri}/checkpoints/latest: {exc}") from exc
        return f"{self.uri}/{rel}"

    def pull_checkpoint(self, run_dir: Path) -> Optional[Path]:
        """Make the newest checkpoint in storage the local `latest` unless the local one is as new;
        the local latest checkpoint afterwards (None: neither has one)."""
        run_dir = Path(run_dir)
        name = self.latest()
        local = latest_checkpoint(run_dir)
        if name is None or (local is not None and local.name >= name):
            return local
        root = checkpoint_root(run_dir)
        tmp = root / f".pull_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        source = self.remote(posixpath.join("checkpoints", name))
        try:
            for path in self.fs.find(source):
                self._get_file(path, tmp / posixpath.relpath(path, source))
        except Exception as exc:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"cannot read {self.uri}/checkpoints/{name}: {exc}") from exc
        if not (tmp / "state.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"{self.uri}/checkpoints/{name} is incomplete (no state.json)")
        final = install_checkpoint(tmp, root, name)
        log.info("checkpoint %s fetched from %s", name, self.uri)
        return final
