"""The driver's side of a Ray cluster: joining it (also from inside a `ray job submit` job), where
the run directory goes under a job, and a resource check before any role is launched.

* **Job runtime env.** `ray job submit --runtime-env-json '{"env_vars": {...}}'` hands the driver
  its runtime env in `RAY_JOB_CONFIG_JSON_ENV_VAR`; `ray.init` merges its own `runtime_env` into
  that one and refuses when both set the same env var. The driver therefore passes only the
  variables the job did not set: the job's values win, and the actors inherit them from the job.
* **Runs dir under a job.** Ray unpacks `--working-dir` into its session's `runtime_resources/`,
  shared by jobs with the same code and deleted with the session. Under a job a relative
  `run.runs_dir` (the default `runs`) is placed under `~/pag/` of the user running Ray on the
  driver's node — `~/pag/runs/<name>` — and said at start; an absolute `--runs-dir` is kept.
* **Redis every node can reach.** A private redis-server listens on 127.0.0.1 of the driver's machine:
  on a Ray cluster (a cluster address, a job, or more than one node) the actors elsewhere cannot reach
  it, nor any loopback `buffer.redis_url`. `check_redis_reach` makes that an error naming the setting
  instead of a run whose roles hang; `buffer.allow_loopback=true` says every node is on this machine.
* **Preflight.** Ray waits forever for an actor no node can host ("No available node types can
  fulfill resource request"). Before launching, the roles' requests are packed onto the alive
  nodes' resources; if they do not fit, a ClusterError names what is missing and what to do, or,
  with `run.resource_wait_s > 0`, the driver asks the autoscaler for them and waits that long.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from common.config import Config, ConfigError
from common.constants import run_key
from common.errors import ClusterError
from common.urls import is_loopback_url, redact, redact_arg

log = logging.getLogger("pag.cluster")

#: env vars every actor needs (offline hub, shared SFT cache)
PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "PAG_CACHE", "TOKENIZERS_PARALLELISM",
            "PAG_REDIS_CA_CERTS", "PAG_REDIS_CERTFILE", "PAG_REDIS_KEYFILE")
#: the variable Ray's job supervisor sets for a job's driver (ray._private.runtime_env.constants)
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
#: under a job, a relative run.runs_dir goes below this directory (~ expanded on the driver's node)
JOB_RUNS_ROOT = "~/pag"


# ------------------------------------------------------------------ job awareness (pure)

def job_config(environ: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """The job config Ray injected into this driver, or None outside `ray job submit`."""
    raw = environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def job_id(environ: Mapping[str, str]) -> Optional[str]:
    config = job_config(environ)
    if config is None:
        return None
    return str((config.get("metadata") or {}).get("job_submission_id") or "?")


def driver_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """Env vars for the driver's `ray.init(runtime_env=…)`: PASS_ENV from this process, minus any the
    job's runtime env already sets (Ray refuses to merge a key set twice; the job's value wins)."""
    env = {k: environ[k] for k in PASS_ENV if k in environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = job_config(environ)
    if config is not None:
        job_vars = ((config.get("runtime_env") or {}).get("env_vars") or {})
        env = {k: v for k, v in env.items() if k not in job_vars}
    return env


def resolve_runs_dir(runs_dir: str, environ: Mapping[str, str]) -> tuple[Path, Optional[str]]:
    """Where run directories go, and a line to say at start when it is not the plain `runs_dir`."""
    path = Path(runs_dir).expanduser()
    if path.is_absolute() or job_config(environ) is None:
        return path, None
    home = Path(environ.get("HOME") or Path.home())
    root = Path(JOB_RUNS_ROOT.replace("~", str(home), 1))
    resolved = root / path
    note = (f"running as Ray job {job_id(environ)}: run directories go to {resolved} (a relative run.runs_dir is "
            f"placed under {JOB_RUNS_ROOT} under a job, since the job's working dir is Ray's temporary copy; "
            "pass --runs-dir /absolute/path to choose)")
    return resolved, note


# ------------------------------------------------------------------ joining Ray

def hide_secrets_in_command_line(cmdline: str = "/proc/self/cmdline") -> bool:
    """Ray records a driver's command line as its job's entrypoint (`ray list jobs`, the dashboard), and
    `ps` shows it to every user of the machine: when an argument is a URL with a password (`--redis-url
    redis://pag:…@…`), replace this process's title by the command line with the password as `***`.
    Best effort (Linux, Ray's own setproctitle); True when the title was changed."""
    try:
        with open(cmdline, "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    shown = [redact_arg(a) for a in args]
    if shown == args:
        return False
    try:
        from ray._raylet import setproctitle

        setproctitle(" ".join(shown))
    except Exception:  # noqa: BLE001 — a Ray without it: the job's entrypoint keeps the password
        log.warning("could not hide the password in this command line from Ray's job table; pass the Redis URL "
                    "as $PAG_REDIS_URL instead of --redis-url")
        return False
    return True


def init_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None, log_to_driver: bool = True,
             namespace: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Join `address` (else RAY_ADDRESS; "auto" finds a running cluster) or start a private local Ray;
    True when this call started Ray. The one Ray start-up of every entry point (`pag train`, `eval`,
    `ipgo`, `workers`): the offline switches reach every actor, a job's own env vars win, and "local"
    never joins a cluster that /tmp/ray/ray_current_cluster happens to name."""
    import ray

    if ray.is_initialized():
        return False
    hide_secrets_in_command_line()
    address = address or environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": driver_env_vars(environ)}, "log_to_driver": log_to_driver,
                              "logging_level": logging.WARNING}
    if namespace is not None:
        kwargs["namespace"] = namespace
    try:
        if address and address != "local":
            ray.init(address=address, **kwargs)
        else:
            # a private cluster's token is made and kept here; Ray's WARNING that token authentication is on asks
            # nothing of the user (issue 18: no warning a user cannot act on)
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except ConnectionError as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address!r}: {exc}; start one (`ray start --head`) "
                           "or give the right --ray-address / RAY_ADDRESS") from exc
    return True


def local_cpus(cfg: Config) -> int:
    """CPUs of a private local Ray for a run: the machine's, or enough for every role's actor."""
    return max(os.cpu_count() or 2, cfg.sampler.num_samplers + cfg.reward.num_workers + 2)


def cluster_reason(address: Optional[str], environ: Mapping[str, str], nodes: int) -> Optional[str]:
    """Why this run is on a Ray cluster rather than one machine (for an error message), or None."""
    address = address or environ.get("RAY_ADDRESS")
    why = []
    if job_config(environ) is not None:
        why.append(f"it runs as Ray job {job_id(environ)}")
    elif address and address != "local":
        why.append(f"it joins the Ray cluster at {address!r}")
    if nodes > 1:
        why.append(f"that cluster has {nodes} nodes" if why else f"the Ray cluster has {nodes} nodes")
    return " and ".join(why) or None


def check_redis_reach(redis_url: Optional[str], reason: Optional[str], *, allow_loopback: bool = False,
                      env_var: str = "PAG_REDIS_URL") -> None:
    """ConfigError when the roles could not all reach the run's Redis: on a cluster (`reason`, from
    `cluster_reason`) a missing or loopback `buffer.redis_url`; anywhere, an empty one (an unset
    variable expanded by a shell). A private redis-server (no URL) is for one machine only."""
    setting = f"buffer.redis_url (--redis-url, or ${env_var} in the driver's environment)"
    if redis_url is not None and not redis_url.strip():
        raise ConfigError(f"{setting} is empty — an unset variable expanded by a shell? Give a redis:// URL, or "
                          "leave it out on a single machine for a private redis-server")
    if reason is None or allow_loopback:
        return
    fix = ("give a URL every Ray node can reach, e.g. redis://pag:PASSWORD@<head-private-ip>:6379/0 "
           "(deploy/redis.conf), or buffer.allow_loopback=true if every Ray node runs on this machine")
    if redis_url is None:
        raise ConfigError(f"{setting} is not set, but {reason}: a private redis-server on 127.0.0.1 of the driver's "
                          f"node is for one machine only, and the roles on other nodes could not reach it; {fix}")
    if is_loopback_url(redis_url):
        raise ConfigError(f"{setting} is {redact(redis_url)}, a loopback address, but {reason}: the roles on other "
                          f"nodes would connect to their own machine; {fix}")


# ------------------------------------------------------------------ reward workers by name

#: the Ray namespace of the run's detached named actors
NAMESPACE = "pag"


def reward_worker_name(run: str, index: int) -> str:
    """`pag:{run}:reward:{i}`: a reward worker's Ray actor name, found by any driver on the cluster."""
    return run_key(run, "reward", str(index))


def weight_store_name(run: str) -> str:
    """`pag:{run}:weights`: the run's WeightStore actor, which the learner and samplers find by name."""
    return run_key(run, "weights")


def reward_worker_index(run: str, name: str) -> Optional[int]:
    match = re.fullmatch(re.escape(run_key(run, "reward", "")) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def list_reward_workers(run: str) -> list[str]:
    """Names of the run's live reward-worker actors, by index."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and reward_worker_index(run, a["name"]) is not None]
    return sorted(names, key=lambda n: reward_worker_index(run, n))


# ------------------------------------------------------------------ preflight (pure packing + Ray query)

def role_requests(cfg: Config) -> list[tuple[str, int, dict[str, float]]]:
    """(role, how many, resources per actor) as the roles request them from Ray."""
    def req(cpu: float, gpu: float, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        out = {"CPU": float(cpu)}
        if gpu > 0:
            out["GPU"] = float(gpu)
        out.update({k: float(v) for k, v in (extra or {}).items()})
        return out

    return [
        ("learner", 1, req(1, cfg.learner.num_gpus)),
        ("sampler", cfg.sampler.num_samplers, req(1, cfg.sampler.num_gpus)),
        ("reward worker", cfg.reward.num_workers, req(1, cfg.reward.num_gpus, cfg.reward.resources)),
    ]


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def fit_problems(requests: list[tuple[str, int, dict[str, float]]],
                 nodes: list[dict[str, float]]) -> list[str]:
    """What keeps the requests from being placed on `nodes` (each node's total resources), first-fit
    decreasing; [] when they fit. Each problem names the role, its request and what is lacking."""
    free = [dict(node) for node in nodes]
    problems: list[str] = []
    flat = [(role, res) for role, count, res in requests for _ in range(count)]
    flat.sort(key=lambda item: (-item[1].get("GPU", 0.0), -len(item[1]), -item[1].get("CPU", 0.0)))
    for role, res in flat:
        if not any(all(node.get(k, 0.0) >= v for k, v in res.items()) for node in nodes):
            lacking = sorted({k for k, v in res.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) < v})
            msg = (f"a {role} requests {_fmt(res)} but no node has "
                   + " and ".join(f"{k} >= {res[k]:g}" for k in lacking))
            if msg not in problems:
                problems.append(msg)
            continue
        for node in free:
            if all(node.get(k, 0.0) >= v for k, v in res.items()):
                for k, v in res.items():
                    node[k] -= v
                break
        else:
            problems.append(f"a {role} requests {_fmt(res)}: every node that could host it is taken by the "
                            "other roles of this run")
    return problems


def _alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def _advice(cfg: Config, problems: list[str]) -> str:
    tips = []
    text = " ".join(problems)
    if "GPU" in text:
        tips.append("`--preset tiny` (CPU only), or `learner.num_gpus=0 sampler.num_gpus=0 reward.num_gpus=0`")
    custom = [k for k in cfg.reward.resources if k in text]
    if custom:
        tips.append(f"start a node with them (`ray start --address … --resources '{json.dumps({k: 1 for k in custom})}'`) "
                    "or drop reward.resources")
    if "CPU" in text or "taken" in text:
        tips.append("fewer --samplers/--reward-workers")
    tips.append("a cluster with these resources (--ray-address), or run.resource_wait_s=SECONDS where an "
                "autoscaler adds nodes")
    return "; ".join(tips)


def preflight(cfg: Config, poll_s: float = 2.0) -> None:
    """Raise ClusterError unless the alive nodes can host every role (waiting up to run.resource_wait_s)."""
    requests = role_requests(cfg)
    problems = fit_problems(requests, _alive_node_resources())
    if problems and cfg.run.resource_wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        bundles = [res for _, count, res in requests for _ in range(count)]
        log.warning("the cluster cannot host the roles yet (%s); asking the autoscaler and waiting up to %.0f s",
                    "; ".join(problems), cfg.run.resource_wait_s)
        request_resources(bundles=bundles)
        deadline = time.monotonic() + cfg.run.resource_wait_s
        while problems and time.monotonic() < deadline:
            time.sleep(poll_s)
            problems = fit_problems(requests, _alive_node_resources())
    if problems:
        nodes = _alive_node_resources()
        have = {}
        for node in nodes:
            for k, v in node.items():
                if k in ("CPU", "GPU") or k in cfg.reward.resources:
                    have[k] = have.get(k, 0.0) + v
        waited = f" after waiting {cfg.run.resource_wait_s:g} s" if cfg.run.resource_wait_s > 0 else ""
        raise ClusterError(f"the cluster ({len(nodes)} node(s), {_fmt(have)} in all) cannot host this run{waited}: "
                           + "; ".join(problems) + ". Try: " + _advice(cfg, problems))


# ------------------------------------------------------------------ Redis hash layout

#: a trajectory's msgpack blob (~1 KB) fits: its hash stays a listpack, which keeps field order
LISTPACK_VALUE = 4096


def hash_layout_hint(client: Any) -> Optional[str]:
    """A warning when the server stores trajectory hashes as hashtables, None when fine or unknown.

    A listpack hash keeps insertion order, so HGETALL prints the readable fields first and the binary
    `blob` (written last) at the end; a hashtable prints them in hash order, the blob in the middle.
    Redis switches to a hashtable for any value over `hash-max-listpack-value` (default 64 bytes)."""
    try:
        reply = client.config_get("hash-max-listpack-value")
    except Exception:  # noqa: BLE001 — CONFIG is refused to the ACL user of deploy/redis.conf: leave it
        return None
    value = next(iter(reply.values()), None) if reply else None
    try:
        limit = int(value)
    except (TypeError, ValueError):
        return None
    if limit >= LISTPACK_VALUE:
        return None
    return (f"the Redis server's hash-max-listpack-value is {limit}: trajectory hashes become hashtables, and "
            "`redis-cli HGETALL pag:<run>:traj:<id>` prints the binary blob among the readable fields; set it to "
            f"{LISTPACK_VALUE} (deploy/redis.conf does; hashes also take ~19 % less memory)")
