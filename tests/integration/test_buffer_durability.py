"""Crash and restart of redis-server (kill -9, AOF everysec), reconnection, passwords, TLS, no pickle."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import threading
import time

import pytest
import redis

from buffer import ReplayBuffer
from buffer.testing import make_trajectory
from common.redis_server import free_port


def batch(n, start=0, reward=None):
    return [make_trajectory(start + i, float(i % 7) if reward is None else reward) for i in range(n)]


def test_kill_9_and_restart_keeps_the_buffer(make_redis_server, tmp_path, run_name):
    server = make_redis_server(data_dir=tmp_path / "aof")
    buf = ReplayBuffer(server.url, run_name, capacity=1000, reconnect_retries=12)
    stored = batch(300)
    for i in range(0, 300, 100):
        buf.add(stored[i:i + 100])
    buf.push_pending(batch(5, start=1000, reward=float("nan")))
    taken = buf.read_pending("worker-that-dies", 2)
    buf.set_meta(config_hash="cafe")
    time.sleep(1.3)  # appendfsync everysec: older writes are on disk
    server.kill()
    make_redis_server(data_dir=tmp_path / "aof", port=server.port)
    # the same client object carries on
    assert len(buf) == 300
    assert buf.get(stored[17].id) == stored[17]
    assert len(buf.sample(64)) == 64
    assert buf.pending_len() == 5
    assert buf.meta()["config_hash"] == "cafe" and buf.stats()["added"] == 300
    reclaimed = buf.read_pending("survivor", 10, min_idle_ms=0)
    assert {e for e, _ in taken} <= {e for e, _ in reclaimed} and len(reclaimed) == 5
    assert len(buf.read_fresh("learner", 1000)) == 300


def test_a_call_while_the_server_is_down_waits_for_it(make_redis_server, tmp_path, run_name):
    server = make_redis_server(data_dir=tmp_path / "aof")
    buf = ReplayBuffer(server.url, run_name, reconnect_retries=12)
    buf.add(batch(10))
    server.kill()
    restart = threading.Timer(0.8, lambda: make_redis_server(data_dir=tmp_path / "aof", port=server.port))
    restart.start()
    t0 = time.monotonic()
    buf.add(batch(10, start=10))  # backs off and retries instead of raising
    restart.join()
    assert time.monotonic() - t0 >= 0.5
    assert len(buf) == 20


def test_password_and_acl_user(make_redis_server, run_name):
    server = make_redis_server(password="s3cret pw")
    url = f"redis://:s3cret%20pw@127.0.0.1:{server.port}/0"
    buf = ReplayBuffer(url, run_name)
    buf.add(batch(3))
    assert len(buf) == 3
    buf.client.acl_setuser("pag", enabled=True, passwords=["+hunter2"], keys=["pag:*"], commands=["+@all"])
    as_user = ReplayBuffer(f"redis://pag:hunter2@127.0.0.1:{server.port}/0", run_name)
    assert len(as_user) == 3 and len(as_user.sample(4)) == 4
    t0 = time.monotonic()
    with pytest.raises(redis.AuthenticationError):
        ReplayBuffer(f"redis://:wrong@127.0.0.1:{server.port}/0", run_name)
    assert time.monotonic() - t0 < 2.0  # a wrong password is not retried with back-off
    with pytest.raises(redis.AuthenticationError):
        ReplayBuffer(f"redis://127.0.0.1:{server.port}/0", run_name)
    assert "s3cret" not in buf.stats()["redis_url"]


def _tls_server(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.skip(f"this redis-server has no TLS: {proc.stdout.read().decode()[-200:]}")
    return proc, port, cert


def test_tls_rediss_url(tmp_path, run_name):
    proc, port, cert = _tls_server(tmp_path)
    try:
        buf = ReplayBuffer(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}", run_name)
        buf.add(batch(3))
        assert len(buf.sample(5)) == 5
        buf.close()
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            ReplayBuffer(f"rediss://127.0.0.1:{port}/0", run_name)  # untrusted: fails, no back-off
        assert time.monotonic() - t0 < 2.0
    finally:
        proc.kill()
        proc.wait()


def test_nothing_is_pickled(redis_url, run_name, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "dumps", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "dump", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    buf = ReplayBuffer(redis_url, run_name)
    buf.push_pending(batch(2, reward=float("nan")))
    entries = buf.read_pending("w", 2)
    buf.add([t.replace(log_reward=0.5) for _, t in entries])
    buf.ack_pending([e for e, _ in entries])
    assert len(buf.sample(3)) == 3 and len(buf.read_fresh("l", 5)) == 2 and buf.top(1)
