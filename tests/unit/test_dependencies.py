"""Every third-party import the code makes is a main dependency in pyproject.toml, unless it sits in a `try`
(an optional feature that fails with a clear error): the static half of issue 19's "pip install -e . without
extras" bug class (scipy used through IPGO but only pulled in by the test extra). What it cannot see: a
package a dependency imports without declaring it (diffusers' LMS scheduler and scipy), which is why scipy
is declared by hand with its reason."""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

from tests.unit.test_layers import PACKAGES, ROOT


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _main_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normal(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]) for req in project["dependencies"]}


def _imports(tree: ast.AST):
    """(top-level module, line, inside a try) of every absolute import."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        up, guarded = node, False
        while up in parents and not guarded:
            up = parents[up]
            guarded = isinstance(up, ast.Try)
        for name in names:
            yield name.split(".")[0], node.lineno, guarded


def test_every_unguarded_third_party_import_is_a_main_dependency():
    declared, owners = _main_dependencies(), metadata.packages_distributions()
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for top, line, guarded in _imports(ast.parse(path.read_text())):
                if guarded or top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
                    continue
                dists = {_normal(d) for d in owners.get(top, [top])}
                if not dists & declared:
                    missing.append(f"{path.relative_to(ROOT)}:{line} imports {top} ({', '.join(sorted(dists))})")
    assert not missing, "declare these in pyproject.toml [project].dependencies, or put the import behind a " \
                        "`try` with a clear error:\n" + "\n".join(missing)
