"""Chaos soak of `pag train` (issue 21): seeded faults while it trains, recovery times, an audit; one JSON object.

    python bench/chaos.py --minutes 60 --seed 0 --out chaos.json        # exit 0 only when the audit passes
    python bench/chaos.py --minutes 2 --interval 15 25 --stall 5 10     # the suite's short version
    python bench/chaos.py --minutes 60 --compare                        # + an unperturbed run of the same seed

`pag train` runs on the embedded default (tiny preset, its own local Ray) against a redis-server this script
starts (AOF, appendfsync always) and restarts on the same port and directory whenever it dies, as systemd's
Restart=always would. A monkey, from `random.Random(seed)`, waits --interval seconds and picks a fault; docs/chaos.md
says what each fault and each audit line means. Loopback only; only processes this script started are signalled.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chaos_audit import Watch, audit, compare, started  # noqa: E402 — bench/ is on sys.path when run as a script

KINDS = ("kill_redis", "kill_reward", "kill_sampler", "kill_learner", "kill_two", "stall_reward", "stall_redis",
         "scale")
KILLABLE = ("redis", "reward", "sampler", "learner")
#: the soak's overrides: nothing evicted (so a missing id is a lost one), restarts never run out, steps never end
SOAK_OVERRIDES = ("buffer.capacity=1000000", "run.max_restarts=1000")


@dataclass
class Fault:
    """One fault and how the run came back from it (times in seconds since the soak began)."""
    index: int
    kind: str
    at: float
    targets: list[dict] = field(default_factory=list)  # {"role", "pid"}
    end: Optional[float] = None  # the stall's SIGCONT, the scale command's exit; = at for a kill
    duration_s: Optional[float] = None  # a stall's planned length
    respawn_s: Optional[float] = None  # a killed role back as a new process (redis: restarted and answering)
    fresh_s: Optional[float] = None  # from `end` to the first trajectory stored after it (meta `added` grows)
    step_s: Optional[float] = None  # from `end` to the first learner step after it (a new metrics.jsonl line)
    checkpoint: Optional[int] = None  # learner kills: the step of the latest checkpoint at the kill
    recovered: Optional[bool] = None
    note: str = ""
    added0: int = 0
    lines0: int = 0
    pids0: list[int] = field(default_factory=list)


class Soak:
    """One `pag train` against a supervised redis-server; `soak()` runs the monkey, the unperturbed run does not."""

    def __init__(self, args: argparse.Namespace, work: Path, run: str) -> None:
        from common.redis_server import RedisServer

        self.args, self.work, self.run = args, work, run
        self.run_dir = work / "runs" / run
        self.redis = RedisServer(work / f"redis-{run}", appendfsync="always")
        self.rng = random.Random(args.seed)
        self.faults: list[Fault] = []
        self.stalled: dict[int, Fault] = {}  # pid → the stall holding it
        self.scaling: Optional[tuple[subprocess.Popen, Fault]] = None
        self.workers, self.redis_restarts, self.t0 = 1, 0, time.monotonic()
        self.driver: Optional[subprocess.Popen] = None
        self.watch: Optional[Watch] = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self, steps: int) -> None:
        """redis-server, then `pag train` in its own session; returns at its first learner step (time 0)."""
        self.redis.start()
        self.watch = Watch(self.run, self.run_dir, self.redis.url)
        cmd = [sys.executable, "-m", "pag.cli", "train", "--preset", self.args.preset, "--run-name", self.run,
               "--runs-dir", str(self.work / "runs"), "--redis-url", self.redis.url, "--steps", str(steps),
               "--no-report", f"run.seed={self.args.seed}", *SOAK_OVERRIDES, *self.args.overrides]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        self.log = (self.work / f"{self.run}.log").open("w")
        self.driver = subprocess.Popen(cmd, cwd=self.work, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.monotonic() + self.args.start_timeout
        while not self.watch.lines:  # the clock starts at the first learner step
            if self.driver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pag train did not reach a first step (rc {self.driver.poll()}): {self.tail()}")
            self.watch.poll(self.now(), self.driver.pid, self.redis.proc.pid, ids=False, rss=False)
            time.sleep(1)
        self.t0 = time.monotonic()
        self.watch.lines = [(0.0, step, reward) for _, step, reward in self.watch.lines]

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return (self.work / f"{self.run}.log").read_text()[-n:]

    def tick(self, inject: bool, k: int) -> None:
        """One second of the soak: poll, restart a dead redis-server, end stalls, inject, score recoveries."""
        now = self.now()
        if self.redis.proc.poll() is not None:  # Restart=always
            self.redis.start(timeout=60)
            self.redis_restarts += 1
            for f in self.faults:
                if f.respawn_s is None and f.kind.startswith("kill") and any(t["role"] == "redis" for t in f.targets):
                    f.respawn_s = round(self.now() - f.at, 2)
        self.watch.poll(now, self.driver.pid, self.redis.proc.pid, ids=k % 5 == 0, rss=k % 5 == 0)
        for pid, f in list(self.stalled.items()):
            if now >= f.at + f.duration_s:
                self._signal(pid, signal.SIGCONT)
                del self.stalled[pid]
                self._ended(f)
        if self.scaling is not None and self.scaling[0].poll() is not None:
            proc, f = self.scaling
            f.note += f"rc {proc.returncode}"
            if proc.returncode != 0:
                f.recovered = False
                f.note += ": " + (self.work / f"scale-{f.index}.log").read_text()[-600:]
            self.scaling = None
            self._ended(f)
        if inject and now >= self.next_at:
            self.inject(self.now())  # not `now`: the poll above may have waited on a stopped redis-server
            self.next_at = now + self.rng.uniform(*self.args.interval)
        self._score(now)

    def _ended(self, f: Fault) -> None:
        f.end = round(self.now(), 2)
        f.added0, f.lines0 = self.watch.counter("added"), len(self.watch.lines)

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def inject(self, now: float) -> None:
        """Draw a fault from the seeded stream and start it; targets are drawn from a per-fault stream, so the
        sequence of kinds and times replays whatever the processes present."""
        kind = self.rng.choice(self.args.faults)
        kind = self.args.faults[len(self.faults) % len(self.args.faults)] if self.args.in_turn else kind
        pair = self.rng.sample(KILLABLE, 2) if kind == "kill_two" else []
        stall = self.rng.uniform(*self.args.stall)
        f = Fault(len(self.faults), kind, round(now, 2))
        self.faults.append(f)
        pick = random.Random(f"{self.args.seed}:{f.index}")
        if kind == "scale":
            if self.scaling is not None:
                f.recovered, f.note = None, "skipped: a scale command is still running"
                return
            self.workers = 2 if self.workers == 1 else 1
            f.targets = [{"role": "reward", "workers": self.workers}]
            cmd = [sys.executable, "-m", "pag.cli", "workers", "scale", str(self.workers), "--run", self.run,
                   "--ray-address", self.watch.gcs_address() or "auto"]
            # a local ray.init() turns on token auth (Ray >= 2.5x, ~/.ray/auth_token), but a client given an explicit
            # address only sends the token when told to: docs/chaos.md
            env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
            self.scaling = (subprocess.Popen(cmd, cwd=self.work, stdout=(self.work / f"scale-{f.index}.log").open("w"),
                                             stderr=subprocess.STDOUT, start_new_session=True, env=env), f)
            return
        roles = pair or [kind.split("_", 1)[1]]
        for role in roles:
            pids = [self.redis.proc.pid] if role == "redis" else self.watch.pids(role)
            pids = [p for p in pids if p not in self.stalled]
            if not pids:
                f.note += f"no {role} process; "
                continue
            pid = pick.choice(pids)
            f.targets.append({"role": role, "pid": pid})
            f.pids0 += self.watch.pids(role)
            self._signal(pid, signal.SIGSTOP if kind.startswith("stall") else signal.SIGKILL)
            if kind.startswith("stall"):
                f.duration_s = round(stall, 1)
                self.stalled[pid] = f
        if not f.targets:
            f.recovered, f.note = None, f.note + "skipped"
            return
        if any(t["role"] == "learner" for t in f.targets):
            self.watch._poll_files(now)
            f.checkpoint = self.watch.checkpoints[-1][1] if self.watch.checkpoints else 0
        if not kind.startswith("stall"):
            self._ended(f)

    def _score(self, now: float) -> None:
        now = max(now, self.now())
        for f in self.faults:
            if f.recovered is not None or f.end is None:
                continue
            if f.fresh_s is None and self.watch.counter("added") > f.added0:
                f.fresh_s = round(now - f.end, 2)
            if f.step_s is None and len(self.watch.lines) > f.lines0:
                f.step_s = round(now - f.end, 2)
            for t in f.targets:
                if f.respawn_s is None and t["role"] not in ("redis",) and "pid" in t and f.kind.startswith("kill"):
                    if set(self.watch.pids(t["role"])) - set(f.pids0):
                        f.respawn_s = round(now - f.at, 2)
            if f.fresh_s is not None and f.step_s is not None:
                f.recovered = True
            elif now - f.end > self.args.recover_limit:
                f.recovered = False

    def soak(self) -> None:
        """Faults for --minutes, then until every fault has recovered or run out of time; then stop the run."""
        self.next_at = self.rng.uniform(*self.args.interval)
        k = 0
        while self.driver.poll() is None:
            inject = self.now() < self.args.minutes * 60
            busy = self.stalled or self.scaling or any(f.recovered is None and f.end is not None for f in self.faults)
            if not inject and not busy:
                break
            self.tick(inject, k)
            k += 1
            time.sleep(max(0.0, self.t0 + k - time.monotonic()))
        self.stop()

    def stop(self, timeout: float = 300) -> None:
        """SIGCONT what is stopped, let a scale command finish, SIGINT the driver (SIGKILL after `timeout`)."""
        for pid in list(self.stalled):
            self._signal(pid, signal.SIGCONT)
        self.stalled.clear()
        if self.scaling is not None:
            self.scaling[0].wait(timeout=180)
        if self.driver is not None and self.driver.poll() is None:
            self.driver.send_signal(signal.SIGINT)  # a checkpoint, workers acknowledge their batch, exit 130
            try:
                self.driver.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_all()
        self.watch.poll(self.now(), self.driver.pid, self.redis.proc.pid, ids=True, rss=False)

    def kill_all(self) -> None:
        """Last resort and Ctrl-C: SIGCONT then SIGKILL each process of the run this script has seen, by pid, and
        only while that pid is still the same process (its start time)."""
        procs = [p for p, rec in (self.watch.procs.items() if self.watch else [])
                 if started(p) == rec["start"] and p != self.redis.proc.pid]
        for pid in procs:
            self._signal(pid, signal.SIGCONT)
        if self.driver is not None and self.driver.poll() is None:
            os.killpg(self.driver.pid, signal.SIGKILL)
            self.driver.wait()
        for pid in procs:
            self._signal(pid, signal.SIGKILL)
        if self.scaling is not None and self.scaling[0].poll() is None:
            self.scaling[0].kill()

    def close(self) -> None:
        """Kill what is left of the run, stop the redis-server (AOF saved)."""
        if self.driver is not None and self.driver.poll() is None:
            self.kill_all()
        self.redis.stop()
        if self.driver is not None:
            self.log.close()


def run_soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The soak and its audit; with --compare, then the unperturbed run and the distance between the curves."""
    from common.config import load_config

    soak = Soak(args, work, f"chaos{args.seed}")
    out: dict[str, Any] = {}
    try:
        soak.start(steps=10**7)
        soak.soak()
        out = audit(soak, args, load_config(args.preset, overrides=[*SOAK_OVERRIDES, *args.overrides]))
    finally:
        soak.close()
    if args.compare:
        steps = max((s for _, s, _ in soak.watch.lines), default=1)
        calm = Soak(args, work, f"calm{args.seed}")
        try:
            calm.start(steps=steps)
            calm.driver.wait(timeout=max(600, 4 * steps))
            calm.watch.poll(calm.now(), calm.driver.pid, None, ids=False, rss=False)
        finally:
            calm.close()
        out["compare"] = compare(soak.watch.lines, calm.watch.lines, calm.driver.returncode)
    return out


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line; an unknown fault kind is an error."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60, help="how long faults are injected (default 60)")
    ap.add_argument("--seed", type=int, default=0, help="the monkey's seed and run.seed: replays a failure")
    ap.add_argument("--interval", type=float, nargs=2, default=(30, 120), metavar=("MIN", "MAX"),
                    help="seconds between faults, uniform (default 30 120)")
    ap.add_argument("--stall", type=float, nargs=2, default=(10, 60), metavar=("MIN", "MAX"),
                    help="seconds a SIGSTOPped process stays stopped (default 10 60)")
    ap.add_argument("--faults", type=lambda s: s.split(","), default=list(KINDS), help=f"comma list of {KINDS}")
    ap.add_argument("--in-turn", action="store_true", help="take the --faults kinds in turn instead of drawing "
                    "them (the times stay random)")
    ap.add_argument("--recover-limit", type=float, default=300, help="a fault not recovered after this many "
                    "seconds fails the audit (default 300)")
    ap.add_argument("--rss-growth", type=float, default=1.5, help="late/early RSS ratio that counts as unbounded "
                    "growth (with at least 100 MB more; default 1.5)")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds to the first learner step")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--compare", action="store_true", help="then an unperturbed run of the same seed and steps")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--keep-run-dir", help="work in this directory and keep it (default: a temporary one, kept "
                    "only when the audit fails)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = ap.parse_args(argv)
    unknown = set(args.faults) - set(KINDS)
    if unknown:
        ap.error(f"unknown fault kinds {sorted(unknown)}; choose from {KINDS}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Soak, audit, print the JSON; 0 only when the audit passed."""
    args = parse(argv)
    work = Path(args.keep_run_dir or tempfile.mkdtemp(prefix="pag-chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # explicitly, as `pag train` does: started as a background job, this process inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a cancelled job cleans up as Ctrl-C does
    t0 = time.monotonic()
    out = {"bench": "chaos", "seed": args.seed, "minutes": args.minutes, "interval_s": args.interval,
           "stall_s": args.stall, "faults_allowed": args.faults, "overrides": [*SOAK_OVERRIDES, *args.overrides],
           "work_dir": str(work), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    try:
        out.update(run_soak(args, work))
    except Exception as exc:  # noqa: BLE001 — a soak that cannot run is a failed audit, said in the JSON
        out.update(passed=False, error=f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:  # everything started is stopped by now (the finally clauses)
        out.update(passed=False, error="interrupted")
    out["wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if out.get("passed") and not args.keep_run_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if out.get("passed") else 130 if out.get("error") == "interrupted" else 1


if __name__ == "__main__":
    sys.exit(main())
