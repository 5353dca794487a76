"""`pag train`'s run: which config, which run directory, and what is written there with no secret in it.

* **Config.** The preset (or, on `--resume`, the run's config.yaml), a `--config` file, `key=value`
  overrides, then the flags. `buffer.redis_url` not set by any of them comes from `$PAG_REDIS_URL`:
  on a cluster the URL lives in the head's environment (a Kubernetes Secret, a 0600 file on a
  `ray up` head), not in the job's entrypoint, which Ray keeps in the job's metadata.
* **No secret on disk.** `config.yaml` and the report's "Resolved config" show every URL with its
  password as `***` (`common.urls.redact_tree`). `--resume` therefore needs the Redis URL again —
  `--redis-url` or `$PAG_REDIS_URL` — when the saved one had a password, and says so.
* **Run storage.** With `run.storage_path`, a new run's name must be free there too, and `--resume
  --run-name X` on a node without the run directory fetches config.yaml and the metrics from it (the
  learner fetches its checkpoint itself; common/storage.py).
"""
from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from buffer.connection import REDIS_URL_ENV
from common.config import Config, ConfigError, load_config
from common.storage import RunStorage
from common.urls import is_redacted, redact_tree

#: what the driver copies to run storage: at the start, as the learner checkpoints, at the end
START_FILES = ("config.yaml",)
PROGRESS_FILES = ("metrics.jsonl", "tb")
REPORT_FILES = ("report.md", "curves.png", "samples.png")


# ---------------------------------------------------------------------- what is written

def redacted_config(cfg: Config) -> dict[str, Any]:
    """The config tree as written to disk: every URL's password redacted."""
    return redact_tree(cfg.to_dict())


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(redacted_config(cfg), sort_keys=False))


# ---------------------------------------------------------------------- the config

def flag_overrides(args) -> list[str]:
    """The flags as `key=value` overrides (an empty value stays an empty string, not None)."""
    pairs = [("learner.steps", args.steps), ("sampler.num_samplers", args.samplers),
             ("reward.num_workers", args.reward_workers), ("run.name", args.run_name),
             ("run.runs_dir", args.runs_dir), ("buffer.redis_url", args.redis_url),
             ("run.ray_address", args.ray_address), ("run.storage_path", getattr(args, "storage_path", None))]
    return [f"{k}={v}" if v != "" else f'{k}=""' for k, v in pairs if v is not None]


def env_redis_url(cfg: Config, environ: Mapping[str, str]) -> Config:
    """`$PAG_REDIS_URL` when nothing else set buffer.redis_url, or the set one is a redacted copy."""
    url = environ.get(REDIS_URL_ENV)
    if url and (cfg.buffer.redis_url is None or is_redacted(cfg.buffer.redis_url)):
        cfg.buffer.redis_url = url
    return cfg


def storage_path_of(args) -> Optional[str]:
    """run.storage_path from --storage-path or a key=value override, before any config is loaded."""
    found = [o.split("=", 1)[1] for o in args.overrides if o.startswith("run.storage_path=")]
    return getattr(args, "storage_path", None) or (found[-1] if found else None)


# ---------------------------------------------------------------------- the run directory

def resolve_run(args, environ: Mapping[str, str] = os.environ) -> tuple[Config, Path]:
    """Config and run directory: a new run, or (--resume) the saved config of an existing one.
    Under a Ray job a relative runs dir is placed under ~/pag (common/cluster.py), said on stderr."""
    if args.resume:
        return _resumed_run(args, environ)
    from common.cluster import resolve_runs_dir

    overrides = list(args.overrides) + flag_overrides(args)
    cfg = env_redis_url(load_config(args.preset, args.config_file, overrides, method=args.method), environ)
    name = cfg.run.name or f"{cfg.preset}__{cfg.run.seed}__{datetime.now():%Y%m%d-%H%M%S}"
    cfg.run.name = name
    runs_dir, note = resolve_runs_dir(cfg.run.runs_dir, environ)
    if note:
        print(f"pag train: {note}", file=sys.stderr)
    run_dir = runs_dir / name
    if (run_dir / "config.yaml").exists():
        raise ConfigError(f"run directory {run_dir} already exists: pass --resume to continue it, "
                          "or another --run-name")
    storage = RunStorage.from_config(cfg)  # an unusable storage path (a missing extra) stops here
    if storage is not None and storage.exists("config.yaml"):
        raise ConfigError(f"run {name!r} already exists in run storage ({storage.uri}): pass --resume to "
                          "continue it, or another --run-name")
    return cfg, run_dir


def _resumed_run(args, environ: Mapping[str, str]) -> tuple[Config, Path]:
    from common.cluster import resolve_runs_dir

    if getattr(args, "method", None):
        raise ConfigError("--method starts a new run; a resumed run keeps the run.method of its config.yaml")
    runs_dir, note = resolve_runs_dir(args.runs_dir or "runs", environ)
    if note:
        print(f"pag train: {note}", file=sys.stderr)
    if args.run_name:
        run_dir = runs_dir / args.run_name
        storage_path = storage_path_of(args)
        if not (run_dir / "config.yaml").is_file() and storage_path:
            storage = RunStorage(storage_path, args.run_name)  # this node lacks the run: take it from storage
            if storage.exists("config.yaml"):
                storage.pull(run_dir, "config.yaml", *PROGRESS_FILES)
                print(f"pag train: run {args.run_name} fetched from {storage.uri}", file=sys.stderr)
    else:
        candidates = sorted((p for p in runs_dir.glob("*/config.yaml")), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"--resume: no run in {runs_dir}/ to resume; give --run-name")
        run_dir = candidates[-1].parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir}/config.yaml not found; is {run_dir.name!r} a run name?")
    preset = yaml.safe_load((run_dir / "config.yaml").read_text()).get("preset", args.preset)
    overrides = list(args.overrides) + flag_overrides(args) + [f"run.name={run_dir.name}"]
    cfg = env_redis_url(load_config(preset, run_dir / "config.yaml", overrides), environ)
    if cfg.buffer.redis_url and is_redacted(cfg.buffer.redis_url):
        raise ConfigError(f"--resume: config.yaml keeps the run's Redis URL without its password "
                          f"({cfg.buffer.redis_url}); give it again with --redis-url or ${REDIS_URL_ENV}")
    return cfg, run_dir
