"""The driver on a Ray cluster (issue 14 items 1-3): job-aware runtime env, the runs dir under a
job, the resource preflight, and reward.resources."""
import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from common.cluster import JOB_CONFIG_ENV, driver_env_vars, fit_problems, resolve_runs_dir, role_requests


pytestmark = pytest.mark.usefixtures("fresh_root_logging")  # these tests call the CLI's main()


def _job_env(env_vars=None, **extra):
    config = {"runtime_env": {"env_vars": env_vars} if env_vars is not None else {},
              "metadata": {"job_submission_id": "raysubmit_abc"}}
    return {JOB_CONFIG_ENV: json.dumps(config), **extra}


def test_driver_env_vars_outside_a_job_pass_the_project_variables():
    env = driver_env_vars({"HF_HUB_OFFLINE": "1", "PAG_CACHE": "/c", "UNRELATED": "x"})
    assert env == {"HF_HUB_OFFLINE": "1", "PAG_CACHE": "/c", "TOKENIZERS_PARALLELISM": "false"}


def test_driver_env_vars_leave_the_jobs_own_variables_to_the_job():
    environ = _job_env({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}, HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="true", PAG_CACHE="/c")
    env = driver_env_vars(environ)
    assert env == {"PAG_CACHE": "/c"}, "a key the job sets is not set again (Ray refuses to merge it)"


def test_driver_env_vars_merge_with_the_job_env_the_way_ray_does():
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job_vars = {"HF_HUB_OFFLINE": "1", "MY_VAR": "a"}
    environ = _job_env(job_vars, HF_HUB_OFFLINE="1", MY_VAR="a", HF_HOME="/h")
    merged = _merge_runtime_env({"env_vars": job_vars}, {"env_vars": driver_env_vars(environ)})
    assert merged is not None, "Ray's own merge accepts the driver's runtime env"
    assert merged["env_vars"] == {"HF_HUB_OFFLINE": "1", "MY_VAR": "a", "HF_HOME": "/h",
                                  "TOKENIZERS_PARALLELISM": "false"}
    naive = {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    assert _merge_runtime_env({"env_vars": job_vars}, naive) is None, "what the driver did before: a conflict"


def test_runs_dir_under_a_job_is_persistent_and_said(tmp_path):
    path, note = resolve_runs_dir("runs", {})
    assert str(path) == "runs" and note is None
    path, note = resolve_runs_dir("runs", _job_env(HOME=str(tmp_path)))
    assert path == tmp_path / "pag" / "runs"
    assert "raysubmit_abc" in note and str(tmp_path / "pag" / "runs") in note and "--runs-dir" in note
    path, note = resolve_runs_dir(str(tmp_path / "mine"), _job_env(HOME="/nowhere"))
    assert path == tmp_path / "mine" and note is None, "an absolute --runs-dir is kept"


def test_reward_resources_config_key():
    cfg = load_config("tiny", overrides=["reward.resources={reward_node: 1}"])
    assert cfg.reward.resources == {"reward_node": 1.0}
    assert cfg.hash() == load_config("tiny").hash(), "where workers run does not change the data"
    with pytest.raises(ConfigError, match="reward.resources.*built-in Ray resource"):
        load_config("tiny", overrides=["reward.resources={GPU: 1}"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config("tiny", overrides=["reward.resources={reward_node: 0}"])


def test_fit_problems_names_the_missing_resource():
    cfg = load_config("sd14", overrides=["reward.num_workers=2"])
    problems = fit_problems(role_requests(cfg), [{"CPU": 16.0}])
    assert problems and all("GPU >= 1" in p for p in problems)
    assert any(p.startswith("a learner requests {CPU: 1, GPU: 1}") for p in problems)
    assert fit_problems(role_requests(cfg), [{"CPU": 8.0, "GPU": 4.0}]) == []
    assert fit_problems(role_requests(cfg), [{"CPU": 8.0, "GPU": 2.0}]) == [
        "a reward worker requests {CPU: 1, GPU: 1}: every node that could host it is taken by the other roles of this run"]


def test_fit_problems_custom_resource_and_per_node_packing():
    cfg = load_config("tiny", overrides=["reward.resources={reward_node: 1}", "reward.num_workers=2"])
    head = {"CPU": 4.0}
    assert any("no node has reward_node >= 1" in p for p in fit_problems(role_requests(cfg), [head]))
    second = {"CPU": 2.0, "reward_node": 2.0}
    assert fit_problems(role_requests(cfg), [head, second]) == []
    # the custom resource is there but the node's CPUs are not enough for both workers
    assert fit_problems(role_requests(cfg), [head, {"CPU": 1.0, "reward_node": 2.0}])


@pytest.mark.ray
def test_train_without_the_gpus_it_requests_stops_with_a_clear_error(tmp_path):
    """On a CPU-only Ray, a GPU request is an error naming what is missing, at once, not a wait forever."""
    import os
    import subprocess
    import sys

    from common.errors import EXIT_CLUSTER

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", JOB_CONFIG_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "pag.cli", "train", "--run-name", "nogpu", "learner.num_gpus=1",
                           "reward.num_workers=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == EXIT_CLUSTER, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("pag train:")]
    assert len(line) == 1 and "Traceback" not in proc.stderr
    assert "a learner requests {CPU: 1, GPU: 1} but no node has GPU >= 1" in line[0]
    assert "--preset tiny" in line[0] and "learner.num_gpus=0" in line[0]
    assert not (tmp_path / "runs" / "nogpu").exists()


def test_hash_layout_hint_names_the_setting(redis_url):
    """The blob prints last in HGETALL only while trajectory hashes stay listpacks (issue 14 item 5)."""
    import redis

    from buffer.connection import connect
    from common.cluster import hash_layout_hint

    client = connect(redis_url)
    try:
        assert hash_layout_hint(client) is None  # the private server is configured like deploy/redis.conf
        client.config_set("hash-max-listpack-value", 64)  # Redis's default
        hint = hash_layout_hint(client)
        assert "hash-max-listpack-value is 64" in hint and "4096" in hint
        key = "pag:t:traj:x"
        client.hset(key, mapping={"prompt": "a cat", "response": "a cat, oil painting", "log_reward": "1.5"})
        client.hset(key, "blob", b"\x93" * 900)
        assert client.object("encoding", key) == b"hashtable"
        client.config_set("hash-max-listpack-value", 4096)
        client.delete(key)
        client.hset(key, mapping={"prompt": "a cat", "response": "a cat, oil painting", "log_reward": "1.5"})
        client.hset(key, "blob", b"\x93" * 900)
        assert client.object("encoding", key) == b"listpack" and client.hkeys(key)[-1] == b"blob"
    finally:
        client.config_set("hash-max-listpack-value", 4096)
        client.close()

    refused = type("Refused", (), {"config_get": lambda self, name: (_ for _ in ()).throw(redis.ResponseError("NOPERM"))})()
    assert hash_layout_hint(refused) is None


@pytest.mark.ray
def test_train_on_a_cluster_address_refuses_a_loopback_or_missing_redis(ray_local, redis_url, tmp_path, monkeypatch):
    """The driver's wiring of issue 25: given a cluster address (or run as a job), a loopback or missing
    buffer.redis_url stops `prepare` with a ConfigError naming the setting; allow_loopback lets it on."""
    from driver.train import Trainer

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    for url, why in ((redis_url, "a loopback address"), (None, "is not set")):
        overrides = ["run.ray_address=auto"] + ([f"buffer.redis_url={url}"] if url else [])
        cfg = load_config("tiny", overrides=overrides)
        with pytest.raises(ConfigError, match=rf"buffer\.redis_url .*{why}.* it joins the Ray cluster at 'auto'"):
            Trainer(cfg, tmp_path / "r").prepare()
        assert ray_local.is_initialized(), "the suite's Ray is left as it was"
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "j1"}}))
    with pytest.raises(ConfigError, match="it runs as Ray job j1"):
        Trainer(load_config("tiny"), tmp_path / "r").prepare()
    Trainer(load_config("tiny", overrides=["run.ray_address=auto", f"buffer.redis_url={redis_url}",
                                          "buffer.allow_loopback=true"]), tmp_path / "r").prepare()
