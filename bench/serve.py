"""Benchmark of `pag serve` under load; prints one JSON object.

    python bench/serve.py                              # a tiny random run, CPU, 8 clients x 20 s
    python bench/serve.py --checkpoint runs/a --clients 16 --seconds 60 --kill

Loopback only, bounded in count and time. Three phases in one process:
1. `direct`: the same policy (serving.core.Rewriter) called in this process with batches of `--clients` requests,
   as Serve's dynamic batching would form them, for `--seconds`: rewrites/s and latency per batch.
2. `served`: `--clients` threads each POSTing /v1/rewrite in a loop for `--seconds` against `pag serve
   --no-render` on a local Ray: p50/p99 latency, rewrites/s, failed requests, and the ratio against `direct`.
3. `--kill`: the same load while the Policy replica is killed (ray.kill) a third of the way in; Serve's
   controller starts another. Failed requests, the longest gap without a success, and the error rate in it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

PROMPTS = ["a cat on a sofa", "a red house by a lake", "a bowl of fruit", "an old man reading",
           "a city street at night", "a dog in the snow", "a sailing boat", "a bicycle against a wall"]


def tiny_run(root: Path) -> Path:
    """A tiny run with a random policy checkpoint (what tests/conftest.py's `tiny_run` builds)."""
    import torch

    from common.config import load_config
    from common.models import build_policy, build_tokenizer
    from learner.checkpoint import save_checkpoint

    run_dir = root / "bench-serve"
    cfg = load_config("tiny")
    cfg.run.name = "bench-serve"
    cfg.save(run_dir / "config.yaml")
    tok = build_tokenizer(cfg.model)
    flow = torch.nn.Linear(2, 2)
    save_checkpoint(run_dir, 1, build_policy(cfg.model, tok), tok, flow, torch.optim.AdamW(flow.parameters()), {})
    return run_dir


def pct(values: list[float], q: float) -> float | None:
    return round(sorted(values)[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def direct(checkpoint: Path, clients: int, seconds: float, n: int, decode: str) -> dict:
    from serving.core import Rewriter, RewriteRequest

    rewriter = Rewriter.from_run(checkpoint)
    latencies, rewrites, i, end = [], 0, 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        batch = [RewriteRequest(prompt=PROMPTS[(i + j) % len(PROMPTS)], n=n, decode=decode, seed=i + j)
                 for j in range(clients)]
        t0 = time.perf_counter()
        rewrites += sum(len(r) for r in rewriter.rewrite(batch))
        latencies.append(time.perf_counter() - t0)
        i += clients
    total = sum(latencies)
    return {"rewrites_per_s": round(rewrites / total, 2), "batch_p50_s": pct(latencies, 0.5),
            "batch_p99_s": pct(latencies, 0.99), "batches": len(latencies)}


def load(url: str, clients: int, seconds: float, n: int, decode: str, during=None) -> dict:
    """`clients` threads POSTing for `seconds`; `during(elapsed)` is called from the main thread each 0.2 s."""
    results: list[tuple[float, float, bool, int]] = []  # (start offset, latency, ok, rewrites)
    start, lock = time.perf_counter(), threading.Lock()

    def client(k: int) -> None:
        i = 0
        while (t0 := time.perf_counter()) - start < seconds:
            body = json.dumps({"prompt": PROMPTS[(k + i) % len(PROMPTS)], "n": n, "decode": decode, "seed": i}).encode()
            req = urllib.request.Request(url + "/v1/rewrite", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as res:
                    count, ok = len(json.loads(res.read())["rewrites"]), res.status == 200
            except (urllib.error.URLError, OSError, ValueError):
                count, ok = 0, False
            with lock:
                results.append((t0 - start, time.perf_counter() - t0, ok, count))
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if during is not None:
            during(time.perf_counter() - start)
        time.sleep(0.2)
    wall = time.perf_counter() - start
    good = [r for r in results if r[2]]
    ok_times = sorted(r[0] + r[1] for r in good)
    gap = max((b - a for a, b in zip(ok_times, ok_times[1:])), default=None)
    return {"requests": len(results), "failed": len(results) - len(good),
            "rewrites_per_s": round(sum(r[3] for r in good) / wall, 2),
            "p50_s": pct([r[1] for r in good], 0.5), "p99_s": pct([r[1] for r in good], 0.99),
            "longest_gap_without_success_s": round(gap, 2) if gap is not None else None}


#: process kinds by a piece of their command line (Ray names its workers `ray::<Actor>`)
KINDS = (("Policy", "policy replica"), ("Scorer", "scorer replica"), ("Api", "ingress replica"),
         ("ProxyActor", "HTTP proxy"), ("ServeController", "serve controller"), ("raylet", "raylet"),
         ("gcs_server", "GCS"), ("ray::", "other Ray workers"))


def cpu_by_kind() -> dict[str, float]:
    """CPU seconds (user + system) of every process on this machine so far, by kind (/proc, Linux): the clients
    are this process; what is not Ray's nor ours is `other`."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        kind = "bench clients" if int(entry.name) == os.getpid() else next(
            (name for key, name in KINDS if key in cmd), "other")
        out[kind] = out.get(kind, 0.0) + seconds
    return out


def cpu_split(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Each kind's share of the machine's CPU over `wall` seconds (all cores = 1)."""
    total = wall * (os.cpu_count() or 1)
    return {kind: round((after.get(kind, 0.0) - before.get(kind, 0.0)) / total, 3)
            for kind in sorted(after, key=lambda k: before.get(k, 0.0) - after[k])}


def kill_policy_replica() -> str:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "Policy" in actor["name"] and "REPLICA" in actor["name"].upper():
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return actor["name"]
    raise RuntimeError("no Policy replica found among the named actors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a run directory (default: a tiny random run made here)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients = direct batch size (default 8)")
    ap.add_argument("--seconds", type=float, default=20, help="length of each phase (default 20)")
    ap.add_argument("--n", type=int, default=4, help="rewrites per request (default 4)")
    ap.add_argument("--decode", choices=["sample", "beam"], default="sample")
    ap.add_argument("--kill", action="store_true", help="phase 3: kill the Policy replica under load")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the direct phase (default 2)")
    ap.add_argument("--policy-replicas", type=int, default=1,
                    help="replicas of the policy deployment (default 1; each decodes on one thread)")
    args = ap.parse_args(argv)
    import torch
    from ray import serve

    from common.cluster import init_ray
    from serving.cli import start

    torch.set_num_threads(args.threads)
    init_ray(None, log_to_driver=False)  # replicas' logs stay in /tmp/ray: stdout is the JSON alone
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_run(Path(tmp))
        out: dict = {"bench": "serve", "clients": args.clients, "policy_replicas": args.policy_replicas,
                     "seconds": args.seconds, "n": args.n, "decode": args.decode,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
        out["direct"] = direct(checkpoint, args.clients, args.seconds, args.n, args.decode)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        url = start(Namespace(checkpoint=str(checkpoint), host="127.0.0.1", port=port, no_render=True,
                              policy_replicas=args.policy_replicas, scorer_replicas=1, scorer_gpus=0,
                              refine=False, refine_gpus=0,
                              ray_address=None))
        out["serve_start_s"] = round(time.perf_counter() - t0, 1)
        load(url, 1, 2, args.n, args.decode)  # warm-up
        cpu0, t0 = cpu_by_kind(), time.perf_counter()
        out["served"] = load(url, args.clients, args.seconds, args.n, args.decode)
        out["served"]["cpu_share_by_process"] = cpu_split(cpu0, cpu_by_kind(), time.perf_counter() - t0)
        out["ratio_served_to_direct"] = round(out["served"]["rewrites_per_s"] / out["direct"]["rewrites_per_s"], 3)
        if args.kill:
            killed: dict = {}

            def during(elapsed: float) -> None:
                if not killed and elapsed > args.seconds / 3:
                    killed.update(name=kill_policy_replica(), at_s=round(elapsed, 1))
            out["replica_killed"] = {**load(url, args.clients, args.seconds, args.n, args.decode, during), **killed}
            k = out["replica_killed"]
            k["error_rate"] = round(k["failed"] / max(1, k["requests"]), 3)
        serve.shutdown()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
