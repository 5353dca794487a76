"""What a chaos soak (bench/chaos.py) sees of the run, and the audit of it: lost, twice delivered, rewound, grown.

`Watch` polls the run each second (Redis counters and every stored id, metrics.jsonl, the latest checkpoint, the
processes under the driver and their RSS, from /proc). The audit functions read that, the run's Redis and files,
and return JSON-ready dicts with an `ok` flag; `audit` gathers them and says which failed. docs/chaos.md explains each.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

#: command-line prefixes of the run's processes (`ps -eo args`), by role
ROLE_PREFIX = {"learner": "ray::_LearnerActor", "sampler": "ray::_SamplerActor", "weights": "ray::WeightStore"}
#: how much of the run a fault can leave delivered-but-unacknowledged: the roles it stops holding work
FRESH_IN_FLIGHT = {"learner": 1, "redis": 1}  # × the fresh trajectories of one learner step
PENDING_IN_FLIGHT = {"reward": 1, "redis": 2, "scale": 1}  # × reward.batch_size (redis: every worker, ≤ 2)


def role_of(args: str) -> Optional[str]:
    """The role of a process of the run from its command line, or None (Ray's idle workers, agents)."""
    for role, prefix in ROLE_PREFIX.items():
        if args.startswith(prefix):
            return role
    if args.startswith("ray::") and "RewardWorkerActor" in args:
        return "reward"
    if "/raylet/raylet " in args:
        return "raylet"
    return "gcs" if "/gcs/gcs_server " in args else None


def process_tree(root: int) -> dict[int, str]:
    """pid → command line, for `root` and every descendant (read from /proc)."""
    parent, args = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            args[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(kids)
        frontier = kids
    return {pid: args[pid].strip() for pid in tree if pid in args}


def started(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (tells a pid from its reuse), or None when gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def rss_mb(pid: int) -> Optional[float]:
    """VmRSS of a process in MB, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Watch:
    """What the soak sees of the run, polled each second: counters, every stored id, steps, checkpoints, RSS."""

    def __init__(self, run: str, run_dir: Path, url: str) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from common.constants import meta_key, prio_key

        self.keys = {"prio": prio_key(run), "meta": meta_key(run)}
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        self.run_dir, self.ids, self.meta = run_dir, set(), {}
        self.lines: list[tuple[float, int, Optional[float]]] = []  # (t, step, reward)
        self.checkpoints: list[tuple[float, int]] = []
        self.procs: dict[int, dict] = {}
        self.tree: dict[int, str] = {}
        self._offset = 0

    def poll(self, now: float, driver: int, redis_pid: Optional[int], ids: bool, rss: bool) -> None:
        """Counters (and, with `ids`, every id in `prio`), new metrics lines, the latest checkpoint, the process
        tree under the driver (and, with `rss`, each one's RSS); Redis being down or stopped is skipped."""
        self._poll_redis(ids)
        self._poll_files(now)
        self.tree = process_tree(driver)
        if redis_pid is not None:
            self.tree[redis_pid] = "redis-server"
        for pid, args in self.tree.items():
            role = "driver" if pid == driver else "redis" if pid == redis_pid else role_of(args)
            if role is None:
                continue
            rec = self.procs.setdefault(pid, {"role": role, "first": now, "rss": [], "start": started(pid)})
            rec["last"] = now
            if rss and (mb := rss_mb(pid)) is not None:
                used = self.meta.get("_used_mb", 0.0) if role == "redis" else 0.0  # redis: beyond its data
                rec["rss"].append((round(now, 1), round(mb - used, 1)))

    def _poll_redis(self, ids: bool) -> None:
        from redis import RedisError

        try:
            meta = {k.decode(): v.decode() for k, v in self.client.hgetall(self.keys["meta"]).items()}
            meta["_used_mb"] = int(self.client.info("memory")["used_memory"]) / 2**20
            self.meta = meta
            if ids:
                self.ids.update(self.client.zrange(self.keys["prio"], 0, -1))
        except (RedisError, OSError):
            pass  # down, restarting or stopped: a fault under way

    def _poll_files(self, now: float) -> None:
        from common.constants import REWARD

        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            with path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
            done = chunk[: chunk.rfind("\n") + 1]
            self._offset += len(done.encode())
            for line in done.splitlines():
                row = json.loads(line)
                self.lines.append((now, int(row["step"]), row.get(REWARD)))
        try:
            step = int((self.run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
        except (OSError, ValueError):
            return
        if not self.checkpoints or self.checkpoints[-1][1] != step:
            self.checkpoints.append((now, step))

    def counter(self, name: str) -> int:
        return int(self.meta.get(name, 0) or 0)

    def pids(self, role: str) -> list[int]:
        return sorted(pid for pid, rec in self.procs.items() if rec["role"] == role and pid in self.tree)

    def gcs_address(self) -> Optional[str]:
        for args in self.tree.values():
            if "/raylet/raylet " in args:
                return next((a.split("=", 1)[1] for a in args.split() if a.startswith("--gcs-address=")), None)
        return None


def _stats(values: list[float]) -> dict[str, Optional[float]]:
    return {"median": round(statistics.median(values), 2) if values else None,
            "max": round(max(values), 2) if values else None}


def recovery(faults: list) -> dict[str, Any]:
    """Per fault kind: how many, how many recovered, and the recovery times."""
    out: dict[str, Any] = {}
    for kind in sorted({f.kind for f in faults}):
        mine = [f for f in faults if f.kind == kind]
        out[kind] = {"n": len(mine), "recovered": sum(f.recovered is True for f in mine),
                     "skipped": sum(f.recovered is None for f in mine),
                     "fresh_s": _stats([f.fresh_s for f in mine if f.fresh_s is not None]),
                     "step_s": _stats([f.step_s for f in mine if f.step_s is not None]),
                     "respawn_s": _stats([f.respawn_s for f in mine if f.respawn_s is not None])}
    return out


def trajectories(client, run: str) -> dict[str, Any]:
    """Every id the buffer ever acknowledged (seen in `prio` by any poll) is still stored, or was evicted."""
    from common.constants import fresh_key, meta_key, pending_key, prio_key, traj_key

    final = set(client.zrange(prio_key(run), 0, -1))
    meta = {k.decode(): v.decode() for k, v in client.hgetall(meta_key(run)).items()}
    count = {name: int(meta.get(name, 0) or 0) for name in ("added", "evicted", "rejected", "repeats", "duplicates")}
    ids = sorted(final)
    no_hash = 0
    for i in range(0, len(ids), 2000):
        pipe = client.pipeline(transaction=False)
        for tid in ids[i:i + 2000]:
            pipe.exists(traj_key(run, tid.decode()))
        no_hash += sum(not n for n in pipe.execute())
    return {"final": len(final), "no_hash": no_hash, **count,
            "pending_backlog": client.xlen(pending_key(run)), "fresh_backlog": client.xlen(fresh_key(run)),
            "zcard_is_added_minus_evicted_rejected":
                len(final) == count["added"] - count["evicted"] - count["rejected"]}


def lost(seen: set, report: dict[str, Any]) -> dict[str, Any]:
    """Ids seen once and gone at the end, beyond what eviction and rejection took out (each counted)."""
    return {"acknowledged_seen": len(seen), "missing": report["missing"],
            "lost": max(0, report["missing"] - report["evicted"] - report["rejected"])}


def at_least_once(meta: dict[str, str], faults: list, cfg) -> dict[str, Any]:
    """Second deliveries (XAUTOCLAIM takeovers, meta `fresh_reclaimed` / `pending_reclaimed`) within what the
    faults left in flight: one learner step's fresh half per learner or redis fault, one reward batch per worker."""
    per_step = cfg.derived()["fresh_per_micro_batch"] * cfg.learner.grad_accum
    fresh_bound = pending_bound = 0
    for f in faults:
        if f.recovered is None and not f.targets:
            continue
        roles = {t["role"] for t in f.targets} | ({"scale"} if f.kind == "scale" else set())
        fresh_bound += per_step * sum(FRESH_IN_FLIGHT.get(r, 0) for r in roles)
        pending_bound += cfg.reward.batch_size * sum(PENDING_IN_FLIGHT.get(r, 0) for r in roles)
    if "fresh_reclaimed" not in meta:
        return {"ok": True, "measured": False, "note": "this buffer keeps no *_reclaimed counters"}
    fresh, pending = int(meta.get("fresh_reclaimed", 0)), int(meta.get("pending_reclaimed", 0))
    return {"ok": fresh <= fresh_bound and pending <= pending_bound, "measured": True,
            "fresh_reclaimed": fresh, "fresh_bound": fresh_bound, "fresh_per_step": per_step,
            "pending_reclaimed": pending, "pending_bound": pending_bound, "reward_batch": cfg.reward.batch_size}


def steps(lines: list[tuple], faults: list, checkpoints: list[tuple[float, int]]) -> dict[str, Any]:
    """metrics.jsonl's steps go up by one, except where a killed learner resumed: there they start again right
    after the latest checkpoint at the kill (never an older one), and the checkpoints polled never go back."""
    kills = [f for f in faults if any(t["role"] == "learner" for t in f.targets)]
    rewinds, unexplained, gaps = [], [], 0
    for (_, prev, _), (t, step, _) in zip(lines, lines[1:]):
        if step == prev + 1:
            continue
        kill = max((f for f in kills if f.at <= t), key=lambda f: f.at, default=None)
        if step > prev + 1:
            gaps += 1  # a step done and checkpointed whose metrics line died with the learner
            continue
        row = {"from": prev, "to": step, "fault": kill.index if kill else None,
               "checkpoint": kill.checkpoint if kill else None, "steps_redone": prev - step + 1}
        rewinds.append(row)
        if kill is None or step != (kill.checkpoint or 0) + 1:
            unexplained.append(row)
    ckpt = [s for _, s in checkpoints]
    ckpt_ok = all(b >= a for a, b in zip(ckpt, ckpt[1:]))
    return {"ok": not unexplained and ckpt_ok and bool(lines), "final": lines[-1][1] if lines else None,
            "lines": len(lines), "rewinds": rewinds, "unexplained": unexplained, "gaps": gaps,
            "checkpoints_monotonic": ckpt_ok}


def checkpoints(run_dir: Path) -> dict[str, Any]:
    """Every kept checkpoint: state.json parses and names its step, every safetensors file loads; the latest
    policy loads with transformers' from_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from common.runs import latest_checkpoint

    failed, checked = [], []
    for path in sorted((run_dir / "checkpoints").glob("step_*")):
        try:
            state = json.loads((path / "state.json").read_text())
            assert int(state["step"]) == int(path.name.removeprefix("step_")), "state.json names another step"
            for f in path.rglob("*.safetensors"):
                load_file(str(f))
            checked.append(path.name)
        except Exception as exc:  # noqa: BLE001 — reported, the audit fails
            failed.append(f"{path.name}: {type(exc).__name__}: {exc}")
    latest = latest_checkpoint(run_dir)
    try:
        AutoModelForCausalLM.from_pretrained(str(latest / "policy"))
    except Exception as exc:  # noqa: BLE001
        failed.append(f"latest {latest}: {type(exc).__name__}: {exc}")
    return {"ok": bool(checked) and not failed, "checked": checked, "latest": latest.name if latest else None,
            "failed": failed}


def rss(procs: dict[int, dict], duration: float, ratio: float, floor_mb: float = 100.0) -> dict[str, Any]:
    """Each long-lived process (alive ≥ half the soak, ≥ 8 samples): median RSS of its last quarter against its
    second quarter. Unbounded growth: more than `ratio` times and `floor_mb` more. redis-server: RSS beyond
    used_memory (its data grows by design)."""
    rows, grew = [], []
    for pid, rec in sorted(procs.items()):
        mb = [v for _, v in rec["rss"]]
        if len(mb) < 8 or rec.get("last", 0) - rec["first"] < duration / 2:
            continue
        n = len(mb)
        early, late = statistics.median(mb[n // 4: n // 2]), statistics.median(mb[3 * n // 4:])
        row = {"role": rec["role"], "pid": pid, "alive_s": round(rec["last"] - rec["first"]),
               "first_mb": mb[0], "early_mb": round(early, 1), "late_mb": round(late, 1), "max_mb": max(mb)}
        rows.append(row)
        if late > ratio * max(early, 1.0) and late - early > floor_mb:
            grew.append(row)
    return {"ok": not grew, "processes": rows, "unbounded": grew}


def audit(soak, args, cfg) -> dict[str, Any]:
    """Everything above for one soak; `passed` only when each part is ok, every fault recovered and
    the driver stopped cleanly (exit 130 after SIGINT)."""
    w = soak.watch
    traj = trajectories(w.client, soak.run)
    final = set(w.client.zrange(w.keys["prio"], 0, -1))
    traj["missing"] = len(w.ids - final)
    traj.update(lost(w.ids | final, traj))
    traj["ok"] = traj["lost"] == 0 and traj["no_hash"] == 0 and traj["zcard_is_added_minus_evicted_rejected"]
    duration = w.lines[-1][0] if w.lines else 0.0
    parts = {"trajectories": traj, "at_least_once": at_least_once(w.meta, soak.faults, cfg),
             "steps": steps(w.lines, soak.faults, w.checkpoints), "checkpoints": checkpoints(soak.run_dir),
             "rss": rss(w.procs, duration, args.rss_growth)}
    bad_faults = [f"{f.index}:{f.kind}" for f in soak.faults if f.recovered is False]
    failures = [name for name, part in parts.items() if not part["ok"]]
    if bad_faults:
        failures.append(f"faults not recovered: {', '.join(bad_faults)}")
    rc = soak.driver.returncode
    if rc != 130:
        failures.append(f"pag train exited {rc}, not 130 (stopped by SIGINT): {soak.tail(1500)}")
    faults = [{k: v for k, v in asdict(f).items() if k not in ("added0", "lines0", "pids0")} for f in soak.faults]
    return {"passed": not failures, "failures": failures, "run": soak.run, "soak_s": round(duration, 1),
            "steps_done": w.lines[-1][1] if w.lines else 0, "redis_restarts": soak.redis_restarts,
            "driver_rc": rc, "recovery": recovery(soak.faults), "audit": parts, "faults": faults}


def curve(lines: list[tuple]) -> dict[int, float]:
    """step → reward, the last line of each step (a resumed learner redoes steps; the redone one stands)."""
    out: dict[int, float] = {}
    for _, step, reward in lines:
        if reward is not None:
            out[step] = reward
    return out


def _moving(values: list[float], w: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - w + 1): i + 1]) for i in range(len(values))]


def _mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return round(statistics.fmean(values), 4), round(se, 4)


def compare(soaked: list[tuple], calm: list[tuple], calm_rc: Optional[int]) -> dict[str, Any]:
    """The soaked run's fresh-reward curve against the unperturbed one's, over the steps both have: the mean
    absolute difference of their moving averages, and the last tenth's means with standard errors."""
    a, b = curve(soaked), curve(calm)
    common = sorted(set(a) & set(b))
    if len(common) < 10:
        return {"ok": False, "note": f"only {len(common)} steps in common", "calm_rc": calm_rc}
    w = max(5, len(common) // 20)
    ma, mb = _moving([a[s] for s in common], w), _moving([b[s] for s in common], w)
    tail = common[-max(10, len(common) // 10):]
    (fa, sa), (fb, sb) = _mean_se([a[s] for s in tail]), _mean_se([b[s] for s in tail])
    return {"ok": calm_rc == 0, "calm_rc": calm_rc, "steps": len(common), "window": w,
            "mean_abs_ma_diff": round(statistics.fmean(abs(x - y) for x, y in zip(ma, mb)), 4),
            "reward_sd": round(statistics.stdev([b[s] for s in common]), 4),
            "final": {"steps": [tail[0], tail[-1]], "soaked": [fa, sa], "calm": [fb, sb],
                      "diff_in_se": round((fa - fb) / max((sa ** 2 + sb ** 2) ** 0.5, 1e-12), 2)}}
