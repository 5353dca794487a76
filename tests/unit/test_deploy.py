"""The deploy manifests as written (issue 14 item 4): the cluster YAML passes Ray's own config
validator, every image is a published rayproject/ray image at one Ray version (the Dockerfile's base),
and the RayJob's entrypoint and runtime env are valid for pag and Ray."""
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _base_image() -> str:
    froms = re.findall(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    assert len(froms) == 1, froms
    return froms[0]


def test_cluster_yaml_passes_rays_config_validator():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching anything
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 2  # a typo the validator must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_images_are_published_rayproject_ray_at_one_version():
    base = _base_image()
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert match, f"deploy/Dockerfile builds on {base}: want rayproject/ray:<version>-py3XX-gpu"
    version = match.group(1)
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert cluster["docker"]["image"] == base
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    pod_specs = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]] + \
        [group["template"]["spec"] for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    images = {c["image"] for spec in pod_specs for c in spec["containers"]}
    assert len(images) == 1 and version in images.pop(), "every pod runs the image built from deploy/Dockerfile"
    for path in DEPLOY.iterdir():
        assert "ray-ml" not in re.sub(r"#.*", "", path.read_text()), f"{path.name}: ray-ml images stopped after 2.49"


def test_rayjob_runtime_env_and_entrypoint_are_valid():
    from ray.runtime_env import RuntimeEnv

    from pag.cli import build_parser
    from common.config import load_config
    from driver.train import _flag_overrides

    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own check of the fields
    assert "working_dir" not in runtime_env, "the code is in the image; no placeholder URL"
    words = shlex.split(job["spec"]["entrypoint"].replace('"$PAG_REDIS_URL"', "redis://pag:pw@pag-redis:6379/0"))
    assert words[0] == "pag"
    args = build_parser().parse_args(words[1:])
    assert args.runs_dir and Path(args.runs_dir).is_absolute(), "run directories on the mounted volume"
    load_config(args.preset, args.config_file, list(args.overrides) + _flag_overrides(args))
