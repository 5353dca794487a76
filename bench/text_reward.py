"""The offline text reward's two numbers (scoring/style.py), as JSON: the style classifier's held-out accuracy
and the calibration of the relevance_text threshold.

    PYTHONPATH=$PWD python bench/text_reward.py [--out text_reward.json]

Calibration: sentence cosines (all-MiniLM-L6-v2) of matched (plain, engineered) SFT pairs
(`sft.pairs.build_pairs` of the default sampler.datasets, seed 0) against mismatched pairs (each plain
prompt with the engineered prompt of the pair `shift` places on). A threshold between the matched 5th
percentile and the mismatched 99th percentile penalises almost no real rewrite and almost every rewrite
that lost its subject.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run(shift: int = 97) -> dict:
    from scoring.text_scorers import encoder_id
    from scoring.scorers import ScorerContext
    from common.config import load_config
    from scoring.style import TEXT_THRESHOLD, load_or_fit_style, style_data
    from sft.pairs import build_pairs

    cfg = load_config("tiny-proxy")
    ctx = ScorerContext(model=cfg.model)
    encoder = ctx.sentence_encoder()
    start = time.perf_counter()
    model = load_or_fit_style(encoder.encode, encoder_id(ctx))
    texts, labels = style_data("eval")
    accuracy = model.accuracy(encoder.encode(texts), labels)

    pairs = build_pairs(cfg.sampler.datasets, 0)
    plain = encoder.encode([x for x, _ in pairs])
    engineered = encoder.encode([y for _, y in pairs])
    matched = (plain * engineered).sum(-1)
    mismatched = (plain * np.roll(engineered, shift, axis=0)).sum(-1)
    pct = lambda a, q: round(float(np.percentile(a, q)), 4)  # noqa: E731
    return {
        "encoder": encoder_id(ctx), "style": {**model.meta, "heldout_accuracy_recomputed": round(accuracy, 4)},
        "relevance_text": {
            "pairs": len(pairs), "threshold": TEXT_THRESHOLD,
            "matched": {"p1": pct(matched, 1), "p5": pct(matched, 5), "p50": pct(matched, 50)},
            "mismatched": {"p50": pct(mismatched, 50), "p95": pct(mismatched, 95), "p99": pct(mismatched, 99)},
            "matched_below_threshold": round(float((matched < TEXT_THRESHOLD).mean()), 4),
            "mismatched_above_threshold": round(float((mismatched >= TEXT_THRESHOLD).mean()), 4),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = run()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
