"""Which modes a run's rewrites name, over its course: `python -m world.coverage EXPORT.jsonl`.

EXPORT.jsonl is a run's replay buffer as `pag buffer export` writes it (one trajectory a line, with
"response", "log_reward" and "created_at"). The trajectories are put in the order they were scored and
cut into `--parts` equal parts; for each part the JSON output gives the share of rewrites whose
modifiers name all three values of some mode (complete), two (within one value), per mode, and the
mean log-reward. It reads the words, not the pictures: what the policy asked for, which the pictures
follow for backgrounds, monochrome, neon, spotlight and stripes, and barely for compositions and
pastel (world/README.md, "What a word steers").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from world.corpus import named_values, names_harm
from world.taste import MODES


def read_export(path: Path) -> list[dict[str, Any]]:
    """The trajectories of a `pag buffer export` file, oldest first; a bad line is named."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"response": str(row["response"]), "log_reward": float(row["log_reward"]),
                         "created_at": float(row.get("created_at", number))})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a trajectory of `pag buffer export` "
                             f"(needs response, log_reward): {exc}") from None
    if not rows:
        raise ValueError(f"{path}: no trajectories")
    return sorted(rows, key=lambda r: r["created_at"])


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    counts = [named_values(r["response"]) for r in rows]
    best = np.array([max(c.values()) for c in counts])
    return {
        "rewrites": len(rows),
        "complete": round(float((best == 3).mean()), 4),
        "within_one": round(float((best == 2).mean()), 4),
        "complete_by_mode": {m: round(float(np.mean([c[m] == 3 for c in counts])), 4) for m in MODES},
        "harmful": round(float(np.mean([names_harm(r["response"]) for r in rows])), 4),
        "mean_log_reward": round(float(np.mean([r["log_reward"] for r in rows])), 4),
    }


def coverage(rows: Sequence[dict[str, Any]], parts: int = 4) -> list[dict[str, Any]]:
    """`summarise` of each of `parts` consecutive, equal slices of the (time-ordered) rows."""
    if parts < 1 or parts > len(rows):
        raise ValueError(f"--parts must be between 1 and the number of trajectories ({len(rows)}), got {parts}")
    return [summarise([rows[i] for i in idx]) for idx in np.array_split(np.arange(len(rows)), parts)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m world.coverage", description=__doc__.split("\n\n")[0],
                                epilog="Make the export with: pag buffer export FILE.jsonl --run RUN --redis-url URL")
    p.add_argument("export", type=Path, help="a run's `pag buffer export` file")
    p.add_argument("--parts", type=int, default=4, help="consecutive parts of the run to compare (default 4)")
    args = p.parse_args(argv)
    try:
        print(json.dumps(coverage(read_export(args.export), args.parts), indent=1))
    except (OSError, ValueError) as exc:
        p.exit(2, f"python -m world.coverage: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
