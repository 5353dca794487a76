"""Mutation testing of the core maths with mutmut (issue 24): run it, then the kill rate per module as JSON.

    pip install -c .ci/constraints.txt -e '.[mutation]'
    python bench/mutants.py               # `mutmut run` (it resumes: tested mutants keep their verdict), then report
    python bench/mutants.py --fresh       # from scratch (removes mutants/)
    python bench/mutants.py --report      # report what is done so far, run nothing

The modules mutated and the tests run are `[tool.mutmut]` in pyproject.toml. A mutant is *detected* when a test
fails (killed) or runs past mutmut's time limit (timeout: a mutant that loops would hang the suite). Survivors
judged equivalent -- no test can tell them from the original -- are listed in bench/mutants_equivalent.json with
the mutated line and why; one whose line no longer matches is reported as stale. Per module:

    detection rate = (killed + timeout) / (checked − equivalent)

and every other survivor is listed by name (`mutmut show NAME` prints its diff). The last line is the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = Path(__file__).with_name("mutants_equivalent.json")


def _mutmut():
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code
    except ImportError:
        sys.exit("bench/mutants.py needs mutmut: pip install -c .ci/constraints.txt -e '.[mutation]'")
    return get_diff_for_mutant, status_by_exit_code


def run(children: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.call([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)], cwd=ROOT,
                           env=env)


def _added_line(diff: str) -> str:
    return next((line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")),
                "")


def report() -> dict:
    get_diff, status_of = _mutmut()
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    modules, stale = {}, []
    os.chdir(ROOT)
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(status_of[code] for code in verdicts.values())
        survivors, judged = [], 0
        for name, code in sorted(verdicts.items()):
            if status_of[code] not in ("survived", "no tests"):
                continue
            known = equivalent.get(name)
            if known and known["line"] == _added_line(get_diff(name, path=source)):
                judged += 1
            else:
                survivors.append(name)
                if known:
                    stale.append(name)
        checked = len(verdicts) - counts["not checked"]
        detected = counts["killed"] + counts["timeout"]
        modules[source] = {"mutants": len(verdicts), "checked": checked, "killed": counts["killed"],
                           "timeout": counts["timeout"], "survived": counts["survived"], "no_tests": counts["no tests"],
                           "equivalent": judged,
                           "detection_rate": round(detected / max(checked - judged, 1), 3) if checked else None,
                           "survivors": survivors}
    total = {key: sum(m[key] for m in modules.values())
             for key in ("mutants", "checked", "killed", "timeout", "survived", "no_tests", "equivalent")}
    total["detection_rate"] = round((total["killed"] + total["timeout"])
                                    / max(total["checked"] - total["equivalent"], 1), 3)
    return {"tool": "mutmut", "modules": modules, "total": total, "stale_equivalents": stale}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="report what is done so far; run nothing")
    parser.add_argument("--fresh", action="store_true", help="remove mutants/ first (every mutant tested again)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    args = parser.parse_args(argv)
    _mutmut()
    if args.fresh:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    if not args.report:
        rc = run(args.children)
        if rc:
            print(f"mutmut run exited {rc}", file=sys.stderr)
    if not (ROOT / "mutants").is_dir():
        sys.exit("no mutants/ yet: run python bench/mutants.py without --report first")
    out = report()
    for source, m in out["modules"].items():
        rate = "-" if m["detection_rate"] is None else f"{m['detection_rate']:.1%}"
        print(f"{source:32s} {m['checked']:4d}/{m['mutants']:<4d} checked  detected {rate:>6s}  "
              f"survivors {len(m['survivors'])}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
