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
