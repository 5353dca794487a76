"""What the launcher's head runs, run here (issue 25): deploy/start-redis.sh starts redis-server with
deploy/redis.conf (port, address and directories overridden to loopback and a temp dir) and the ACL
user answers PING; a server that cannot start is reported, not daemonized into silence; and the
setup command of deploy/cluster.yaml, run in a fresh virtual environment, puts `pag` on PATH."""
from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import redis
import yaml

from common.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "start-redis.sh"


def _start(tmp_path: Path, port: int, **extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PAG_REDIS_PORT=str(port), PAG_REDIS_HOST="127.0.0.1", PAG_REDIS_BIND="127.0.0.1",
               PAG_REDIS_DIR=str(tmp_path / "redis"), PAG_REDIS_ENV_FILE=str(tmp_path / "pag" / "redis.env"), **extra)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def _stop(tmp_path: Path) -> None:
    """SIGTERM to the server this test started, by its pidfile (the pag user may not SHUTDOWN)."""
    pidfile = tmp_path / "redis" / "redis.pid"
    if pidfile.is_file():
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            subprocess.run(["sleep", "0.1"])


@pytest.fixture
def started(tmp_path):
    if not (subprocess.run(["which", "redis-server", "redis-cli"], capture_output=True).returncode == 0):
        pytest.skip("needs redis-server and redis-cli")
    port = free_port()
    result = _start(tmp_path, port)
    yield result, port
    _stop(tmp_path)


def _url(tmp_path: Path) -> str:
    line = (tmp_path / "pag" / "redis.env").read_text().strip()
    assert line.startswith("PAG_REDIS_URL=")
    return line.split("=", 1)[1]


def test_start_redis_with_the_deploy_conf_answers_as_the_acl_user(started, tmp_path):
    result, port = started
    assert result.returncode == 0, result.stderr
    url = _url(tmp_path)
    password = url.split(":")[2].split("@")[0]
    assert password not in result.stdout + result.stderr, "the script prints the URL redacted"
    assert oct((tmp_path / "pag" / "redis.env").stat().st_mode & 0o777) == "0o600"
    assert url == f"redis://pag:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    assert client.ping()
    client.set("pag:probe", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("other:probe", "1")  # ~pag:* only
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.flushall()  # -@dangerous
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, password="wrong", username="pag").ping()
    with pytest.raises((redis.exceptions.ResponseError, redis.exceptions.AuthenticationError),
                       match="NOAUTH|NOPERM|disabled|authenticated"):
        redis.Redis(port=port).ping()  # `user default off`
    args = Path(f"/proc/{int((tmp_path / 'redis' / 'redis.pid').read_text())}/cmdline").read_bytes()
    assert password.encode() not in args, "redis-server gets the password's SHA-256, not the password"
    assert (tmp_path / "redis" / "appendonlydir").is_dir(), "AOF on, in PAG_REDIS_DIR"
    client.close()


def test_start_redis_again_keeps_the_server_and_the_password(started, tmp_path):
    result, port = started
    assert result.returncode == 0, result.stderr
    url = _url(tmp_path)
    again = _start(tmp_path, port)
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    assert _url(tmp_path) == url


def test_a_server_that_cannot_start_is_reported(started, tmp_path):
    """The port is taken (by the first server): redis-server aborts after daemonizing; the script says so
    with its log, at once, and exits 1 — `--daemonize yes` alone would have returned 0."""
    result, port = started
    assert result.returncode == 0, result.stderr
    other = tmp_path / "other"
    env = dict(os.environ, PAG_REDIS_PORT=str(port), PAG_REDIS_HOST="127.0.0.1", PAG_REDIS_BIND="127.0.0.1",
               PAG_REDIS_DIR=str(other / "redis"), PAG_REDIS_ENV_FILE=str(other / "redis.env"),
               PAG_REDIS_PASSWORD="another-one")
    failed = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    # the first server refuses this password, and the second one logs that the address is in use
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "not answering" in failed.stderr and re.search(r"in use|aborting", failed.stderr), failed.stderr


def _repository_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in files:
            if (ROOT / name).is_file():
                tar.add(ROOT / name, arcname=name)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        tar.extractall(dest, filter="data")


def test_cluster_setup_command_puts_pag_on_path(tmp_path):
    """The setup command of deploy/cluster.yaml that installs the synced repository, run as written in a
    fresh virtual environment (the synced path replaced by a copy of the repository). The dependencies
    come from this environment (PIP_NO_DEPS, PIP_NO_INDEX: no network here); the command itself — and its
    `pag --help` — must succeed."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_deploy import pag_install_command

    config = yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())
    command, target, _ = pag_install_command(config)
    src = tmp_path / "pag-src"
    _repository_copy(src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\nexec {shlex.quote(str(venv / "bin" / "python"))} -m pip "$@"\n')
    (venv / "bin" / "pip").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", PIP_NO_DEPS="1", PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0",
               HF_HUB_OFFLINE="1")
    result = subprocess.run(["bash", "-c", command.replace(target, str(src))], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (venv / "bin" / "pag").is_file(), "the console script of [project.scripts]"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pag; print(pag.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(src)), f"the synced copy is what `pag` runs (editable): {where}"
