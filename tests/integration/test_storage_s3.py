"""`run.storage_path=s3://…` against a local S3 (moto's server on a loopback port), through s3fs as
`pag[s3]` installs it: a checkpoint written on one "node" comes back on another (issue 25)."""
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="pip install 'pag[s3]'")
server_module = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")


@pytest.fixture
def s3(monkeypatch):
    import boto3

    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")  # as for MinIO or any other S3
    boto3.client("s3").create_bucket(Bucket="pag-runs")
    yield "s3://pag-runs/team"
    server.stop()


def test_checkpoint_and_run_files_through_s3(s3, tmp_path):
    from common.storage import RunStorage

    node_a, node_b = tmp_path / "a" / "r1", tmp_path / "b" / "r1"
    for step in (2, 4):
        ckpt = node_a / "checkpoints" / f"step_{step:06d}"
        (ckpt / "policy").mkdir(parents=True)
        (ckpt / "policy" / "model.safetensors").write_bytes(bytes([step]) * 1000)
        (ckpt / "state.json").write_text("{}")
        RunStorage(s3, "r1").push_checkpoint(node_a, ckpt, keep=1)
    (node_a / "config.yaml").write_text("a: 1\n")
    RunStorage(s3, "r1").push(node_a, "config.yaml")

    storage = RunStorage(s3, "r1")  # a fresh client, as on another node
    assert storage.latest() == "step_000004" and storage.exists("config.yaml")
    restored = storage.pull_checkpoint(node_b)
    assert restored.name == "step_000004"
    assert (restored / "policy" / "model.safetensors").read_bytes() == bytes([4]) * 1000
    assert not storage.exists("checkpoints/step_000002"), "keep=1"
    assert storage.pull(node_b, "config.yaml") == ["config.yaml"] and (node_b / "config.yaml").read_text() == "a: 1\n"
    assert not Path(node_b / "checkpoints" / ".pull_step_000004").exists()
