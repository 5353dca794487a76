"""Mutation testing of the core maths with mutmut (issue 24): run it in passes, then the kill rate per module as JSON.

    pip install -c .ci/constraints.txt -e '.[mutation]'
    python bench/mutants.py               # every pass (each resumes: tested mutants keep their verdict), then report
    python bench/mutants.py --only beam   # one pass (repeatable)
    python bench/mutants.py --fresh       # from scratch (removes the chosen passes' folders)
    python bench/mutants.py --report      # report what is done so far, run nothing
    python bench/mutants.py --recheck     # only the survivors again, after writing tests for them
    python bench/mutants.py --judge NAME --why "..."   # record a survivor as equivalent, with why

The passes are `[tool.pag.mutation.NAME]` in pyproject.toml: each mutates a few modules against the tests written
for them -- run together, a codec mutant would be tested by every learner test that happens to reach the codec.
mutmut reads its settings from the working directory, so each pass runs in mutants.passes/NAME/: the
repository's top level linked in, and a pyproject.toml whose [tool.mutmut] is the shared one with the pass's
modules, tests and time limit. A mutant is *detected* when a test fails (killed) or runs past the limit (timeout:
a mutant that loops would hang the suite). Survivors judged equivalent -- no test can tell them from the
original -- are listed in bench/mutants_equivalent.json with the mutated line and why; one whose line no longer
matches is reported as stale. Per module:

    detection rate = (killed + timeout) / (checked − equivalent),   kill rate = killed / (checked − equivalent)

and every other survivor is listed by name (`cd mutants.passes/PASS && mutmut show NAME` prints its diff). The
last line is the JSON, with each pass's runs (wall-clock seconds, mutants rechecked).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = Path(__file__).with_name("mutants_equivalent.json")
PASSES_DIR = ROOT / "mutants.passes"
PASS_KEYS = {"mutate", "tests", "timeout"}
UNCAUGHT = ("survived", "no tests")  # mutmut's statuses of a mutant no test caught


def _mutmut():
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code
    except ImportError:
        sys.exit("bench/mutants.py needs mutmut: pip install -c .ci/constraints.txt -e '.[mutation]'")
    return get_diff_for_mutant, status_by_exit_code


def passes(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, dict]:
    """The passes in [tool.pag.mutation.NAME], checked: together they mutate exactly [tool.mutmut] only_mutate."""
    tool = tomllib.loads(pyproject.read_text())["tool"]
    table = tool.get("pag", {}).get("mutation", {})
    if not table:
        raise SystemExit(f"{pyproject}: no [tool.pag.mutation.NAME] passes")
    covered: list[str] = []
    for name, spec in table.items():
        if set(spec) != PASS_KEYS:
            raise SystemExit(f"{pyproject}: [tool.pag.mutation.{name}] has keys {sorted(spec)}; "
                             f"expected {sorted(PASS_KEYS)}")
        covered += spec["mutate"]
    wanted = tool["mutmut"]["only_mutate"]
    if sorted(covered) != sorted(wanted):
        raise SystemExit(f"{pyproject}: the passes mutate {sorted(covered)} but [tool.mutmut] only_mutate is "
                         f"{sorted(wanted)}: each module in exactly one pass")
    return table


def _toml_without(text: str, prefixes: tuple[str, ...]) -> str:
    """pyproject.toml's text without the tables whose header starts with one of `prefixes`."""
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("["):
            skipping = line.strip("[] ").startswith(prefixes)
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def prepare(name: str, spec: dict) -> Path:
    """A folder for one pass: the repository's top level linked in, and a pyproject.toml whose [tool.mutmut]
    mutates the pass's modules against its tests (mutmut reads its settings from the working directory)."""
    folder = PASSES_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("mutants", PASSES_DIR.name, "pyproject.toml"):
            continue
        link = folder / entry.name
        if not link.is_symlink():
            link.symlink_to(entry)
    text = (ROOT / "pyproject.toml").read_text()
    base = dict(tomllib.loads(text)["tool"]["mutmut"])
    multiplier, constant = spec["timeout"]
    base.update(only_mutate=spec["mutate"], pytest_add_cli_args_test_selection=spec["tests"],
                timeout_multiplier=float(multiplier), timeout_constant=float(constant))
    settings = "\n".join(f"{key} = {json.dumps(value)}" for key, value in base.items())
    (folder / "pyproject.toml").write_text(_toml_without(text, ("tool.mutmut", "tool.pag.mutation"))
                                           + "\n[tool.mutmut]\n" + settings + "\n")
    return folder


def fastest_first(items: list, mutant: str, stats: Path = Path("mutmut-stats.json")) -> None:
    """Sort a mutant's collected pytest items by mutmut's clean-run durations (`stats`, in the working directory
    mutmut runs the tests from), fastest first, unknown ones last; unchanged unless `mutant` names a mutant
    (mutmut's MUTANT_UNDER_TEST). mutmut stops at a mutant's first failure (-x) but hands its tests over in set
    order, so a mutant that a 0.05 s unit test kills could first wait on a learner test of several seconds."""
    if "__mutmut_" not in mutant or not stats.exists():
        return
    seconds = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: seconds.get(item.nodeid.removeprefix("mutants/"), float("inf")))


def _survivors(folder: Path) -> list[str]:
    """The pass's mutants that no test caught yet (survived, or no test reached them), less the judged ones."""
    _, status_of = _mutmut()
    judged = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    return sorted(name for meta in (folder / "mutants").rglob("*.py.meta")
                  for name, code in json.loads(meta.read_text())["exit_code_by_key"].items()
                  if status_of[code] in UNCAUGHT and name not in judged)


def run(name: str, spec: dict, children: int, recheck: bool = False) -> int:
    """mutmut over one pass (it resumes), or with `recheck` only its survivors again, after new tests (mutmut keeps
    a verdict unless the mutant is named). Either way the pass's copy of tests/ is refreshed and mutmut recollects
    which test reaches which function: mutmut copies the tests at a pass's first run only."""
    folder = prepare(name, spec)
    copy = folder / "mutants"
    if copy.is_dir():  # mutmut copies the tests once and never again: a recheck must see the new ones
        shutil.copytree(ROOT / "tests", copy / "tests", dirs_exist_ok=True)
        (copy / "mutmut-stats.json").unlink(missing_ok=True)  # which tests reach which function, collected anew
    names = _survivors(folder) if recheck and copy.is_dir() else []
    if recheck and not names:
        print(f"pass {name}: no survivors to recheck", file=sys.stderr)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names],
                         cwd=folder, env=env)
    seconds = round(time.monotonic() - start, 1)
    log = folder / "runs.json"
    runs = json.loads(log.read_text()) if log.exists() else []
    log.write_text(json.dumps(runs + [{"seconds": seconds, "rc": rc, "children": children,
                                       "rechecked": len(names) if recheck else None}]))
    print(f"pass {name}: mutmut run exited {rc} after {seconds} s", file=sys.stderr)
    return rc


def _added_line(diff: str) -> str:
    return next((line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")),
                "")


def _source(folder: Path, meta: Path) -> str:
    """The mutated module a pass's `.py.meta` file describes, relative to the pass folder."""
    return str(meta.relative_to(folder / "mutants"))[: -len(".meta")]


def _module(source: str, meta: Path, equivalent: dict, stale: list) -> dict:
    get_diff, status_of = _mutmut()
    verdicts = json.loads(meta.read_text())["exit_code_by_key"]
    counts = Counter(status_of[code] for code in verdicts.values())
    survivors, judged = [], 0
    for name, code in sorted(verdicts.items()):
        if status_of[code] not in UNCAUGHT:
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
    return {"mutants": len(verdicts), "checked": checked, "killed": counts["killed"], "timeout": counts["timeout"],
            "survived": counts["survived"], "no_tests": counts["no tests"], "equivalent": judged,
            "detection_rate": round(detected / max(checked - judged, 1), 3) if checked else None,
            "kill_rate": round(counts["killed"] / max(checked - judged, 1), 3) if checked else None,
            "survivors": survivors}


def judge(name: str, why: str) -> dict:
    """Record survivor `name` as equivalent in bench/mutants_equivalent.json, with its mutated line and `why`."""
    get_diff, _ = _mutmut()
    for meta in sorted(PASSES_DIR.glob("*/mutants/**/*.py.meta")):
        if name in json.loads(meta.read_text())["exit_code_by_key"]:
            folder = PASSES_DIR / meta.relative_to(PASSES_DIR).parts[0]
            os.chdir(folder)
            entry = {"line": _added_line(get_diff(name, path=_source(folder, meta))), "why": why}
            os.chdir(ROOT)
            equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
            equivalent[name] = entry
            EQUIVALENT.write_text(json.dumps(dict(sorted(equivalent.items())), indent=1, ensure_ascii=False) + "\n")
            return entry
    raise SystemExit(f"--judge {name}: no such mutant in {PASSES_DIR}")


def report() -> dict:
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    modules, runs_of, stale = {}, {}, []
    for folder in sorted(p for p in PASSES_DIR.glob("*") if (p / "mutants").is_dir()):
        os.chdir(folder)  # mutmut finds a mutant's source relative to the working directory
        for meta in sorted((folder / "mutants").rglob("*.py.meta")):
            source = _source(folder, meta)
            modules[source] = {"pass": folder.name, **_module(source, meta, equivalent, stale)}
        runs = folder / "runs.json"
        runs_of[folder.name] = json.loads(runs.read_text()) if runs.exists() else []
    os.chdir(ROOT)
    keys = ("mutants", "checked", "killed", "timeout", "survived", "no_tests", "equivalent")
    total = {key: sum(m[key] for m in modules.values()) for key in keys}
    judged = max(total["checked"] - total["equivalent"], 1)
    total["detection_rate"] = round((total["killed"] + total["timeout"]) / judged, 3)
    total["kill_rate"] = round(total["killed"] / judged, 3)
    return {"tool": "mutmut", "modules": modules, "total": total, "runs_per_pass": runs_of,
            "stale_equivalents": stale}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="report what is done so far; run nothing")
    parser.add_argument("--fresh", action="store_true", help="remove the passes' mutants first (test every one again)")
    parser.add_argument("--only", action="append", metavar="PASS", help="run this pass only (repeatable)")
    parser.add_argument("--recheck", action="store_true",
                        help="run only the survivors of the chosen passes again (after writing tests for them)")
    parser.add_argument("--judge", metavar="MUTANT",
                        help="record this survivor as equivalent (with --why); run nothing")
    parser.add_argument("--why", help="why no test can tell the --judge mutant from the original")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    args = parser.parse_args(argv)
    _mutmut()
    if args.judge:
        if not args.why:
            parser.error("--judge needs --why: the reason no test can tell the mutant from the original")
        print(json.dumps(judge(args.judge, args.why), ensure_ascii=False))
        return 0
    table = passes()
    chosen = args.only or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        parser.error(f"--only {unknown[0]}: no such pass; the passes are {', '.join(table)}")
    if args.fresh:
        for name in chosen:
            shutil.rmtree(PASSES_DIR / name, ignore_errors=True)
    if not args.report:
        for name in chosen:
            run(name, table[name], args.children, recheck=args.recheck)
    if not any(PASSES_DIR.glob("*/mutants")):
        sys.exit("nothing checked yet: run python bench/mutants.py without --report first")
    out = report()
    for source, m in out["modules"].items():
        rate = "-" if m["detection_rate"] is None else f"{m['detection_rate']:.1%}"
        kills = "-" if m["kill_rate"] is None else f"{m['kill_rate']:.1%}"
        print(f"{source:32s} {m['checked']:4d}/{m['mutants']:<4d} checked  detected {rate:>6s}  killed {kills:>6s}  "
              f"survivors {len(m['survivors'])}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
