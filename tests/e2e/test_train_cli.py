"""`pag train` end to end, as a user runs it (subprocess): the embedded default on the tiny preset
with a small step budget, resume, and a clean stop on SIGINT. Real local Ray, real redis-server."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = ["sampler.max_len=8", "sampler.min_len=2", "sampler.prompts_per_batch=2", "learner.batch_size=8",
         "learner.checkpoint_every=2", "reward.batch_size=4", "run.log_every=2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sft):
    path = tmp_path_factory.mktemp("train")
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return path, env


def pag(args, workdir, timeout=600):
    path, env = workdir
    return subprocess.run([sys.executable, "-m", "pag.cli", *args], cwd=path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _read_buffer(run_dir: Path, run: str):
    """Restart the run's redis-server on its AOF directory and read it as a person would."""
    import redis

    from common.redis_server import RedisServer

    with RedisServer(run_dir / "redis") as server:
        client = redis.Redis.from_url(server.url, decode_responses=False)
        best = client.zrevrange(f"pag:{run}:prio", 0, 0, withscores=True)
        fields = client.hgetall(f"pag:{run}:traj:{best[0][0].decode()}") if best else {}
        size = client.zcard(f"pag:{run}:prio")
        meta = client.hgetall(f"pag:{run}:meta")
    return size, fields, best, meta


def _redis_server_pid(data_dir: Path) -> int:
    """The run's private redis-server: it renames its process but works in its data directory (`--dir`)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in ps.splitlines():
        pid = line.split()[0]
        if "redis-server" in line and pid.isdigit():
            try:
                if Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir.resolve():
                    pids.append(int(pid))
            except OSError:  # gone, or not ours to read
                pass
    assert len(pids) == 1, ps
    return pids[0]


def test_sigint_stops_cleanly_then_resume_finishes_with_a_report(workdir):
    """One run for three stories (each `pag train` here costs ~50 s): a kill -9 of its private redis-server
    is ridden out (restarted on its AOF), SIGINT stops it cleanly with a checkpoint at the step reached, then
    `--resume` continues from that step on the same buffer to the end and writes the report. A run that is never interrupted is the e2e method runs' (tests/e2e/test_methods.py)."""
    path, env = workdir
    run_dir = path / "runs" / "e2e"
    # started as a background job is: SIGINT ignored on entry. `pag train` must install its handler itself
    # periodic checkpoints off (every 1000 steps or 10^5 s): the one found after SIGINT is the shutdown's
    proc = subprocess.Popen([sys.executable, "-m", "pag.cli", "train", "--steps", "500", "--run-name", "e2e",
                             *SMALL, "learner.checkpoint_every=1000", "learner.checkpoint_every_s=100000"], cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 400
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    # kill -9 of the private redis-server: the driver restarts it on its AOF and training goes on
    killed_at = len(metrics.read_text().splitlines())
    os.kill(_redis_server_pid(run_dir / "redis"), signal.SIGKILL)
    while time.monotonic() < deadline and proc.poll() is None:
        if len(metrics.read_text().splitlines()) >= killed_at + 2:
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    assert "restarting it on its AOF" in out and "answers again" in out, out[-3000:]
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    reached = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert stopped_at == reached >= 3, "the shutdown checkpoint, at the step reached"
    assert not (run_dir / "report.md").exists()
    size, _, _, meta = _read_buffer(run_dir, "e2e")
    assert size > 0 and meta[b"stop"] == b"1"

    end = stopped_at + 2
    resumed = pag(["train", "--resume", "--run-name", "e2e", "--steps", str(end)], workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, end + 1)), "continues from the checkpoint's step"
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{end:06d}"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    report = (run_dir / "report.md").read_text()
    assert "## Held-out prompts" in report and "## Resolved config" in report and "curves.png" in report
    assert "| reward | render |" in report and "| sampler | sample |" in report and "| learner | update |" in report
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert "time/learner/update" in logged[0] and any("time/reward/render" in m for m in logged)
    rows = [line for line in report.splitlines() if line.startswith("| ") and " | " in line]
    assert sum("failed" not in r for r in rows) >= 8 * 4, "8 prompts × 4 scored rewrites"
    from PIL import Image

    with Image.open(run_dir / "samples.png") as img:
        assert img.size[0] >= 5 * 64 and img.size[1] >= 8 * 64
    assert (run_dir / "curves.png").stat().st_size > 1000

    size_after, fields, best, meta = _read_buffer(run_dir, "e2e")
    assert size_after >= size, "the same buffer, not a new one"
    assert meta[b"stop"] == b"1"
    for key in (b"prompt", b"response", b"log_reward", b"aes", b"clip", b"policy_version", b"created_at", b"blob"):
        assert key in fields, key
    assert float(fields[b"log_reward"]) == pytest.approx(best[0][1], rel=1e-5)


def test_bad_override_fails_before_anything_starts(workdir):
    path, _ = workdir
    result = pag(["train", "learner.lr=fast"], workdir, timeout=60)
    assert result.returncode == 2 and "learner.lr" in result.stderr
    assert not (path / "runs").exists() or not any((path / "runs").glob("tiny__*"))
