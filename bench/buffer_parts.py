"""Where the replay buffer's insert cost goes above the bare write floor; prints one JSON object.

    python bench/buffer_parts.py [--n 10240] [--reps 3] [--out parts.json]

One private redis-server (AOF on, `appendfsync everysec`, `hash-max-listpack-value 4096` as in
bench/buffer.py), one writer, batches of 256 of the same realistic trajectories (bench/buffer.py's
Pool), each variant writing `--n` of them into keys of its own, the variants interleaved `--reps`
times; the figure is the server process's CPU per trajectory (INFO cpu, no AOF-rewrite child), median
over the repetitions. From the floor up to `ReplayBuffer.add`, one guarantee at a time:

  floor          HSET (the trajectory's fields) + ZADD prio + XADD fresh {id}, a batch per MULTI/EXEC
  floor_trim     the fresh entry as ours writes it: MAXLEN ~ (the stream stays bounded) and its log-reward
  lua_write      the floor's three writes made by a Lua script from the batch's ARGV (what an atomic
                 script that decides per trajectory has to do: every field crosses into Lua and back)
  stage_rename   the hashes pipelined under staging keys, a script RENAMEs them into place + ZADD + XADD
                 (an alternative to lua_write, measured, not adopted: see docs/benchmarks.md)
  ours_no_dedup  ReplayBuffer.add with buffer.dedup=false: idempotent by id, eviction, counters, validation
  ours           ReplayBuffer.add as configured by default (dedup on: a digest index, read and written)
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from buffer import ReplayBuffer  # noqa: E402
from common.redis_server import RedisServer  # noqa: E402
from common.trajectory import to_redis_hash  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_buffer", Path(__file__).with_name("buffer.py"))
bench_buffer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_buffer)

LUA_WRITE = """
local p, n = 2, tonumber(ARGV[1])
for i = 1, n do
  local id, score, nf = ARGV[p], ARGV[p + 1], tonumber(ARGV[p + 2])
  redis.call('HSET', KEYS[1] .. id, unpack(ARGV, p + 3, p + 2 + nf))
  redis.call('ZADD', KEYS[2], score, id)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'id', id, 'log_reward', score)
  p = p + 3 + nf
end
return n
"""
STAGE_RENAME = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local id, score = ARGV[2 * i], ARGV[2 * i + 1]
  redis.call('RENAME', KEYS[4] .. id, KEYS[1] .. id)
  redis.call('ZADD', KEYS[2], score, id)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100000, '*', 'id', id, 'log_reward', score)
end
return n
"""
VARIANTS = ("floor", "floor_trim", "lua_write", "stage_rename", "ours_no_dedup", "ours")


def write(client, scripts, url: str, variant: str, tag: str, batches) -> None:
    keys = [f"parts:{tag}:traj:", f"parts:{tag}:prio", f"parts:{tag}:fresh", f"parts:{tag}:stage:"]
    if variant.startswith("ours"):
        buf = ReplayBuffer(url, f"parts{tag}", capacity=10**7, dedup=variant == "ours")
        for batch in batches:
            buf.add([t for t, _ in batch])
        buf.close()
        return
    for batch in batches:
        if variant == "lua_write":
            argv: list = [len(batch)]
            for t, fields in batch:
                argv += [t.id, repr(t.log_reward), 2 * len(fields)]
                for name, value in fields.items():
                    argv += [name, value]
            scripts["lua_write"](keys=keys[:3], args=argv)
            continue
        pipe = client.pipeline(transaction=True)
        argv = [len(batch)]
        for t, fields in batch:
            if variant == "stage_rename":
                pipe.hset(keys[3] + t.id, mapping=fields)
                argv += [t.id, repr(t.log_reward)]
                continue
            pipe.hset(keys[0] + t.id, mapping=fields)
            pipe.zadd(keys[1], {t.id: t.log_reward})
            if variant == "floor":
                pipe.xadd(keys[2], {"id": t.id})
            else:
                pipe.xadd(keys[2], {"id": t.id, "log_reward": repr(t.log_reward)}, maxlen=100000, approximate=True)
        if variant == "stage_rename":
            scripts["stage_rename"](keys=keys, args=argv, client=pipe)
        pipe.execute()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10240, help="trajectories per variant and repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    server = RedisServer(tempfile.mkdtemp(prefix="pag-bench-parts-")).start()
    try:
        probe = ReplayBuffer(server.url, "parts-probe", create=False)
        client = probe.client
        client.config_set("hash-max-listpack-value", 4096)
        scripts = {"lua_write": client.register_script(LUA_WRITE), "stage_rename": client.register_script(STAGE_RENAME)}
        us: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            for i, variant in enumerate(VARIANTS):
                pool = bench_buffer.Pool(100 * rep + i)
                batches = [[(t, to_redis_hash(t)) for t in pool.batch(s, min(256, args.n - s))]
                           for s in range(0, args.n, 256)]
                bench_buffer.settle(probe)
                cpu0 = bench_buffer.redis_cpu_s(client, children=False)
                write(client, scripts, server.url, variant, f"{variant}{rep}", batches)
                us[variant].append((bench_buffer.redis_cpu_s(client, children=False) - cpu0) * 1e6 / args.n)
        probe.close()
    finally:
        server.kill()  # a throwaway data dir: no need to wait for an AOF flush
        shutil.rmtree(server.data_dir, ignore_errors=True)
    median = {v: round(statistics.median(x), 2) for v, x in us.items()}
    report = {"command": " ".join(["python", "bench/buffer_parts.py", *sys.argv[1:]]), "n": args.n,
              "reps": args.reps, "server_cpu_us_per_trajectory": median,
              "runs": {v: [round(x, 2) for x in xs] for v, xs in us.items()},
              "ratio_to_floor": {v: round(m / median["floor"], 3) for v, m in median.items()}}
    bench_buffer.emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
