"""The house's structure holds by itself: imports point down the layers in pyproject.toml with no
circles (import-linter's own `lint-imports`), modules stay under 400 lines and functions under 60
unless their docstring gives the reason (STYLE.md)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pag", "serving", "driver", "eval", "ipgo", "sft", "learner", "actors", "buffer", "scoring", "world",
            "common")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: a long function is allowed when its docstring says why it reads best in one piece
REASON_MARK = "one piece"


def _lint_imports() -> list[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports (import-linter) is not installed: `pip install -e '.[test]'`")
    return [found]


def test_import_contracts_are_kept():
    proc = subprocess.run([*_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_role_package_is_in_the_contract():
    """A new top-level package must be placed in a layer, or the contract would not see it."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert sorted(config["root_packages"]) == sorted(PACKAGES)
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk == set(PACKAGES), on_disk ^ set(PACKAGES)


def test_modules_and_functions_stay_small():
    too_long = []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and REASON_MARK not in doc:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {length} lines (function limit "
                                    f"{MAX_FUNCTION_LINES}; or say in its docstring why it reads best in {REASON_MARK})")
    assert not too_long, "\n".join(too_long)
