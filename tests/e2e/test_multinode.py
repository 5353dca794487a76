"""The README's cluster path on a real two-node Ray cluster on this machine (issues 14 and 25).

`ray start --head` and a second node with a custom resource (`reward_node`), on free ports and a
private temp dir, token authentication on with a token file of the test's own; an external
redis-server with a password, whose URL the Ray nodes have in their environment as $PAG_REDIS_URL
(as deploy/cluster.yaml's head has it). Then, as a user would:

1. `ray job submit --runtime-env-json '{"env_vars": …}' -- pag train … reward.resources={reward_node: 1}`
   (the job sets env vars the driver used to pass again in ray.init), with run storage on a file://
   URI and `buffer.allow_loopback=true` — every node is on this machine;
2. `pag workers scale 2` from a second driver while it trains; both workers run on the second node;
3. `redis-cli` reads a trajectory; `ray job stop` leaves a checkpoint in the run directory and in storage;
4. the run directory is lost (a node gone), and `pag train --resume` as a second job continues from
   run storage on the same buffer;
5. no file the runs wrote, no job log and no job metadata holds the Redis password.

And the same loopback Redis without `buffer.allow_loopback` on these two nodes stops at once with an
error naming buffer.redis_url.

Teardown: SIGTERM to the `ray start --block` processes this test started, then SIGKILL to whatever
of their process groups and descendants is left — by pid, never by name (other Ray clusters run on
this machine). Everything runs in subprocesses: the suite's own local Ray stays untouched.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
SMALL = ["sampler.max_len=8", "sampler.min_len=2", "sampler.prompts_per_batch=2", "learner.batch_size=8",
         "learner.checkpoint_every=2", "reward.batch_size=4", "run.log_every=2"]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """Ray nodes started here with `ray start --block`, stopped by the pids started here."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = self.dashboard_port = 0

    def _start(self, args: list[str], name: str) -> None:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(["ray", "start", "--block", "--node-ip-address=127.0.0.1", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = (self.root / f"{name}.log").read_text()
            if "Ray runtime started" in text:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited {proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"ray start ({name}) did not come up in 120 s")

    def _node_ports(self) -> list[str]:
        names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        return [f"{n}={p}" for n, p in zip(names, _free_ports(len(names)))]

    def start_head(self, num_cpus: int) -> None:
        self.gcs_port, self.dashboard_port, client_port = _free_ports(3)
        self._start(["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                     "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client_port}",
                     f"--temp-dir={self.root / 'ray'}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                     *self._node_ports()], "head")

    def add_node(self, num_cpus: int, resources: dict[str, float]) -> None:
        # its own temp dir: two nodes on one machine sharing one would unpack the job's working dir into
        # the same runtime_resources/ directory at the same time
        self._start([f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                     f"--temp-dir={self.root / f'ray{len(self.procs)}'}",
                     f"--resources={json.dumps(resources)}", *self._node_ports()], f"node{len(self.procs)}")

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` (it stops its node), then SIGKILL to anything left in the
        sessions those processes lead (workers set their own process group, not their own session)
        and to their descendants."""
        roots = {proc.pid for proc in self.procs}
        for proc in reversed(self.procs):  # the second node first, the head last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for pid in _session_tree(roots):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _session_tree(sessions: set[int]) -> set[int]:
    """Pids in the given sessions, and their descendants (Linux /proc; no name matching)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry)] = (int(fields[1]), int(fields[3]))  # ppid, session id
    found = {pid for pid, (_, sid) in table.items() if sid in sessions}
    grew = True
    while grew:
        extra = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
        found |= extra
        grew = bool(extra)
    return found


def _run(args: list[str], env: dict[str, str], timeout: float = 300, check: bool = True, cwd: Path = REPO):
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:6])}… exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def cluster_env():
    # the interpreter's own bin/ first: a venv's python called without activating the venv still finds its `ray`
    bin_dir = str(Path(sys.executable).parent)
    search = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    missing = [tool for tool in ("ray", "redis-cli") if not shutil.which(tool, path=search)]
    assert not missing, (f"{missing} not found beside {sys.executable} or on PATH "
                         "(ray: a main dependency; redis-cli: redis-tools)")
    from common.redis_server import RedisServer

    root = Path(tempfile.mkdtemp(prefix="pagmn", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("PYTEST_CURRENT_TEST",)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PATH=search)
    redis_server = RedisServer(root / "redis", password=secrets.token_hex(16)).start()
    url = redis_server.url.replace("redis://:", "redis://default:")  # redis-cli 7.0 sends no AUTH for an empty user
    env["PAG_REDIS_URL"] = url  # the head's environment; deploy/cluster.yaml sources it likewise
    cluster = LocalCluster(root, env)
    try:
        cluster.start_head(num_cpus=3)  # the learner and the sampler (1 CPU each)
        cluster.add_node(num_cpus=2, resources={"reward_node": 2})  # two reward workers
        yield cluster, env, url, root
    finally:
        try:
            cluster.stop()
        finally:
            redis_server.stop()
            shutil.rmtree(root, ignore_errors=True)


def _job_logs(cluster: LocalCluster, env, job: str) -> str:
    return _run(["ray", "job", "logs", "--address", cluster.dashboard, job], env, check=False).stdout[-6000:]


def _redis_cli(url: str, *args: str) -> list[str]:
    """redis-cli's lines as a person sees them (a msgpack blob is binary: decoded with replacement)."""
    out = subprocess.run(["redis-cli", "--no-auth-warning", "-u", url, *args], capture_output=True, timeout=30,
                         check=True)
    return out.stdout.decode("utf-8", errors="replace").splitlines()


def test_two_nodes_job_scale_stop_resume(cluster_env, tiny_sft):
    cluster, env, redis_url, root = cluster_env
    runs = root / "runs"
    sft = tiny_sft  # the session's: every node is on this machine

    # the job's runtime env sets variables the driver used to pass again (the merge conflict of item 1),
    # and gives the driver time to checkpoint when `ray job stop` sends SIGTERM
    runtime_env = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                           "RAY_JOB_STOP_WAIT_TIME_S": "90"}})
    submit = ["ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
              "--runtime-env-json", runtime_env]
    job = f"pag-mn-{uuid.uuid4().hex[:6]}"
    store = (root / "store").as_uri()  # a shared filesystem for both nodes; s3:// on a real cluster
    _run([*submit, "--submission-id", job, "--no-wait", "--",  # no --redis-url: $PAG_REDIS_URL on the head
          "pag", "train", "--runs-dir", str(runs), "--run-name", "mn", "--steps", "1000", "--storage-path", store,
          "buffer.allow_loopback=true", f"model.sft_checkpoint={sft}", "reward.resources={reward_node: 1}",
          *SMALL], env)
    run_dir = runs / "mn"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        status = _run(["ray", "job", "status", "--address", cluster.dashboard, job], env, check=False).stdout
        assert "FAILED" not in status and "SUCCEEDED" not in status, _job_logs(cluster, env, job)
        assert time.monotonic() < deadline, "no learner step in 240 s:\n" + _job_logs(cluster, env, job)
        time.sleep(2)

    # a second driver (not a job) joins with the cluster's token and adds a worker while it trains
    scaled = _run([sys.executable, "-m", "pag.cli", "workers", "scale", "2", "--run", "mn",
                   "--ray-address", cluster.gcs], env)
    assert json.loads(scaled.stdout.strip().splitlines()[-1])["workers"] == ["pag:mn:reward:0", "pag:mn:reward:1"]
    listed = _run([*submit, "--", "pag", "workers", "list", "--run", "mn"], env)
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["pag:mn:reward:0", "pag:mn:reward:1"], listed.stdout[-3000:]
    nodes = json.loads(_run(["ray", "list", "nodes", "--address", cluster.dashboard, "--format", "json"], env).stdout)
    reward_nodes = {n["node_id"] for n in nodes if "reward_node" in (n.get("resources_total") or {})}
    assert len(reward_nodes) == 1 and {r["node_id"] for r in rows} == reward_nodes, "placed by reward.resources"

    # redis-cli reads a trajectory as the README shows
    best = _redis_cli(redis_url, "ZREVRANGE", "pag:mn:prio", "0", "0")
    assert best, "the buffer has a trajectory"
    names = _redis_cli(redis_url, "HKEYS", f"pag:mn:traj:{best[0]}")  # the order HGETALL prints them in
    assert {"prompt", "response", "log_reward", "aes", "clip"} <= set(names), names
    assert names[-1] == "blob", f"the binary blob prints after the readable fields: {names}"
    shown = _redis_cli(redis_url, "HGETALL", f"pag:mn:traj:{best[0]}")
    assert shown[0] == names[0] and shown[shown.index("log_reward") + 1] != ""

    # ray job stop: the driver checkpoints and stops the roles (SIGTERM → the same path as Ctrl-C)
    _run(["ray", "job", "stop", "--address", cluster.dashboard, job], env, timeout=180)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest).is_dir(), latest
    assert _redis_cli(redis_url, "HGET", "pag:mn:meta", "stop") == ["1"], _job_logs(cluster, env, job)
    stopped_at = int(latest.removeprefix("step_"))
    size = int(_redis_cli(redis_url, "ZCARD", "pag:mn:prio")[0])
    stored = root / "store" / "mn"
    assert (stored / "checkpoints" / "latest").read_text().strip() == latest, "the checkpoint is in run storage"
    assert (stored / "config.yaml").is_file() and (stored / "metrics.jsonl").is_file()

    # the node with the run directory is gone: --resume as a second job continues from run storage
    shutil.move(run_dir, root / "lost-run-dir")
    resumed = _run([*submit, "--", "pag", "train", "--resume", "--run-name", "mn", "--runs-dir", str(runs),
                    "--storage-path", store, "--steps", str(stopped_at + 2), "--no-report"], env, timeout=400)
    assert "succeeded" in resumed.stdout + resumed.stderr, resumed.stdout[-4000:]
    assert "fetched from" in resumed.stdout + resumed.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at + 2:06d}"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2], steps[-6:]
    assert int(_redis_cli(redis_url, "ZCARD", "pag:mn:prio")[0]) >= size, "the same buffer, not a new one"

    # the password is nowhere a run wrote: run directories, run storage, job logs, job metadata
    password = redis_url.split(":")[2].split("@")[0]
    written = [p for top in (runs, root / "lost-run-dir", root / "store") for p in top.rglob("*") if p.is_file()]
    assert len(written) > 20 and any(p.name == "config.yaml" for p in written)
    assert [str(p) for p in written if password.encode() in p.read_bytes()] == []
    assert ":***@127.0.0.1" in (run_dir / "config.yaml").read_text()
    jobs = _run(["ray", "list", "jobs", "--address", cluster.dashboard, "--detail", "--format", "json"], env).stdout
    assert len(json.loads(jobs)) >= 3 and password not in jobs, "job metadata: entrypoints, runtime envs"
    for listed in json.loads(jobs):
        if listed.get("submission_id"):
            assert password not in _job_logs(cluster, env, listed["submission_id"])


def test_loopback_redis_on_two_nodes_stops_with_an_error_naming_the_setting(cluster_env):
    """A private-to-this-machine Redis on a two-node Ray: refused at once, before any role starts."""
    cluster, env, redis_url, root = cluster_env
    runs = root / "runs-loopback"
    result = _run([sys.executable, "-m", "pag.cli", "train", "--ray-address", cluster.gcs, "--redis-url", redis_url,
                   "--runs-dir", str(runs), "--run-name", "lb", "--steps", "2"], env, check=False, timeout=180)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("pag train:")]
    assert "buffer.redis_url" in error and "loopback" in error and "2 nodes" in error, error
    assert "buffer.allow_loopback=true" in error and ":***@127.0.0.1" in error, error
    assert not (runs / "lb").exists(), "a run that cannot start leaves nothing behind"
    # it joined Ray before the check, so Ray's job table has its command line: with the password as ***
    password = redis_url.split(":")[2].split("@")[0]
    jobs = _run(["ray", "list", "jobs", "--address", cluster.dashboard, "--detail", "--format", "json"], env).stdout
    entrypoints = [j.get("entrypoint") or "" for j in json.loads(jobs)]
    assert any("--redis-url" in e and ":***@127.0.0.1" in e for e in entrypoints), entrypoints
    assert password not in jobs
