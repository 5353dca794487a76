"""The paper's published numbers (PAG, CVPR 2025, arXiv:2502.11477), printed beside ours on `sd14`.

What this repository has of them is docs/paper-numbers.md (copied from the project's shared data): a written
summary's figures, averaged "across 4 datasets", and the COCO ablation -- not the paper's per-set Table 1.
`PUBLISHED` transcribes its two tables with the method names mapped to `pag eval`'s labels
(tests/unit/test_eval_metrics.py checks every cell against the markdown). The summary's "diversity" is the
paper's own measure, not necessarily either of ours.
"""
from __future__ import annotations

from typing import Any, Optional

from common.config import Config

#: docs/paper-numbers.md's row names → the labels `pag eval --methods` gives (eval/spec.py)
METHOD_LABELS = {
    "SFT": "sft", "Promptist (PPO)": "ppo", "Rule-based suffix": "rule", "GFlowNets (vanilla)": "tb", "PAG": "pag",
    "PAG, full": "pag", "without flow reactivation (reset)": "pag, no reactivation",
    "without reward-prioritised sampling (PRT)": "pag, no prioritised replay",
    "without progressive reward decomposition (FL)": "pag, no FL (DB)",
}
ALL_SETS = "4 sets (mean)"

PUBLISHED: dict[str, Any] = {
    "source": "a written summary of the PAG paper (Yun et al., CVPR 2025, arXiv 2502.11477), as in "
              "docs/paper-numbers.md: figures averaged across Lexica, DiffusionDB, COCO and ChatGPT, and the COCO "
              "ablation; not the paper's per-set Table 1",
    "table": {
        "sft": {ALL_SETS: {"reward": 0.66, "diversity": 0.14}},
        "ppo": {ALL_SETS: {"reward": 0.70, "diversity": 0.02}},
        "rule": {ALL_SETS: {"reward": 0.59, "diversity": 0.12}},
        "tb": {ALL_SETS: {"reward": 0.81, "diversity": 0.20}},
        "pag": {ALL_SETS: {"reward": 0.83, "diversity": 0.29}, "coco": {"reward": 0.88, "diversity": 0.32}},
        "pag, no reactivation": {"coco": {"reward": 0.70, "diversity": 0.27}},
        "pag, no prioritised replay": {"coco": {"reward": 0.30, "diversity": 0.22}},
        "pag, no FL (DB)": {"coco": {"reward": 0.56, "diversity": 0.16}},
    },
}


#: the summary's zero-shot transfer figure ("PAG 0.95 vs 0.76 for the best baseline"), checked against the markdown
TRANSFER: dict[str, Any] = {
    "source": "a written summary of the PAG paper, as in docs/paper-numbers.md: the policy trained on SD v1.4 "
              "applied zero-shot to SD3 (its target model; a figure for the best baseline, not per method)",
    "table": {"pag": {"SD3 transfer": {"reward": 0.95}}, "best baseline": {"SD3 transfer": {"reward": 0.76}}},
}


def published(cfg: Config) -> Optional[dict[str, Any]]:
    """The reference when the eval's models are the paper's (preset sd14): its main tables when rendering
    with SD v1.4, its zero-shot transfer figure when `model.sd` is another pipeline (`--target-model`); else None."""
    if cfg.preset != "sd14":
        return None
    from common.sections import ModelConfig

    return PUBLISHED if cfg.model.sd == ModelConfig.model_fields["sd"].default else TRANSFER


def paper_table(ref: dict[str, Any]) -> list[str]:
    lines = ["## The paper's published numbers (reference)", ""]
    sets = sorted({s for per_set in ref["table"].values() for s in per_set})
    metrics = sorted({m for per_set in ref["table"].values() for cell in per_set.values() for m in cell})
    lines += [f"Source: {ref.get('source', 'the paper')}", "", "| method | set | " + " | ".join(metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for method, per_set in ref["table"].items():
        for s in sets:
            cell = per_set.get(s)
            if not cell:
                continue
            lines.append(f"| {method} | {s} | " + " | ".join(f"{cell[m]:g}" if m in cell else "—" for m in metrics) + " |")
    return lines
