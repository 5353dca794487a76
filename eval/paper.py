"""The paper's published numbers (PAG, CVPR 2025), printed beside ours on `sd14` as a reference."""
from __future__ import annotations

from typing import Any, Optional

from common.config import Config

#: filled from the paper's main table; empty until transcribed (then `published` returns it on sd14)
PUBLISHED: dict[str, Any] = {}


def published(cfg: Config) -> Optional[dict[str, Any]]:
    """The reference numbers when the eval's models are the paper's (preset sd14), else None."""
    return (PUBLISHED or None) if cfg.preset == "sd14" else None


def paper_table(ref: dict[str, Any]) -> list[str]:
    return ["## The paper's published numbers (reference)", "", ref.get("note", "")]
