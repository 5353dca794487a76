"""The deploy manifests checked the way the platforms read them, without a cluster (issue 25):

* deploy/rayjob.yaml against KubeRay's own RayJob CRD (v1.7.0, shipped in tests/data/kuberay/) with
  jsonschema, plus a walk for fields the schema does not know; fully qualified images; autoscaling on
  where min/max replicas are set; pods that can write the runs volume;
* KubeRay's submitter pod replayed: its `/bin/bash -ce` command composed as the operator composes it
  (controllers/ray/common/job.go, BuildJobSubmitCommand, K8sJobMode), run with the submitter's
  environment and Ray's own `ray job submit` argument handling; the entrypoint Ray receives is then run
  the way Ray's job supervisor runs it (`shell=True`) in the head container's environment, and the
  `pag train` it starts resolves the Secret's Redis URL — intact, and in no job metadata;
* deploy/cluster.yaml through Ray's own config validator, with a setup that installs the `pag` command;
* every image a published rayproject/ray image at one Ray version (the Dockerfile's base).
"""
import copy
import gzip
import hashlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayjobs.yaml.gz"
CRD_SHA256 = "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"  # KubeRay v1.7.0
SECRET_URL = "redis://pag:s3cr%2At$x!@pag-redis:6379/0"  # what the Secret `pag-redis` holds (key `url`)


def _job() -> dict:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


def _pod_specs(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def _base_image() -> str:
    froms = re.findall(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    assert len(froms) == 1, froms
    return froms[0]


# ---------------------------------------------------------------------- rayjob.yaml against the CRD

@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    raw = gzip.decompress(CRD.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == CRD_SHA256, "tests/data/kuberay/README.md names the file's source"
    crd = yaml.safe_load(raw)
    assert crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return v1["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the structural schema does not declare: the API server prunes them without a word (or,
    with `kubectl apply --validate=strict`, refuses them). A typo such as `minReplica` is one."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                found += unknown_fields(item, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, where)
            elif props is not None and not (path == "" and key in ("apiVersion", "kind", "metadata")):
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def _schema_errors(instance: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def test_rayjob_passes_the_kuberay_crd_schema_with_no_unknown_field(rayjob_schema):
    pytest.importorskip("jsonschema")
    job = _job()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert _schema_errors(job, rayjob_schema) == []
    assert unknown_fields(job, rayjob_schema) == []


def test_the_schema_check_catches_a_wrong_type_and_the_walk_a_typo(rayjob_schema):
    pytest.importorskip("jsonschema")
    broken = _job()
    group = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicas"] = "six"
    group["minReplica"] = 2
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envv"] = []
    assert any("replicas" in e for e in _schema_errors(broken, rayjob_schema))
    assert unknown_fields(broken, rayjob_schema) == [
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].envv",
        "spec.rayClusterSpec.workerGroupSpecs[0].minReplica"]


def test_images_are_fully_qualified_and_one():
    """`pag:tag` alone resolves to docker.io/library/pag; every container names a registry host."""
    images = {c["image"] for spec in _pod_specs(_job()) for c in spec.get("initContainers", []) + spec["containers"]}
    assert len(images) == 1, images
    image = images.pop()
    registry = image.split("/", 1)[0]
    assert "/" in image and ("." in registry or ":" in registry or registry == "localhost"), image
    assert not image.startswith(("docker.io/library/", "index.docker.io/library/")), image


def test_min_and_max_replicas_have_an_autoscaler_to_act_on_them():
    spec = _job()["spec"]["rayClusterSpec"]
    for group in spec["workerGroupSpecs"]:
        if "minReplicas" in group or "maxReplicas" in group:
            assert spec.get("enableInTreeAutoscaling") is True, "min/maxReplicas do nothing without the autoscaler"
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_pod_can_write_the_shared_runs_volume():
    job = _job()
    words = shlex.split(job["spec"]["entrypoint"])
    runs = words[words.index("--runs-dir") + 1]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for spec in _pod_specs(job):
        ctx = spec.get("securityContext") or {}
        assert ctx.get("runAsUser") == 1000 and ctx.get("fsGroup") == 100, "user `ray` (1000:100) of the image"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims.get(mounts.get(runs)) == "pag-runs", f"{container['name']}: {runs} on the shared claim"
    (check,) = head["initContainers"]
    assert runs in " ".join(check["args"]) and "exit 1" in " ".join(check["args"])


def test_no_secret_and_no_shell_expansion_in_what_the_submitter_sends():
    job = _job()
    for field in (job["spec"]["entrypoint"], job["spec"]["runtimeEnvYAML"]):
        assert "$" not in field and "`" not in field, "the submitter's bash would expand it, in its own environment"
        assert "redis://" not in field, "Ray keeps the entrypoint and runtime env in the job's metadata"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all("env" not in c for g in workers for c in g["template"]["spec"]["containers"]), \
        "only the head (the driver) needs the Secret; actors get the URL from the driver"


# ---------------------------------------------------------------------- the submitter pod, replayed

def _go_quote(text: str) -> str:
    """Go's strconv.Quote for ASCII text (what KubeRay wraps --runtime-env-json in)."""
    return json.dumps(text)


def build_job_submit_command(job: dict, dashboard: str, job_id: str) -> str:
    """KubeRay v1.7.0 BuildJobSubmitCommand for K8sJobMode, joined with spaces as configureSubmitterContainer
    does before handing it to `/bin/bash -ce --`."""
    address = dashboard if dashboard.startswith("http://") else "http://" + dashboard
    health = ('python -c "import urllib.request; r=urllib.request.urlopen(\'%s\', timeout=%d); '
              "exit(0 if b'success' in r.read() else 1)\"" % (address + "/api/gcs_healthz", 10))
    cmd = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo",
           json.dumps(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."), ";", "sleep", "2", ";",
           "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    runtime_env = job["spec"].get("runtimeEnvYAML")
    if runtime_env:
        cmd += ["--runtime-env-json", _go_quote(json.dumps(yaml.safe_load(runtime_env), separators=(",", ":"),
                                                           sort_keys=True))]
    cmd += ["--submission-id", job_id, "--", job["spec"]["entrypoint"].strip(), ";"]
    cmd += ["fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


def _script(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


FAKE_RAY = """
    #!{python}
    # `ray` in the submitter image: Ray's own `ray job …` CLI, with a client that records the submission
    import json, sys
    sys.path.insert(0, {root!r})
    args = sys.argv[1:]
    if args[:2] == ["job", "status"]:
        sys.exit(1)  # not submitted yet: the submitter goes on to `ray job submit`
    if args[:2] == ["job", "logs"]:
        sys.exit(0)
    import ray.dashboard.modules.job.cli as job_cli

    class Client:
        def submit_job(self, **kwargs):
            json.dump(kwargs, open({record!r}, "w"))
            return kwargs["submission_id"]

        def get_version(self):
            return "1"

    job_cli._get_sdk_client = lambda *a, **k: Client()
    job_cli.job_cli_group.main(args=args[1:], prog_name="ray job", standalone_mode=True)
"""

FAKE_PAG = """
    #!{python}
    # `pag` on the head: what the job supervisor's shell hands it
    import json, os, sys
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, open({record!r}, "w"))
"""


def _submit_and_run_on_head(tmp_path: Path, job: dict) -> tuple[dict, dict]:
    """(what Ray's job API received, what `pag` on the head received)."""
    submitter_bin, head_bin = tmp_path / "submitter-bin", tmp_path / "head-bin"
    submitter_bin.mkdir()
    head_bin.mkdir()
    submitted, started = tmp_path / "submitted.json", tmp_path / "started.json"
    _script(submitter_bin / "ray", FAKE_RAY.format(python=sys.executable, root=str(ROOT), record=str(submitted)))
    _script(submitter_bin / "python", "#!/bin/sh\nexit 0\n")  # the dashboard is healthy
    _script(head_bin / "pag", FAKE_PAG.format(python=sys.executable, record=str(started)))
    job_id = "pag-sd14-x7k2q"
    command = build_job_submit_command(job, "pag-sd14-raycluster-abcde-head-svc.default.svc.cluster.local:8265", job_id)
    submitter_env = {"PATH": f"{submitter_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
                     "RAY_DASHBOARD_ADDRESS": "pag-sd14-raycluster-abcde-head-svc.default.svc.cluster.local:8265",
                     "RAY_JOB_SUBMISSION_ID": job_id}
    proc = subprocess.run(["/bin/bash", "-ce", "--", command], env=submitter_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sent = json.loads(submitted.read_text())

    # the head: Ray's job supervisor runs the entrypoint with shell=True in the head container's environment
    # (PAG_REDIS_URL from the Secret) plus the job's runtime env and its job config
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_env = {"PATH": f"{head_bin}:/usr/bin:/bin", "HOME": str(tmp_path / "home-ray")}
    for var in head.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        head_env[var["name"]] = SECRET_URL if ref == {"name": "pag-redis", "key": "url"} else var["value"]
    head_env.update((sent["runtime_env"] or {}).get("env_vars", {}))
    head_env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": sent["runtime_env"],
                                                          "metadata": {"job_submission_id": sent["submission_id"]}})
    subprocess.run(sent["entrypoint"], shell=True, env=head_env, check=True, timeout=60)
    return sent, json.loads(started.read_text())


def test_the_secrets_redis_url_reaches_pag_train_on_the_head_intact(tmp_path):
    """KubeRay's submitter runs `bash -ce` with three variables; the entrypoint must come through it and
    Ray's `ray job submit` unchanged, and `pag train` on the head must end up with the Secret's URL."""
    from common.cluster import check_redis_reach, cluster_reason
    from driver.runfiles import resolve_run
    from pag.cli import build_parser

    job = _job()
    sent, started = _submit_and_run_on_head(tmp_path, job)
    assert shlex.split(sent["entrypoint"]) == shlex.split(job["spec"]["entrypoint"]), "unchanged by the submitter"
    assert sent["submission_id"] == "pag-sd14-x7k2q"
    assert "s3cr" not in json.dumps(sent), "no password in what Ray stores as the job's metadata"
    assert started["argv"][0] == "train"

    args = build_parser().parse_args(started["argv"])
    cfg, run_dir = resolve_run(args, environ=started["env"])
    assert cfg.buffer.redis_url == SECRET_URL, "the Secret's URL, byte for byte"
    assert run_dir == Path("/home/ray/runs/sd14-k8s")
    check_redis_reach(cfg.buffer.redis_url, cluster_reason(cfg.run.ray_address, started["env"], 1))


def test_a_redis_url_in_the_entrypoint_would_be_lost_and_is_refused(tmp_path):
    """The manifest as it was: `--redis-url "$PAG_REDIS_URL"` expands to "" in the submitter's shell, and
    on a cluster `pag train` says so instead of starting a private redis-server no other pod reaches."""
    from common.cluster import check_redis_reach, cluster_reason
    from common.config import ConfigError
    from driver.runfiles import resolve_run
    from pag.cli import build_parser

    job = _job()
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("pag train", 'pag train --redis-url "$PAG_REDIS_URL"')
    sent, started = _submit_and_run_on_head(tmp_path, job)
    assert '--redis-url "" ' in sent["entrypoint"] or "--redis-url '' " in sent["entrypoint"], sent["entrypoint"]
    args = build_parser().parse_args(started["argv"])
    cfg, _ = resolve_run(args, environ=started["env"])
    with pytest.raises(ConfigError, match=r"buffer\.redis_url .* is empty"):
        check_redis_reach(cfg.buffer.redis_url, cluster_reason(cfg.run.ray_address, started["env"], 1))


def test_rayjob_runtime_env_and_entrypoint_are_valid():
    from ray.runtime_env import RuntimeEnv

    from common.config import load_config
    from driver.runfiles import flag_overrides
    from pag.cli import build_parser

    job = _job()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own check of the fields
    assert "working_dir" not in runtime_env, "the code is in the image; no placeholder URL"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "pag"
    args = build_parser().parse_args(words[1:])
    assert args.runs_dir and Path(args.runs_dir).is_absolute(), "run directories on the mounted volume"
    load_config(args.preset, args.config_file, list(args.overrides) + flag_overrides(args))


# ---------------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_passes_rays_config_validator():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching anything
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 2  # a typo the validator must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def pag_install_command(config: dict) -> tuple[str, str, Path]:
    """(the setup command that installs the project, the remote path it installs, the local directory
    that file_mounts syncs there — relative to the repository root, where `ray up` runs)."""
    mounts = config["file_mounts"]
    found = []
    for command in config["setup_commands"]:
        words = shlex.split(command)
        for i, word in enumerate(words[:-1]):
            if word == "-e" and "install" in words[:i]:
                target = re.sub(r"\[.*\]$", "", words[i + 1])
                if target in mounts:
                    found.append((command, target, ROOT / mounts[target]))
    assert len(found) == 1, f"one setup command pip-installs a synced directory: {config['setup_commands']}"
    return found[0]


def test_cluster_setup_installs_the_pag_command_from_the_synced_repository():
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    command, target, local = pag_install_command(config)
    assert local.resolve() == ROOT, "file_mounts syncs the repository root (ray up runs there)"
    project = tomllib.loads((local / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["pag"] == "pag.cli:main"
    extras = re.findall(r"\[([^\]]*)\]", command)
    assert all(e in project["optional-dependencies"] for x in extras for e in x.split(","))
    assert "pag --help" in command, "a setup that did not put `pag` on PATH fails there, not at `ray job submit`"
    assert config["rsync_filter"] == [".gitignore"], "runs/ and caches are not synced"
    head = " ".join(config["head_setup_commands"] + config["head_start_ray_commands"])
    assert "deploy/start-redis.sh" in head and ". ~/.pag/redis.env" in head


def test_cluster_yaml_documents_a_command_that_parses_with_run_storage():
    from pag.cli import build_parser

    text = (DEPLOY / "cluster.yaml").read_text()
    block = re.search(r"^#\s+ray job submit .*?-- \\\n((?:#\s+.*\\\n)*#\s+.*\n)", text, flags=re.M)
    assert block, "cluster.yaml's header shows the submit command"
    words = shlex.split(" ".join(line.lstrip("#").strip().rstrip("\\") for line in block.group(1).splitlines()))
    args = build_parser().parse_args(words[1:])
    assert args.storage_path and args.storage_path.startswith("s3://"), "checkpoints outlive a node"
    assert args.redis_url is None, "the URL comes from the head's environment, not the job's metadata"


def test_redis_conf_binds_no_fixed_address_and_holds_no_password():
    text = re.sub(r"#.*", "", (DEPLOY / "redis.conf").read_text())
    binds = re.findall(r"^bind\s+(.*)$", text, flags=re.M)
    assert binds == ["127.0.0.1"], "the private address is the head's, given at start (deploy/start-redis.sh)"
    assert not re.search(r"^user\s+pag\b", text, flags=re.M) and ">" not in text, "no password in the repository"
    assert re.search(r"^user default off", text, flags=re.M)
    assert "--daemonize yes" not in (DEPLOY / "cluster.yaml").read_text(), "start-redis.sh checks it answers"


# ---------------------------------------------------------------------- one Ray version

def test_images_are_published_rayproject_ray_at_one_version():
    base = _base_image()
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert match, f"deploy/Dockerfile builds on {base}: want rayproject/ray:<version>-py3XX-gpu"
    version = match.group(1)
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == base
    job = _job()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    images = {c["image"] for spec in _pod_specs(job) for c in spec.get("initContainers", []) + spec["containers"]}
    assert len(images) == 1 and version in images.pop(), "every pod runs the image built from deploy/Dockerfile"
    for path in DEPLOY.iterdir():
        assert "ray-ml" not in re.sub(r"#.*", "", path.read_text()), f"{path.name}: ray-ml images stopped after 2.49"


def test_start_redis_script_is_executable_bash():
    script = DEPLOY / "start-redis.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


# ---------------------------------------------------------------------- rayservice.yaml (pag serve)

def test_rayservice_cluster_passes_the_kuberay_schema_and_serves_deploy_serve_yaml(rayjob_schema):
    """RayService.spec.rayClusterConfig is KubeRay's RayClusterSpec, the type of RayJob.spec.rayClusterSpec in the
    shipped CRD; serveConfigV2 must pass Ray Serve's schema and be deploy/serve.yaml itself."""
    pytest.importorskip("jsonschema")
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    cluster_schema = rayjob_schema["properties"]["spec"]["properties"]["rayClusterSpec"]
    cluster = service["spec"]["rayClusterConfig"]
    assert _schema_errors(cluster, cluster_schema) == [] and unknown_fields(cluster, cluster_schema) == []
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config == yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {c["image"] for spec in _pod_specs(_job()) for c in spec["containers"]}  # one image everywhere
