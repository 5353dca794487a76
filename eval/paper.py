"""The paper's published numbers (PAG, CVPR 2025, arXiv:2502.11477 Table 1), printed beside ours on `sd14`.

Not transcribed yet: `PUBLISHED` is empty, so an sd14 report says where the reference numbers are instead
of printing any. To add them: `PUBLISHED = {"source": "...", "table": {method: {set: {metric: value}}}}`
with the paper's method and set names mapped to ours (plain, rule, sft, ppo/promptist, tb, pag).
"""
from __future__ import annotations

from typing import Any, Optional

from common.config import Config

PUBLISHED: dict[str, Any] = {}


def published(cfg: Config) -> Optional[dict[str, Any]]:
    """The reference when the eval's models are the paper's (preset sd14), else None."""
    if cfg.preset != "sd14":
        return None
    return PUBLISHED or {"note": "The paper's published numbers (Table 1 of arXiv:2502.11477) are not transcribed "
                                 "in this repository yet (eval/paper.py): compare with the paper by hand."}


def paper_table(ref: dict[str, Any]) -> list[str]:
    lines = ["## The paper's published numbers (reference)", ""]
    if "table" not in ref:
        return lines + [ref.get("note", "")]
    sets = sorted({s for per_set in ref["table"].values() for s in per_set})
    metrics = sorted({m for per_set in ref["table"].values() for cell in per_set.values() for m in cell})
    lines += [f"Source: {ref.get('source', 'the paper')}", "", "| method | set | " + " | ".join(metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for method, per_set in ref["table"].items():
        for s in sets:
            cell = per_set.get(s, {})
            lines.append(f"| {method} | {s} | " + " | ".join(f"{cell[m]:g}" if m in cell else "—" for m in metrics) + " |")
    return lines
