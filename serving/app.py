"""The Ray Serve application of `pag serve`: three deployments composed through handles, each scaled on its own.

    Api (FastAPI ingress: /, /docs, /healthz, /v1/info, /v1/rewrite, /v1/refine)
      -> Policy   (rewrites; Serve's dynamic batching groups concurrent requests into one decode)
      -> Scorer   (optional: render + score; one GPU per replica where there are GPUs)
      -> Refiner  (optional, `refine`: IPGO on a chosen rewrite, bounded iterations; a GPU per replica where any)

`build(args)` is the application builder both `pag serve` and `serve run deploy/serve.yaml` call. Work crosses
the process boundary as msgpack with a schema version (`WIRE_SCHEMA`), never pickle.

No `from __future__ import annotations` here: FastAPI reads the request model from the route's annotations,
which behind Serve's ingress wrapper it cannot resolve from strings.
"""
import time
from pathlib import Path
from typing import Any, Optional

import msgpack
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.core import (MAX_CLIP_TOKENS, Judge, RefineRequest, Refiner, Rewriter, RewriteRequest,
                          clip_token_count)

WIRE_SCHEMA = 1
PAGE = Path(__file__).with_name("page.html")

api = FastAPI(title="PAG prompt rewriter",
              description="Rewrites of a plain text-to-image prompt from a policy trained with PAG (GFlowNet "
                          "FL-DB), optionally rendered and scored against the plain prompt's pictures.")


def pack(payload: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": WIRE_SCHEMA, **payload}, use_bin_type=True)


def unpack(blob: bytes) -> dict[str, Any]:
    raw = msgpack.unpackb(blob, raw=False)
    if raw.get("v") != WIRE_SCHEMA:
        raise ValueError(f"serve message of schema {raw.get('v')}, expected {WIRE_SCHEMA}: the deployments run "
                         "different code versions")
    return raw


#: CPUs each replica reserves: on a 2-core machine a policy, a renderer and the ingress must fit together (the
#: ingress only forwards; the policy decodes in bursts); `required_cpus` checks the total before Serve waits forever
CPUS = {"Policy": 0.5, "Scorer": 1.0, "Refiner": 0.5, "Api": 0.0}


def required_cpus(args: dict[str, Any]) -> float:
    """CPUs the application reserves with these builder arguments."""
    scorers = int(args.get("scorer_replicas", 1)) if args.get("render", True) else 0
    refiners = int(args.get("refine_replicas", 1)) if args.get("refine", False) else 0
    return (CPUS["Policy"] * int(args.get("policy_replicas", 1)) + CPUS["Scorer"] * scorers
            + CPUS["Refiner"] * refiners + CPUS["Api"])


#: requests the policy's dynamic batching groups into one decode; a replica takes twice as many at once (Serve's
#: default, 5, capped every batch at 5 and left the replica idle between batches: 27.5 → 29.4 rewrites/s,
#: bench/serve.py)
BATCH = 8


@serve.deployment(ray_actor_options={"num_cpus": CPUS["Policy"]}, max_ongoing_requests=2 * BATCH)
class Policy:
    def __init__(self, checkpoint: str) -> None:
        self.rewriter = Rewriter.from_run(Path(checkpoint))

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.02)
    async def rewrite(self, blobs: list[bytes]) -> list[bytes]:
        requests = [RewriteRequest(**unpack(b)["request"]) for b in blobs]
        return [pack({"rewrites": texts}) for texts in self.rewriter.rewrite(requests)]

    def info(self) -> bytes:
        cfg = self.rewriter.cfg
        return pack({"run": cfg.run.name, "preset": cfg.preset, "policy": str(self.rewriter.policy_dir),
                     "input_format": cfg.model.input_format, "target_model": cfg.model.sd})


def run_config(checkpoint: str):
    """The saved config of the run `checkpoint` belongs to (a run directory or one of its checkpoints)."""
    from common.config import Config, read_saved
    from common.runs import resolve_checkpoint

    run_dir, _ = resolve_checkpoint(Path(checkpoint))
    return Config.model_validate(read_saved(run_dir / "config.yaml"))


@serve.deployment(ray_actor_options={"num_cpus": CPUS["Scorer"]})
class Scorer:
    def __init__(self, checkpoint: str) -> None:
        self.judge = Judge(run_config(checkpoint))

    def judge_texts(self, blob: bytes) -> bytes:
        work = unpack(blob)
        return pack(self.judge.judge(work["plain"], work["rewrites"]))


@serve.deployment(ray_actor_options={"num_cpus": CPUS["Refiner"]}, max_ongoing_requests=1)
class RefinerDeployment:
    """IPGO on one rewrite at a time per replica (each iteration backpropagates through the sampler)."""

    def __init__(self, checkpoint: str) -> None:
        self.refiner = Refiner(run_config(checkpoint))

    def refine(self, blob: bytes) -> bytes:
        work = unpack(blob)
        return pack(self.refiner.refine(work["text"], work["iterations"]))


def _check_length(field: str, text: str) -> None:
    """422 naming `field` when `text` is longer than Stable Diffusion's text encoder reads."""
    tokens = clip_token_count(text)
    if tokens > MAX_CLIP_TOKENS:
        raise HTTPException(422, detail=[{"loc": ["body", field], "type": "too_long", "msg":
                                          f"{field} is {tokens} CLIP tokens; the limit is {MAX_CLIP_TOKENS} "
                                          "(Stable Diffusion's text encoder reads no more)"}])


@serve.deployment(ray_actor_options={"num_cpus": CPUS["Api"]})
@serve.ingress(api)
class Api:
    def __init__(self, policy: DeploymentHandle, scorer: Optional[DeploymentHandle],
                 refiner: Optional[DeploymentHandle] = None) -> None:
        self.policy, self.scorer, self.refiner = policy, scorer, refiner
        self.started = time.time()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return PAGE.read_text()

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"ok": True, "render": self.scorer is not None, "refine": self.refiner is not None,
                "uptime_s": round(time.time() - self.started, 1)}

    @api.get("/v1/info")
    async def info(self) -> dict[str, Any]:
        info = unpack(await self.policy.info.remote())
        info.pop("v")
        return {**info, "render": self.scorer is not None, "refine": self.refiner is not None}

    @api.post("/v1/rewrite")
    async def rewrite(self, req: RewriteRequest) -> dict[str, Any]:
        """Rewrites of `prompt`; with `render`, the plain prompt's and each rewrite's pictures (PNG data URLs)
        and scores (aesthetic, CLIP, and the reward: aesthetic gain + relevance penalty)."""
        _check_length("prompt", req.prompt)
        if req.render and self.scorer is None:
            raise HTTPException(422, detail=[{"loc": ["body", "render"], "type": "unavailable", "msg":
                                              "this server renders nothing (started with --no-render)"}])
        rewrites = unpack(await self.policy.rewrite.remote(pack({"request": req.model_dump()})))["rewrites"]
        out: dict[str, Any] = {"prompt": req.prompt, "decode": req.decode, "rewrites": [{"text": t} for t in rewrites]}
        if req.render:
            judged = unpack(await self.scorer.judge_texts.remote(pack({"plain": req.prompt, "rewrites": rewrites})))
            out["plain"], out["rewrites"] = judged["plain"], judged["rewrites"]
        return out

    @api.post("/v1/refine")
    async def refine(self, req: RefineRequest) -> dict[str, Any]:
        """IPGO on one rewrite: learned tokens around its text encoding trained for `iterations` steps on the
        run's fixed IPGO noise; the rewrite's own picture (`before`) and the best iterate's (`after`), the IPGO
        reward of each and its curve."""
        _check_length("text", req.text)
        if self.refiner is None:
            raise HTTPException(422, detail=[{"loc": ["body", "text"], "type": "unavailable", "msg":
                                              "this server does not refine (start it with --refine)"}])
        out = unpack(await self.refiner.refine.remote(pack({"text": req.text, "iterations": req.iterations})))
        out.pop("v")
        return out


def build(args: dict[str, Any]):
    """The application: `checkpoint` (a run directory or checkpoint), `render` (default true), `refine` (default
    false), and the replica counts of each deployment (`policy_replicas`, `scorer_replicas`, `scorer_gpus`,
    `refine_replicas`, `refine_gpus`)."""
    checkpoint = str(args["checkpoint"])
    policy = Policy.options(num_replicas=int(args.get("policy_replicas", 1))).bind(checkpoint)
    scorer = None
    if args.get("render", True):
        scorer = Scorer.options(num_replicas=int(args.get("scorer_replicas", 1)),
                                ray_actor_options={"num_cpus": CPUS["Scorer"],
                                                   "num_gpus": float(args.get("scorer_gpus", 0))}
                                ).bind(checkpoint)
    refiner = None
    if args.get("refine", False):
        refiner = RefinerDeployment.options(num_replicas=int(args.get("refine_replicas", 1)),
                                            ray_actor_options={"num_cpus": CPUS["Refiner"],
                                                               "num_gpus": float(args.get("refine_gpus", 0))}
                                            ).bind(checkpoint)
    return Api.bind(policy, scorer, refiner)
