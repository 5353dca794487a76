"""Benchmark of the Redis replay service; prints one JSON object.

    python bench/buffer.py                       # private redis-server (AOF everysec) in a temp dir
    python bench/buffer.py --redis-url redis://:pw@host:6379/0 --out bench.json

Measures, in one run against one server:
  * the ceiling: `redis-benchmark -q -P 16 -t set` (and the same with a payload as large as a
    trajectory's hash, `-d BYTES`), on the empty server before anything else;
  * inserts/s from W writer processes calling `ReplayBuffer.add` in batches, filling the buffer
    to each size (10k, 100k, 1M by default; capacity = the largest size, so nothing is evicted);
  * `sample(128)` latency p50/p99 at each size, quiescent: the whole call (Redis script + msgpack
    decode in Python) and the Redis script alone;
  * steady state at the paper's capacity (5,000) with eviction and dedup doing work;
  * the server's CPU time per trajectory and per pipelined SET (INFO cpu): their ratio is the
    insert rate, as a fraction of SET's, that Redis could take if writers did not share its CPUs;
  * the bare write floor at each size: the same trajectories written by the same writers as one
    HSET + ZADD + XADD each, a batch per MULTI/EXEC, filled to the same size right after ours —
    server CPU per trajectory of ours over the floor's, with and without AOF-rewrite children.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from buffer import ReplayBuffer, lua  # noqa: E402
from buffer.testing import make_trajectory  # noqa: E402
from common.trajectory import Trajectory, to_redis_hash  # noqa: E402


def ceiling(url: str, extra: list[str], client) -> dict | None:
    parts = urlsplit(url)
    if parts.scheme != "redis":
        return None
    cmd = ["redis-benchmark", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
           "-q", "-P", "16", "-t", "set", "-n", "1000000", *extra]
    if parts.password:
        cmd += ["-a", parts.password] + (["--user", parts.username] if parts.username else [])
    cpu0 = redis_cpu_s(client)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu_us = (redis_cpu_s(client) - cpu0) * 1e6 / 1_000_000
    match = re.findall(r"SET: ([\d.]+) requests per second", out)
    return {"ops_per_s": float(match[-1]) if match else None, "server_cpu_us_per_op": round(cpu_us, 3)}


class Pool:
    """Trajectories with realistic sizes, made cheaply: token lists are shared, text and id vary."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.templates = [make_trajectory(i, 0.0, rng=self.rng, length=int(self.rng.integers(15, 76)))
                          for i in range(256)]
        self.seed = seed

    def batch(self, start: int, n: int) -> list[Trajectory]:
        rewards = self.rng.normal(0.0, 5.0, size=n)
        out = []
        for k in range(n):
            t = self.templates[(start + k) % len(self.templates)]
            out.append(Trajectory(prompt=t.prompt, response=f"{t.response} w{self.seed} {start + k}",
                                  prompt_ids=t.prompt_ids, response_ids=t.response_ids,
                                  ref_logprobs=t.ref_logprobs, policy_version=(start + k) // 1000,
                                  scores=t.scores, log_reward=float(rewards[k])))
        return out


def writer(url: str, run: str, capacity: int, seed: int, count: int, batch: int,
           barrier, results) -> None:
    buf = ReplayBuffer(url, run, capacity=capacity)
    pool = Pool(seed)
    batches = [pool.batch(s, min(batch, count - s)) for s in range(0, count, batch)]
    barrier.wait()
    t0 = time.perf_counter()
    for b in batches:
        buf.add(b)
    results.put((count, t0, time.perf_counter()))
    buf.close()


def floor_writer(url: str, run: str, capacity: int, seed: int, count: int, batch: int,
                 barrier, results) -> None:
    """The bare write floor: the same trajectories, each one HSET of the same fields + ZADD + XADD, a batch per
    MULTI/EXEC pipeline — no dedup, no idempotency, no eviction, no counters, no validation."""
    from buffer.connection import connect

    client = connect(url)
    pool = Pool(seed)
    hashes = [[(t.id, t.log_reward, to_redis_hash(t)) for t in pool.batch(s, min(batch, count - s))]
              for s in range(0, count, batch)]
    barrier.wait()
    t0 = time.perf_counter()
    for b in hashes:
        pipe = client.pipeline(transaction=True)
        for tid, score, fields in b:
            pipe.hset(f"floor:{run}:traj:{tid}", mapping=fields)
            pipe.zadd(f"floor:{run}:prio", {tid: score})
            pipe.xadd(f"floor:{run}:fresh", {"id": tid})
        pipe.execute()
    results.put((count, t0, time.perf_counter()))
    client.close()


def fill(url: str, run: str, capacity: int, writers: int, per_writer: int, batch: int, seed0: int,
         target=writer) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(writers + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, run, capacity, seed0 + w, per_writer, batch, barrier, results))
             for w in range(writers)]
    for p in procs:
        p.start()
    barrier.wait()  # every writer has its batches ready
    done = [results.get() for _ in procs]
    for p in procs:
        p.join()
    total = sum(d[0] for d in done)
    wall = max(d[2] for d in done) - min(d[1] for d in done)
    return {"inserted": total, "seconds": round(wall, 3), "inserts_per_s": round(total / wall, 1)}


def redis_cpu_s(client, children: bool = True) -> float:
    """CPU seconds the server has used, its AOF-rewrite children included unless `children=False` (INFO cpu).
    Unlike wall-clock command timings this does not grow when the machine is busy with other work."""
    info = client.info("cpu")
    keys = ("used_cpu_sys", "used_cpu_user") + (("used_cpu_sys_children", "used_cpu_user_children") if children else ())
    return sum(float(info.get(k, 0.0)) for k in keys)


def measured_fill(client, url: str, run: str, capacity: int, writers: int, per_writer: int, batch: int, seed: int,
                  target=writer) -> dict:
    """`fill` with the server's CPU per trajectory: all of it, and the server process alone (no AOF-rewrite child)."""
    both, alone = redis_cpu_s(client), redis_cpu_s(client, children=False)
    phase = fill(url, run, capacity, writers, per_writer, batch, seed, target)
    n = per_writer * writers
    phase["server_cpu_us_per_trajectory"] = round((redis_cpu_s(client) - both) * 1e6 / n, 2)
    alone = redis_cpu_s(client, children=False) - alone
    phase["server_cpu_us_per_trajectory_no_children"] = round(alone * 1e6 / n, 2)
    return phase


def settle(buf: ReplayBuffer) -> int:
    """Wait for a background AOF rewrite to finish, so latency is measured on a quiescent server;
    returns how many rewrites the server has done."""
    while True:
        info = buf.client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return int(info.get("aof_rewrites", 0))
        time.sleep(0.2)


def latency(buf: ReplayBuffer, calls: int, n: int = 128) -> dict:
    def script_call() -> None:
        buf._sample(keys=[buf._keys["prio"]],
                    args=[buf._traj_prefix, n, buf.prioritization, repr(buf.priority_temperature),
                          lua.NUM_BANDS, lua.BAND_WIDTH,
                          buf.rng.random(lua.UNIFORMS_PER_ATTEMPT * (2 * n + 16)).astype("<f8").tobytes()])

    for _ in range(20):
        buf.sample(n)
    full, script = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        got = buf.sample(n)
        full.append(time.perf_counter() - t0)
        assert len(got) == n
        t0 = time.perf_counter()
        script_call()
        script.append(time.perf_counter() - t0)

    def ms(xs: list[float], q: float) -> float:
        return round(float(np.percentile(xs, q)) * 1e3, 3)

    return {"calls": calls, "sample_p50_ms": ms(full, 50), "sample_p99_ms": ms(full, 99),
            "script_p50_ms": ms(script, 50), "script_p99_ms": ms(script, 99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=None, help="default: a private redis-server in a temp dir")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sample-calls", type=int, default=1000)
    parser.add_argument("--steady-inserts", type=int, default=100_000, help="inserts at capacity 5000 (0: skip)")
    parser.add_argument("--hash-listpack-value", type=int, default=4096,
                        help="CONFIG SET hash-max-listpack-value (bytes) before the run, so a trajectory "
                             "hash stays one compact listpack; 0 leaves the server's setting (default 64)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the bare write floor (HSET + ZADD + XADD in MULTI/EXEC, same trajectories, "
                             "filled to the same sizes right after ours)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    server = None
    url = args.redis_url
    if url is None:
        from common.redis_server import RedisServer
        server = RedisServer(tempfile.mkdtemp(prefix="pag-bench-")).start()
        url = server.url
    report: dict = {
        "command": " ".join(["python", "bench/buffer.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "config": {"writers": args.writers, "batch": args.batch, "sizes": sizes,
                   "server": "private redis-server, appendonly yes, appendfsync everysec" if server else "given"},
    }
    try:
        probe = ReplayBuffer(url, "bench-probe", create=False)
        info = probe.client.info("server")
        report["machine"]["redis"] = info.get("redis_version")
        if args.hash_listpack_value:
            probe.client.config_set("hash-max-listpack-value", args.hash_listpack_value)
        report["config"]["hash_max_listpack_value"] = int(
            probe.client.config_get("hash-max-listpack-value")["hash-max-listpack-value"])
        pool = Pool(0)
        hash_bytes = int(np.mean([sum(len(v if isinstance(v, bytes) else v.encode()) for v in to_redis_hash(t).values())
                                  for t in pool.batch(0, 200)]))
        report["trajectory_hash_bytes_mean"] = hash_bytes
        report["ceiling"] = {"set_P16": ceiling(url, [], probe.client),
                             f"set_P16_d{hash_bytes}": ceiling(url, ["-d", str(hash_bytes)], probe.client)}
        probe.client.delete("key:__rand_int__")
        probe.close()

        run = f"bench{os.getpid()}"
        buf = ReplayBuffer(url, run, capacity=max(sizes), seed=0)
        report["fill"], report["sample"] = [], {}
        have, seed = 0, 100
        for size in sizes:
            per_writer = (size - have) // args.writers
            if per_writer > 0:
                phase = measured_fill(buf.client, url, run, max(sizes), args.writers, per_writer, args.batch, seed)
                if args.floor:  # the same trajectories the bare way, to the same size, right after
                    settle(buf)
                    bare = measured_fill(buf.client, url, run, max(sizes), args.writers, per_writer, args.batch,
                                         seed, target=floor_writer)
                    phase["floor"] = bare
                    phase["ratio_to_floor"] = round(phase["server_cpu_us_per_trajectory"]
                                                    / bare["server_cpu_us_per_trajectory"], 3)
                    phase["ratio_to_floor_no_children"] = round(
                        phase["server_cpu_us_per_trajectory_no_children"]
                        / bare["server_cpu_us_per_trajectory_no_children"], 3)
                seed += args.writers
                have = len(buf)
                report["fill"].append({"to_size": have, **phase})
            rewrites = settle(buf)
            report["sample"][str(size)] = {"size": len(buf), "aof_rewrites_so_far": rewrites,
                                           **latency(buf, args.sample_calls)}
            print(f"size {len(buf)}: {report['fill'][-1] if report['fill'] else ''} {report['sample'][str(size)]}",
                  file=sys.stderr)
        memory = buf.client.info("memory")
        report["redis_used_memory_bytes_at_max"] = int(memory["used_memory"])
        buf.close()

        if args.steady_inserts:
            steady_run = f"steady{os.getpid()}"
            steady = ReplayBuffer(url, steady_run, capacity=5000, seed=1)
            per_writer = args.steady_inserts // args.writers
            cpu0 = redis_cpu_s(steady.client)
            phase = fill(url, steady_run, 5000, args.writers, per_writer, args.batch, 900)
            phase["server_cpu_us_per_trajectory"] = round(
                (redis_cpu_s(steady.client) - cpu0) * 1e6 / (per_writer * args.writers), 2)
            settle(steady)
            report["steady_capacity_5000"] = {**phase, "size": len(steady), "evicted": steady.stats()["evicted"],
                                              **latency(steady, min(args.sample_calls, 300))}
            steady.close()

        total = sum(f["inserted"] for f in report["fill"])
        seconds = sum(f["seconds"] for f in report["fill"])
        ins = total / seconds if seconds else 0.0
        cpu_per_traj = sum(f["server_cpu_us_per_trajectory"] * f["inserted"] for f in report["fill"]) / total
        set_ops = report["ceiling"]["set_P16"]["ops_per_s"]
        set_cpu = report["ceiling"]["set_P16"]["server_cpu_us_per_op"]
        largest = report["sample"][str(sizes[-1])]
        report["summary"] = {
            "inserts_per_s": round(ins, 1),
            "insert_fraction_of_pipelined_set": round(ins / set_ops, 4) if set_ops else None,
            "target_insert_fraction": 0.25,
            "server_cpu_us_per_trajectory": round(cpu_per_traj, 2),
            "server_cpu_us_per_pipelined_set": set_cpu,
            "server_bound_fraction_of_pipelined_set": round(set_cpu / cpu_per_traj, 4) if cpu_per_traj else None,
            "ratio_to_floor_by_size": {str(f["to_size"]): f.get("ratio_to_floor") for f in report["fill"]},
            "ratio_to_floor_no_children_by_size": {str(f["to_size"]): f.get("ratio_to_floor_no_children")
                                                   for f in report["fill"]},
            f"sample128_p99_ms_at_{sizes[-1]}": largest["sample_p99_ms"],
            f"script_p99_ms_at_{sizes[-1]}": largest["script_p99_ms"],
            "target_sample128_p99_ms": 10.0,
        }
        report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if server is not None:
            server.kill()  # a throwaway data dir: no need to wait for an AOF flush
            shutil.rmtree(server.data_dir, ignore_errors=True)
    emit(report, args.out)
    return 0


def emit(report: dict, out: str | None) -> None:
    """The JSON on stdout, and into `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
