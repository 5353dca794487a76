"""The SFT checkpoint a run starts from: `model.sft_checkpoint`, or tiny's automatic SFT, trained
once and cached under ``$PAG_CACHE/sft/<preset>-<hash>`` (default ``~/.cache/pag``).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from common.config import Config, ConfigError
from common.data import cache_root
from sft.pairs import Pair, pairs_for
from sft.train import SFT_META, Log, SFTSettings, settings_for, sft_hash, train_sft

logger = logging.getLogger(__name__)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) for the `with` block; without fcntl, rely on the atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_sft(cfg: Config) -> None:
    """Stop before anything starts when a pretrained policy has no SFT checkpoint.

    Falling back to vanilla GPT-2 for the policy *and* the reference changes the target distribution
    itself (R(y|x) · p_ref(y|x)^(1/γ)), so the run would not be the paper's. `tiny` trains its own;
    `sd14-arch` (random weights, speed only) needs none."""
    model = cfg.model
    if model.sft_checkpoint or model.kind != "pretrained":
        return
    raise ConfigError(
        f"model.sft_checkpoint is not set for preset {cfg.preset!r}: the policy and the frozen reference must start "
        "from an SFT checkpoint, vanilla GPT-2 changes the target distribution. Get one with "
        f"`pag sft --preset {cfg.preset}` (trains GPT-2 on the packaged plain -> engineered pairs and prints the "
        "checkpoint directory), or use the official reference, Promptist's SFT model (from microsoft/LMOps promptist, "
        "a Hugging Face directory or hub id; the official PAG feeds it 'x Rephrase:\\n', model.input_format=pag, the "
        "default; model.input_format=promptist is Promptist's own 'x Rephrase:'), then pass model.sft_checkpoint=DIR.")


def ensure_sft(cfg: Config, *, log: Log = logger.info) -> str:
    """The checkpoint the policy and reference start from.

    `model.sft_checkpoint` set: that. tiny without one: ``$PAG_CACHE/sft/tiny-<hash>``, trained first if
    missing (a file lock makes concurrent callers wait for one training run). A pretrained policy
    (sd14) without one: ConfigError (`require_sft`); sd14-arch: `model.policy` (random weights).
    """
    model = cfg.model
    if model.sft_checkpoint:
        return model.sft_checkpoint
    require_sft(cfg)
    if model.kind != "tiny":
        return model.policy
    pairs = pairs_for(cfg)
    out_dir = default_out_dir(cfg, pairs, settings_for(cfg))
    done = out_dir / SFT_META
    if done.is_file():
        return str(out_dir)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not done.is_file():  # another process may have finished while we waited
            log(f"no cached SFT checkpoint for the tiny policy: training one into {out_dir} (once)")
            train_sft(cfg, out_dir, log=log, pairs=pairs)
    return str(out_dir)


def default_out_dir(cfg: Config, pairs: Sequence[Pair], settings: SFTSettings) -> Path:
    return cache_root() / "sft" / f"{cfg.preset}-{sft_hash(cfg, pairs, settings)}"
