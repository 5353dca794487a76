"""`pag serve`: start the Ray Serve application (serving/app.py) on a local Ray or a cluster, and keep serving
until Ctrl-C. `serve run deploy/serve.yaml` starts the same application from a config file."""
from __future__ import annotations

import os
import sys
import time

#: seconds Serve's HTTP proxy may take to start (Ray's default: 5)
PROXY_READY_S = 60


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a trained run's rewriter: HTTP API, a page at /, optional rendering (Ray Serve)",
        description="Start a Ray Serve application answering POST /v1/rewrite (rewrites, optionally rendered and "
                    "scored), GET /healthz, GET /v1/info, the OpenAPI docs at /docs and a page at / to try it in a "
                    "browser. Ctrl-C stops it.",
        epilog="Example: pag serve --checkpoint runs/a --port 8000, then open http://127.0.0.1:8000/. "
               "On a cluster: ray job submit --working-dir . -- pag serve --checkpoint RUN --ray-address auto "
               "--host 0.0.0.0, or `serve run deploy/serve.yaml`.")
    p.add_argument("--checkpoint", required=True, help="a run directory (runs/<name>) or one of its checkpoints")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--no-render", action="store_true", help="rewrites only: no render + score deployment")
    p.add_argument("--policy-replicas", type=int, default=1, help="replicas of the policy deployment (default 1)")
    p.add_argument("--scorer-replicas", type=int, default=1, help="replicas of the render + score deployment")
    p.add_argument("--scorer-gpus", type=float, default=0, help="GPUs per render + score replica (default 0: CPU)")
    p.add_argument("--refine", action="store_true",
                   help="also serve POST /v1/refine: IPGO on a chosen rewrite (the run's ipgo settings, at most "
                        "50 iterations a request)")
    p.add_argument("--refine-gpus", type=float, default=0, help="GPUs per refine replica (default 0: CPU)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_serve)


def check_resources(app_args: dict, resources: dict) -> None:
    """ValueError when the cluster lacks the CPUs or GPUs the replicas reserve, naming what would fit."""
    from serving.app import required_cpus

    cpus, have = required_cpus(app_args), resources.get("CPU", 0)
    if cpus > have:
        raise ValueError(f"the replicas reserve {cpus:g} CPUs and this Ray cluster has {have:g}: lower "
                         "--policy-replicas / --scorer-replicas, or --no-render, or leave out --refine")
    gpus = float(app_args["scorer_gpus"]) * (int(app_args["scorer_replicas"]) if app_args["render"] else 0)
    gpus += float(app_args.get("refine_gpus", 0)) if app_args.get("refine") else 0.0
    if gpus > resources.get("GPU", 0):
        raise ValueError(f"--scorer-gpus {app_args['scorer_gpus']:g} x {app_args['scorer_replicas']} replicas "
                         f"and --refine-gpus {app_args.get('refine_gpus', 0):g} reserve {gpus:g} GPUs and this Ray "
                         f"cluster has {resources.get('GPU', 0):g}")


def start(args) -> str:
    """Start the application (checking the checkpoint first, so a bad one fails here in one line); its URL."""
    from pathlib import Path

    import ray
    from ray import serve

    from common.cluster import init_ray
    from serving.app import build
    from common.runs import resolve_checkpoint

    resolve_checkpoint(Path(args.checkpoint))  # ValueError naming what is missing, before Ray starts
    # Serve gives its HTTP proxy 5 s to come up; importing it takes longer on a busy 2-core machine, where the
    # controller would then kill and restart it forever (seen here). Ray reads this when it starts (a local Ray).
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_S))
    init_ray(args.ray_address)
    app_args = {"checkpoint": args.checkpoint, "render": not args.no_render, "policy_replicas": args.policy_replicas,
                "scorer_replicas": args.scorer_replicas, "scorer_gpus": args.scorer_gpus,
                "refine": args.refine, "refine_gpus": args.refine_gpus}
    check_resources(app_args, ray.cluster_resources())  # Serve would wait forever for a replica that cannot fit
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(app_args), name="pag", route_prefix="/")
    return f"http://{args.host}:{args.port}"


def cmd_serve(args) -> int:
    try:
        url = start(args)
    except ValueError as exc:
        print(f"pag serve: {exc}", file=sys.stderr)
        return 2
    print(f"pag serve: serving {args.checkpoint} at {url}/ (API docs: {url}/docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
