"""bench/gpu.py, the issue-12 speed suite, runs end to end on `tiny` with its --quick budget, so the
script a GPU session will run stays working. It checks the suite's own correctness claims (the two
learner computations agree, switches leave images unchanged, overlapped scoring scores the same),
not speed."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_suite_quick_on_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--preset", "tiny", "--device", "cpu",
                           "--quick", "--threads", "1", "--budget-s", "60", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert list(parts) == ["reward", "learner", "sampler", "broadcast", "e2e", "ipgo"]
    for name in ("reward", "learner", "sampler", "e2e", "ipgo"):
        assert parts[name]["status"] == "ok", parts[name]
        for row in parts[name]["rows"]:
            assert row["value"] > 0 and (row.get("ratio") is None or math.isfinite(row["ratio"])), row
    assert parts["broadcast"]["status"] in ("ok", "skipped")

    reward = parts["reward"]
    assert reward["flops"]["per_image"] > 0 and reward["matmul_ceiling"]["tflops"] > 0
    assert 0 < reward["sweep"][0]["mfu"] < 1
    assert reward["worker"]["worker_over_bare"] > 0
    measured = [name for name, v in reward["switches"].items() if "max_abs_image_diff" in v]
    assert measured and not [v for v in reward["switches"].values() if "error" in v], reward["switches"]
    for name in measured:
        assert reward["switches"][name]["max_abs_image_diff"] < 1e-4, name
    assert reward["overlap_scoring"]["scores_equal"] is True

    learner = parts["learner"]
    assert learner["agreement"]["equal_to_1e-5"] is True, learner["agreement"]
    assert learner["response_tokens"] > 0 and learner["speedup"] > 0
    assert parts["e2e"]["renders_per_trajectory"]["ours"] < parts["e2e"]["renders_per_trajectory"]["official_like"]
    assert "| learner |" in result["markdown"] and out.with_suffix(".md").read_text().startswith("bench/gpu.py")


def test_gpu_suite_rejects_unknown_parts():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--only", "reward,warp"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) warp" in proc.stderr
