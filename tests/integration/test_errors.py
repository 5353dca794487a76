"""Errors at the edge (issue 14 item 6): one line on stderr with a documented exit code, the
traceback only with -v; the mapping follows causes, so an error from inside an actor reads the same."""
import pytest

from pag.cli import main
from common.config import ConfigError
from common.data import DatasetError
from common.errors import (EXIT_CLUSTER, EXIT_REDIS, EXIT_USAGE, ClusterError, command_path, describe,
                           run_handled)


pytestmark = pytest.mark.usefixtures("fresh_root_logging")  # these tests call the CLI's main()


def _tracebacks(err: str) -> int:
    """Tracebacks on stderr, not counting logging's own '--- Logging error ---' reports, which appear
    when an earlier in-process test left a handler on its closed capsys stream."""
    return err.count("Traceback (most recent call last)") - err.count("--- Logging error ---")


def _bad_prompt_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a cat on a sofa"}\n{"prompt": 3}\n')
    return path


def test_describe_maps_typed_errors_and_leaves_bugs_alone():
    assert describe(ConfigError("learner.lr: must be > 0")) == (EXIT_USAGE, "config error: learner.lr: must be > 0")
    assert describe(ClusterError("no GPU"))[0] == EXIT_CLUSTER
    assert describe(KeyError("x")) is None
    assert describe(ZeroDivisionError()) is None


def test_describe_follows_the_cause_chain():
    try:
        try:
            raise DatasetError("f.jsonl:2: not an object")
        except DatasetError as inner:
            raise RuntimeError("sampler failed") from inner
    except RuntimeError as outer:
        code, message = describe(outer)
    assert code == EXIT_USAGE and message == "prompt data error: f.jsonl:2: not an object"


def test_redis_errors_name_the_url_without_its_password():
    import redis

    code, message = describe(redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
                             redis_url="redis://pag:s3cret@127.0.0.1:1/0")
    assert code == EXIT_REDIS
    assert "redis://pag:***@127.0.0.1:1/0" in message and "s3cret" not in message and "--redis-url" in message


def test_run_handled_one_line_or_traceback_with_verbose(capsys):
    def boom(args):
        raise ConfigError("field 'x' is wrong")

    assert run_handled(boom, object(), "pag demo") == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["pag demo: config error: field 'x' is wrong (-v for the traceback)"]
    assert run_handled(boom, object(), "pag demo", verbose=True) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("pag demo: config error: field 'x' is wrong")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_handled(lambda args: 1 / 0, object(), "pag demo")


def test_pag_train_bad_prompt_line_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = _bad_prompt_file(tmp_path)
    assert main(["train", f"sampler.datasets=[{bad}]"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert _tracebacks(err) == 0
    line = [ln for ln in err.splitlines() if ln.startswith("pag train:")]
    assert len(line) == 1 and f"{bad}:2" in line[0] and "'initial_prompt' or 'prompt'" in line[0]
    assert not (tmp_path / "runs").exists(), "a run that cannot start leaves no run directory"
    assert main(["train", f"sampler.datasets=[{bad}]", "-v"]) == EXIT_USAGE  # -v after the sub-command too
    assert _tracebacks(capsys.readouterr().err) == 1


def test_unreachable_redis_is_exit_3_naming_the_url(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["buffer", "stats", "--run", "r", "--redis-url", "redis://127.0.0.1:1/0"]) == EXIT_REDIS
    err = capsys.readouterr().err
    assert err.startswith("pag buffer stats: cannot reach Redis at redis://127.0.0.1:1/0") and _tracebacks(err) == 0
    assert main(["train", "--redis-url", "redis://127.0.0.1:1/0"]) == EXIT_REDIS
    err = capsys.readouterr().err
    assert "pag train: cannot reach Redis at redis://127.0.0.1:1/0" in err and _tracebacks(err) == 0


def test_command_path_follows_nested_subcommands():
    from pag.cli import build_parser

    parser = build_parser()
    assert command_path(parser, ["buffer", "stats", "--run", "x"]) == ["buffer", "stats"]
    assert command_path(parser, ["-v", "train", "learner.lr=1"]) == ["train"]
