"""Run storage that outlives a node (issue 25): `run.storage_path` through fsspec — a file:// URI
(a shared filesystem) and fsspec's in-memory filesystem here, s3:// against a local S3 in
tests/integration/test_storage_s3.py — and what `pag train` writes: config.yaml with the password
redacted, $PAG_REDIS_URL as the URL's source, `--resume` from storage on a node without the run."""
import importlib.util
import uuid
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, load_config
from common.runs import latest_checkpoint
from common.storage import RunStorage, StorageError


def _checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    (path / "policy").mkdir(parents=True)
    (path / "policy" / "model.safetensors").write_bytes(b"w" * 100 + bytes([step]))
    (path / "state.json").write_text(f'{{"step": {step}}}')
    (run_dir / "checkpoints" / "latest").write_text(path.name)
    return path


@pytest.fixture(params=["file", "memory"])
def storage_path(request, tmp_path):
    return (tmp_path / "store").as_uri() if request.param == "file" else f"memory://pag-{uuid.uuid4().hex[:8]}/runs"


def test_checkpoints_go_to_storage_and_come_back_on_another_node(storage_path, tmp_path):
    node_a, node_b = tmp_path / "a" / "r1", tmp_path / "b" / "r1"
    storage = RunStorage(storage_path, "r1")
    assert storage.latest() is None and storage.pull_checkpoint(node_b) is None
    for step in (2, 4, 6, 8):
        storage.push_checkpoint(node_a, _checkpoint(node_a, step), keep=2)
    assert storage.latest() == "step_000008"
    kept = sorted(Path(p).name for p in storage.fs.ls(storage.remote("checkpoints"), detail=False))
    assert kept == ["latest", "step_000006", "step_000008"], "the newest `keep`, as on disk"

    restored = storage.pull_checkpoint(node_b)  # the learner restarted on node b
    assert restored == node_b / "checkpoints" / "step_000008" == latest_checkpoint(node_b)
    assert (restored / "policy" / "model.safetensors").read_bytes() == b"w" * 100 + bytes([8])
    _checkpoint(node_b, 10)
    assert storage.pull_checkpoint(node_b).name == "step_000010", "a newer local checkpoint is kept"


def test_run_files_push_and_pull(storage_path, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "tb" / "events.out.tfevents.1").write_bytes(b"\x00\x01")
    (run_dir / "config.yaml").write_text("run: {name: r1}\n")
    storage = RunStorage(storage_path, "r1")
    assert storage.push(run_dir, "config.yaml", "tb", "report.md") == ["config.yaml", "tb"], "absent ones skipped"
    assert storage.exists("config.yaml") and not storage.exists("report.md")
    other = tmp_path / "other"
    assert storage.pull(other, "config.yaml", "tb", "metrics.jsonl") == ["config.yaml", "tb"]
    assert (other / "tb" / "events.out.tfevents.1").read_bytes() == b"\x00\x01"


def test_a_protocol_without_its_package_names_the_extra():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(StorageError, match=r"pip install 'pag\[gcs\]'"):
        RunStorage("gs://bucket/runs", "r1")


def test_an_unknown_protocol_is_a_storage_error():
    with pytest.raises(StorageError, match="run.storage_path"):
        RunStorage("nosuchproto://bucket/runs", "r1")


# ---------------------------------------------------------------------- pag train's run resolution

def _args(*argv: str):
    from pag.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_the_redis_url_comes_from_the_flag_then_the_config_then_the_environment(tmp_path):
    from driver.runfiles import resolve_run

    env = {"PAG_REDIS_URL": "redis://pag:env@10.0.0.5:6379/0", "HOME": str(tmp_path)}
    runs = ["--runs-dir", str(tmp_path / "runs")]
    cfg, _ = resolve_run(_args(*runs, "--run-name", "a"), environ=env)
    assert cfg.buffer.redis_url == env["PAG_REDIS_URL"]
    cfg, _ = resolve_run(_args(*runs, "--run-name", "b", "buffer.redis_url=redis://o:ov@h:1/0"), environ=env)
    assert cfg.buffer.redis_url == "redis://o:ov@h:1/0"
    cfg, _ = resolve_run(_args(*runs, "--run-name", "c", "--redis-url", "redis://f:fl@h:1/0"), environ=env)
    assert cfg.buffer.redis_url == "redis://f:fl@h:1/0"
    cfg, _ = resolve_run(_args(*runs, "--run-name", "d"), environ={"HOME": str(tmp_path)})
    assert cfg.buffer.redis_url is None, "one machine: a private redis-server"
    cfg, _ = resolve_run(_args(*runs, "--run-name", "e", "--redis-url", ""), environ=env)
    assert cfg.buffer.redis_url == "", "an empty flag stays empty (check_redis_reach refuses it), not unset"


def test_config_yaml_has_no_password_and_resume_asks_for_it_again(tmp_path):
    from driver.runfiles import resolve_run, save_config

    runs = ["--runs-dir", str(tmp_path / "runs"), "--run-name", "r"]
    cfg, run_dir = resolve_run(_args(*runs, "--redis-url", "redis://pag:hunter2@10.0.0.5:6379/0"), environ={})
    save_config(cfg, run_dir / "config.yaml")
    text = (run_dir / "config.yaml").read_text()
    assert "hunter2" not in text and "redis://pag:***@10.0.0.5:6379/0" in text
    with pytest.raises(ConfigError, match=r"without its password .* --redis-url or \$PAG_REDIS_URL"):
        resolve_run(_args(*runs, "--resume"), environ={})
    cfg, _ = resolve_run(_args(*runs, "--resume"), environ={"PAG_REDIS_URL": "redis://pag:hunter2@10.0.0.5:6379/0"})
    assert cfg.buffer.redis_url == "redis://pag:hunter2@10.0.0.5:6379/0"


def test_resume_on_a_node_without_the_run_fetches_it_from_storage(tmp_path):
    from driver.runfiles import resolve_run, save_config

    store = (tmp_path / "store").as_uri()
    runs_a, runs_b = tmp_path / "a", tmp_path / "b"
    cfg, run_dir = resolve_run(_args("--runs-dir", str(runs_a), "--run-name", "r", "--storage-path", store), environ={})
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    RunStorage(store, "r").push(run_dir, "config.yaml", "metrics.jsonl")
    with pytest.raises(ConfigError, match="already exists in run storage"):
        resolve_run(_args("--runs-dir", str(runs_b), "--run-name", "r", "--storage-path", store), environ={})

    cfg, run_dir = resolve_run(_args("--runs-dir", str(runs_b), "--run-name", "r", "--resume",
                                     f"run.storage_path={store}"), environ={})
    assert run_dir == runs_b / "r" and cfg.run.storage_path == store
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["storage_path"] == store


def test_storage_path_is_a_config_key():
    assert load_config("tiny", overrides=["run.storage_path=s3://b/p"]).run.storage_path == "s3://b/p"
    assert load_config("tiny").run.storage_path is None and load_config("tiny").buffer.allow_loopback is False
