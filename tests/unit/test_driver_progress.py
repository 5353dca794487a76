"""The `pag train` progress bar's line: a step whose Redis work after the update met an outage comes back with
buffer/size NaN (learner.Learner._after_step); the bar must show it, not end the run."""
from __future__ import annotations

from driver.train import _postfix


def test_postfix_shows_a_buffer_size_it_could_not_read():
    line = _postfix({"loss/total": 3.25, "buffer/size": float("nan"), "weights/lag_mean": 1.0})
    assert "buf=nan" in line and line.startswith("loss=3.25")
    assert "buf=916" in _postfix({"buffer/size": 916.0})
