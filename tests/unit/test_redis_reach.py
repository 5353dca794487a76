"""Passwords shown redacted, and the Redis every role can reach (issue 25): on a Ray cluster — a job, a
cluster address, more than one node — a missing or loopback `buffer.redis_url` is an error naming the
setting; an empty one is an error everywhere; one machine keeps its private redis-server."""
import json
import socket

import pytest

from common.cluster import JOB_CONFIG_ENV, check_redis_reach, cluster_reason
from common.config import ConfigError
from common.urls import is_loopback_url, is_redacted, redact, redact_arg, redact_tree


@pytest.mark.parametrize("url, shown", [
    ("redis://pag:s3cr*t$x@10.0.0.5:6379/0", "redis://pag:***@10.0.0.5:6379/0"),
    ("redis://:pw@h/0", "redis://:***@h/0"),
    ("rediss://u:p@[::1]:6380/0", "rediss://u:***@[::1]:6380/0"),
    ("redis://h:6379/0?password=abc&db=1", "redis://h:6379/0?password=***&db=1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("s3://bucket/runs", "s3://bucket/runs"),
])
def test_redact(url, shown):
    assert redact(url) == shown
    assert is_redacted(shown) == (shown != url)


def test_redact_arg_for_command_lines():
    assert redact_arg("redis://pag:pw@h:1/0") == "redis://pag:***@h:1/0"
    assert redact_arg("buffer.redis_url=redis://pag:pw@h:1/0") == "buffer.redis_url=redis://pag:***@h:1/0"
    assert redact_arg("learner.lr=3e-5") == "learner.lr=3e-5" and redact_arg("--steps") == "--steps"


def test_a_command_line_without_a_secret_is_left_alone(tmp_path):
    from common.cluster import hide_secrets_in_command_line

    (tmp_path / "cmdline").write_bytes(b"python\0-m\0pag.cli\0train\0--redis-url\0redis://10.0.0.5:6379/0\0")
    assert hide_secrets_in_command_line(str(tmp_path / "cmdline")) is False
    assert hide_secrets_in_command_line(str(tmp_path / "missing")) is False


def test_redact_tree_redacts_every_url_in_a_config():
    tree = {"buffer": {"redis_url": "redis://pag:pw@h:6379/0", "capacity": 5}, "run": {"tags": ["x", "redis://:q@h/0"]}}
    assert redact_tree(tree) == {"buffer": {"redis_url": "redis://pag:***@h:6379/0", "capacity": 5},
                                 "run": {"tags": ["x", "redis://:***@h/0"]}}
    assert tree["buffer"]["redis_url"] == "redis://pag:pw@h:6379/0", "a copy"


@pytest.mark.parametrize("url, loopback", [
    ("redis://127.0.0.1:6379/0", True), ("redis://127.0.1.1:6379/0", True), ("redis://localhost/0", True),
    ("redis://[::1]:6379/0", True), ("unix:///tmp/redis.sock", True), (f"redis://{socket.gethostname()}:1/0", None),
    ("redis://10.0.0.5:6379/0", False), ("redis://pag:pw@pag-redis.default.svc.cluster.local:6379/0", False),
])
def test_is_loopback_url(url, loopback):
    if loopback is None:  # this machine's own name: loopback exactly when it resolves only to loopback here
        addrs = {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None)}
        loopback = all(a.startswith("127.") or a == "::1" for a in addrs)
    assert is_loopback_url(url) is loopback


def _job_env() -> dict:
    return {JOB_CONFIG_ENV: json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_1"}})}


def test_cluster_reason():
    assert cluster_reason(None, {}, 1) is None
    assert cluster_reason("local", {"RAY_ADDRESS": "local"}, 1) is None
    assert "Ray job raysubmit_1" in cluster_reason(None, _job_env(), 1)
    assert "2 nodes" in cluster_reason("127.0.0.1:6380", {}, 2)
    assert "'auto'" in cluster_reason(None, {"RAY_ADDRESS": "auto"}, 1)


def test_one_machine_keeps_its_private_redis_server_and_loopback_urls():
    check_redis_reach(None, None)
    check_redis_reach("redis://127.0.0.1:6379/0", None)


@pytest.mark.parametrize("url", [None, "redis://127.0.0.1:6390/0", "redis://pag:pw@localhost:6379/0"])
def test_on_a_cluster_a_private_or_loopback_redis_is_an_error_naming_the_setting(url):
    reason = cluster_reason("127.0.0.1:6380", {}, 2)
    with pytest.raises(ConfigError, match=r"buffer\.redis_url \(--redis-url, or \$PAG_REDIS_URL") as info:
        check_redis_reach(url, reason)
    message = str(info.value)
    assert "2 nodes" in message and "buffer.allow_loopback=true" in message
    assert "pw" not in message, "the URL is shown redacted"
    check_redis_reach(url, reason, allow_loopback=True)  # every node on this machine: the user says so


def test_on_a_cluster_a_reachable_url_is_fine():
    check_redis_reach("redis://pag:pw@10.0.0.5:6379/0", cluster_reason(None, _job_env(), 1))


@pytest.mark.parametrize("reason", [None, "it runs as Ray job x"])
def test_an_empty_url_is_an_error_everywhere(reason):
    with pytest.raises(ConfigError, match="is empty"):
        check_redis_reach("", reason)
    with pytest.raises(ConfigError, match="is empty"):
        check_redis_reach("  ", reason, allow_loopback=True)


def test_tls_files_come_from_the_environment_unless_the_url_names_them(monkeypatch):
    from buffer.connection import connect
    from common.cluster import PASS_ENV

    monkeypatch.setenv("PAG_REDIS_CA_CERTS", "/etc/pag/ca.pem")
    monkeypatch.setenv("PAG_REDIS_CERTFILE", "/etc/pag/client.pem")
    options = connect("rediss://pag:pw@10.0.0.5:6380/0").connection_pool.connection_kwargs
    assert options["ssl_ca_certs"] == "/etc/pag/ca.pem" and options["ssl_certfile"] == "/etc/pag/client.pem"
    assert "ssl_keyfile" not in options or options["ssl_keyfile"] is None
    named = connect("rediss://pag:pw@10.0.0.5:6380/0?ssl_ca_certs=/srv/other.pem").connection_pool.connection_kwargs
    assert named["ssl_ca_certs"] == "/srv/other.pem"  # the URL wins
    assert "ssl_ca_certs" not in connect("redis://10.0.0.5:6379/0").connection_pool.connection_kwargs  # no TLS
    assert {"PAG_REDIS_CA_CERTS", "PAG_REDIS_CERTFILE", "PAG_REDIS_KEYFILE"} <= set(PASS_ENV)  # to Ray workers
