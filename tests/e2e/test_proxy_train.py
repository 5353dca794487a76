"""`pag train --preset tiny-proxy --method gfn-tb` end to end (subprocess): the offline text reward through the
unchanged pipeline — samplers (suffix mode) → Redis → reward workers (no rendering) → replay → learner — with
the trajectory-balance learner and a flow reactivation every step. One run for two stories (each `pag train`
costs ~45 s here): the text reward's, and the gfn-tb method's end to end (tests/e2e/test_methods.py has ppo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = ["sampler.max_len=8", "sampler.min_len=2", "sampler.prompts_per_batch=2", "learner.batch_size=8",
         "learner.checkpoint_every=2", "reward.batch_size=4", "run.log_every=1", "run.seed=3"]


def test_tiny_proxy_trains_end_to_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0",
               PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)

    def pag(*args):
        result = subprocess.run([sys.executable, "-m", "pag.cli", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    pag("sft", "--preset", "tiny-proxy", "--steps", "20", "--samples", "0", "--out", str(tmp_path / "sft"))
    pag("train", "--preset", "tiny-proxy", "--method", "gfn-tb", "--steps", "3", "--run-name", "proxy",
        f"model.sft_checkpoint={tmp_path / 'sft'}", "learner.reactivation_every=1", *SMALL)
    run_dir = tmp_path / "runs" / "proxy"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["method"] == "gfn-tb"
    assert saved["learner"]["reactivation_every"] == 1, "the user's override wins over the method's 0"
    assert (saved["learner"]["objective"], saved["buffer"]["prioritization"]) == ("tb", "uniform")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all("ppo/kl" not in m for m in history)
    assert [m["plasticity/reactivations"] for m in history] == [1, 2, 3], "reactivation_every=1 ran every step"
    for m in history:
        assert m["reward/reward"] == pytest.approx(m["reward/style_gain"] + m["reward/rel_text"], abs=1e-6)
    report = (run_dir / "report.md").read_text()
    assert "style gain" in report and "no images" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "Rephrase" not in line]
    rewrites = [r.split(" | ") for r in rows if r.count(" | ") >= 4 and "failed" not in r][1:]
    assert len(rewrites) >= 8 * 4
    for cells in rewrites:  # suffix mode: every rewrite starts with its plain prompt's stem and a comma
        plain = cells[0].removeprefix("| ").rstrip(" .")
        assert cells[1].startswith(plain), cells
