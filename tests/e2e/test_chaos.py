"""The chaos soak's 2-minute version (bench/chaos.py, issue 21): `pag train` on the embedded default against a
redis-server the soak kills and restarts, with a redis kill, a reward-worker scale-up, a learner kill and a
reward-worker stall, in that order at seeded random times; the audit must find nothing lost, the steps resumed
from the latest checkpoint, every fault recovered and the checkpoints loadable. ~3 min on 2 cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ("kill_redis", "scale", "kill_learner", "stall_reward")


def test_two_minute_soak_loses_nothing_and_recovers_from_every_fault(tmp_path, tiny_sft):
    out = tmp_path / "chaos.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--minutes", "2", "--seed", "2",
                           "--interval", "20", "30", "--stall", "5", "10", "--faults", ",".join(FAULTS), "--in-turn",
                           "--recover-limit", "120", "--keep-run-dir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=480, env=env)
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == (0 if result["passed"] else 1)
    assert result["passed"], json.dumps({k: result.get(k) for k in ("failures", "error", "faults")}, indent=1)[-4000:]

    faults = result["faults"]
    assert [f["kind"] for f in faults[:len(FAULTS)]] == list(FAULTS), faults
    assert all(f["recovered"] for f in faults), faults
    for f in faults:
        assert f["fresh_s"] is not None and f["step_s"] is not None, f
        assert f["fresh_s"] <= 120 and f["step_s"] <= 120, f
    redis_kill, learner_kill = faults[0], faults[2]
    assert result["redis_restarts"] >= 1 and redis_kill["respawn_s"] is not None
    assert learner_kill["checkpoint"] is not None and learner_kill["respawn_s"] is not None
    assert faults[1]["targets"][0]["workers"] == 2 and faults[1]["note"].startswith("rc 0")

    audit = result["audit"]
    traj = audit["trajectories"]
    assert traj["acknowledged_seen"] > 0 and traj["lost"] == 0 and traj["missing"] == 0 and traj["no_hash"] == 0
    assert traj["evicted"] == 0 and traj["zcard_is_added_minus_evicted_rejected"]
    steps = audit["steps"]
    assert steps["ok"] and steps["checkpoints_monotonic"] and not steps["unexplained"]
    assert steps["final"] == result["steps_done"] > 0
    for rewind in steps["rewinds"]:  # a killed learner resumes right after its latest checkpoint, never before
        assert rewind["to"] == rewind["checkpoint"] + 1, rewind
    assert audit["checkpoints"]["ok"] and audit["checkpoints"]["latest"] == f"step_{steps['final']:06d}"
    twice = audit["at_least_once"]
    assert twice["ok"]
    if twice["measured"]:
        assert twice["fresh_reclaimed"] <= twice["fresh_bound"] and twice["pending_reclaimed"] <= twice["pending_bound"]
    assert audit["rss"]["ok"] and {p["role"] for p in audit["rss"]["processes"]} >= {"driver", "learner", "reward"}
    assert result["driver_rc"] == 130
