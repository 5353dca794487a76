"""bench/mutants.py's passes (issue 24): read from pyproject.toml, checked, and laid out for mutmut."""
import tomllib

import pytest

from bench import mutants

BASE = '''[tool.pytest.ini_options]
pythonpath = ["."]

[tool.mutmut]
source_paths = ["learner", "common"]
only_mutate = ["learner/losses.py", "common/schedules.py"]
pytest_add_cli_args = ["-m", "not slow"]

[tool.pag.mutation.maths]
mutate = ["learner/losses.py"]
tests = ["tests/unit/test_losses.py"]
timeout = [3, 10]
'''


def _write(tmp_path, text):
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    return path


def test_the_projects_passes_mutate_each_module_once():
    table = mutants.passes()
    modules = [module for spec in table.values() for module in spec["mutate"]]
    assert len(modules) == len(set(modules)) == 10
    assert all(spec["tests"] and all(t.startswith("tests/") for t in spec["tests"]) for spec in table.values())


def test_a_module_in_no_pass_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"only_mutate is \['common/schedules.py', 'learner/losses.py'\]"):
        mutants.passes(_write(tmp_path, BASE))


def test_a_pass_with_a_wrong_key_is_named(tmp_path):
    text = BASE.replace('only_mutate = ["learner/losses.py", "common/schedules.py"]',
                        'only_mutate = ["learner/losses.py"]').replace("timeout = [3, 10]", "limit = 3")
    with pytest.raises(SystemExit, match=r"\[tool.pag.mutation.maths\] has keys \['limit', 'mutate', 'tests'\]"):
        mutants.passes(_write(tmp_path, text))


def test_without_drops_only_the_named_tables():
    text = mutants._toml_without(BASE, ("tool.mutmut", "tool.pag.mutation"))
    assert tomllib.loads(text) == {"tool": {"pytest": {"ini_options": {"pythonpath": ["."]}}}}


def test_prepare_writes_the_pass_settings_over_the_shared_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(mutants, "PASSES_DIR", tmp_path / "passes")
    spec = {"mutate": ["common/beam_search.py"], "tests": ["tests/unit/test_beam_search.py"], "timeout": [4, 7]}
    folder = mutants.prepare("beam", spec)
    settings = tomllib.loads((folder / "pyproject.toml").read_text())
    mutmut = settings["tool"]["mutmut"]
    assert mutmut["only_mutate"] == spec["mutate"]
    assert mutmut["pytest_add_cli_args_test_selection"] == spec["tests"]
    assert (mutmut["timeout_multiplier"], mutmut["timeout_constant"]) == (4.0, 7.0)
    shared = tomllib.loads((mutants.ROOT / "pyproject.toml").read_text())["tool"]
    assert mutmut["process_isolation"] == shared["mutmut"]["process_isolation"]
    assert "mutation" not in settings["tool"].get("pag", {})
    assert settings["tool"]["pytest"] == shared["pytest"]
    assert (folder / "learner").resolve() == mutants.ROOT / "learner"
    assert not (folder / ".git").exists() and not (folder / "passes").exists()
    mutants.prepare("beam", spec)  # a second time: the links are kept


class _Item:
    def __init__(self, nodeid):
        self.nodeid = nodeid


def test_a_mutants_tests_run_fastest_first_and_unknown_ones_last(tmp_path):
    stats = tmp_path / "mutmut-stats.json"
    stats.write_text('{"duration_by_test": {"t.py::slow": 3.0, "t.py::fast": 0.1, "t.py::mid": 1.0}}')
    items = [_Item(n) for n in ("t.py::new", "t.py::slow", "mutants/t.py::mid", "t.py::fast")]
    mutants.fastest_first(items, "learner.losses.x_tb__mutmut_3", stats)
    assert [i.nodeid for i in items] == ["t.py::fast", "mutants/t.py::mid", "t.py::slow", "t.py::new"]


@pytest.mark.parametrize("mutant", ["", "stats", "fail"])
def test_outside_a_mutants_run_the_order_is_left_alone(tmp_path, mutant):
    stats = tmp_path / "mutmut-stats.json"
    stats.write_text('{"duration_by_test": {"t.py::slow": 3.0, "t.py::fast": 0.1}}')
    items = [_Item("t.py::slow"), _Item("t.py::fast")]
    mutants.fastest_first(items, mutant, stats)
    assert [i.nodeid for i in items] == ["t.py::slow", "t.py::fast"]
    mutants.fastest_first(items, "learner.losses.x_tb__mutmut_3", tmp_path / "absent.json")
    assert [i.nodeid for i in items] == ["t.py::slow", "t.py::fast"]
