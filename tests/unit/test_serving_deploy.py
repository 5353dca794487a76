"""deploy/serve.yaml is a valid Ray Serve config (Ray's own ServeDeploySchema), its import path is the application
builder, and the deployments it configures are the ones the builder makes."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_passes_ray_serves_schema_and_names_the_builders_deployments(tiny_run):
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    builder = import_attr(app.import_path)
    args = {**app.args, "checkpoint": str(tiny_run), "scorer_gpus": 0}
    built = builder(args)
    names = {built._bound_deployment.name}
    names |= {arg._bound_deployment.name for arg in built._bound_deployment.init_args if arg is not None}
    assert {d.name for d in app.deployments} == names == {"Api", "Policy", "Scorer"}
    assert builder({**args, "render": False})._bound_deployment.init_args[1] is None  # no render deployment


def test_the_replicas_fit_a_two_core_machine_and_too_many_are_refused_before_serve_waits():
    """A local Ray on 2 cores has 2 CPUs: a policy, a renderer and the ingress must fit (they did not: Serve then
    waits forever for the ingress); more than the cluster holds is a clear error, not a hang."""
    import pytest

    from serving.cli import check_resources

    two_cores = {"CPU": 2.0}
    check_resources({"render": True, "policy_replicas": 1, "scorer_replicas": 1, "scorer_gpus": 0}, two_cores)
    with pytest.raises(ValueError, match="reserve 3.5 CPUs and this Ray cluster has 2"):
        check_resources({"render": True, "policy_replicas": 1, "scorer_replicas": 3, "scorer_gpus": 0}, two_cores)
    with pytest.raises(ValueError, match="reserve 2 GPUs and this Ray cluster has 0"):
        check_resources({"render": True, "policy_replicas": 1, "scorer_replicas": 2, "scorer_gpus": 1}, {"CPU": 8.0})
