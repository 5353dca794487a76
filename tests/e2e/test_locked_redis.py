"""`pag train` against a locked-down Redis (issue 21): TLS with a CA the test makes, an ACL user with the
rules deploy/redis.conf documents, the `default` user disabled. The password is never printed — not on the
terminal, not in any file of the run, not in Ray's logs — and a wrong one fails at once."""
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.redis_server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = ["sampler.max_len=8", "sampler.min_len=2", "sampler.prompts_per_batch=2", "learner.batch_size=8",
         "reward.batch_size=4", "run.log_every=2"]
ROOT = Path(__file__).resolve().parents[2]
#: least privilege (deploy/acl-rules): the project's keys and exactly the commands it sends
ACL = (ROOT / "deploy" / "acl-rules").read_text().split()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a certificate it signs for 127.0.0.1."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pag test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(d / "server.key"),
             "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "1", "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"))
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture
def locked(tmp_path, tiny_sft):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    ca, cert, key = _ca_and_server_cert(tmp_path)
    password, port = secrets.token_hex(12), free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--hash-max-listpack-value", "4096",
         "--user", "default", "off", "--user", "pag", "on", f">{password}", *ACL],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    if proc.poll() is not None:
        said = proc.stdout.read().decode()[-300:]
        if "tls" not in said.lower():
            pytest.fail(f"redis-server refused its command line: {said}")
        pytest.skip(f"this redis-server has no TLS: {said}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PAG_REDIS_CA_CERTS=str(ca))
    env.pop("RAY_ADDRESS", None)
    yield tmp_path, f"rediss://pag:{password}@127.0.0.1:{port}/0", password, env
    proc.kill()
    proc.wait()


def _pag(args, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "pag.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_train_over_tls_as_an_acl_user_never_prints_the_password(locked):
    tmp, url, password, env = locked
    started = time.time()
    result = _pag(["train", "--steps", "3", "--run-name", "locked", "--redis-url", url, *SMALL], tmp, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert password not in result.stdout + result.stderr
    run_dir = tmp / "runs" / "locked"
    assert (run_dir / "report.md").is_file() and (run_dir / "config.yaml").is_file()
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert not leaks, leaks
    sessions = [s for s in Path("/tmp/ray").glob("session_2*") if s.stat().st_mtime >= started - 5]
    ray_leaks = [p for s in sessions for p in s.rglob("*.log") if p.is_file() and password.encode() in p.read_bytes()]
    assert sessions and not ray_leaks, ray_leaks  # the password is random: only this run's files could hold it

    as_env = dict(env, PAG_REDIS_URL=url)
    stats = _pag(["buffer", "stats", "--run", "locked", "--json"], tmp, as_env, timeout=60)
    assert stats.returncode == 0 and '"size": ' in stats.stdout, stats.stderr
    for command in (["top", "3"], ["export", "-"], ["check", "--quarantine"]):  # what a person runs, allowed too
        done = _pag(["buffer", *command, "--run", "locked"], tmp, as_env, timeout=60)
        assert done.returncode == 0 and password not in done.stdout + done.stderr, (command, done.stderr)

    no_ca = {k: v for k, v in env.items() if k != "PAG_REDIS_CA_CERTS"}
    untrusted = _pag(["buffer", "stats", "--run", "locked", "--redis-url", url], tmp, no_ca, timeout=60)
    assert untrusted.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr

    wrong = url.replace(password, "not-the-password")
    t0 = time.monotonic()
    refused = _pag(["buffer", "stats", "--run", "locked", "--redis-url", wrong], tmp, env, timeout=60)
    assert refused.returncode == 3 and time.monotonic() - t0 < 30, refused.stderr
    assert "not-the-password" not in refused.stderr and "rediss://pag:***@127.0.0.1" in refused.stderr
