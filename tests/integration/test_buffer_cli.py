"""`pag buffer stats|top|show|export`, standalone and registered into a parent parser."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buffer import ReplayBuffer
from buffer.cli import main, register
from buffer.testing import make_trajectory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def filled(redis_url, run_name):
    buf = ReplayBuffer(redis_url, run_name, capacity=50)
    trajs = [make_trajectory(i, float(i)) for i in range(5)]
    buf.add(trajs)
    buf.set_meta(config_hash="feed")
    yield trajs
    buf.close()


def test_stats_top_show_export(redis_url, run_name, filled, capsys, tmp_path):
    common = ["--run", run_name, "--redis-url", redis_url]
    assert main(["stats", *common, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["size"] == 5 and stats["capacity"] == 50 and stats["meta"]["config_hash"] == "feed"
    assert main(["stats", *common]) == 0
    assert "capacity" in capsys.readouterr().out
    assert main(["top", "2", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and filled[4].id in lines[0] and filled[3].id in lines[1]
    assert main(["show", filled[2].id, *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["response"] == filled[2].response and shown["ref_logprobs"] == filled[2].ref_logprobs
    out = tmp_path / "dump.jsonl"
    assert main(["export", str(out), *common]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [t.id for t in reversed(filled)]


def test_missing_run_or_id_exits_1(redis_url, run_name, filled, capsys):
    assert main(["show", "nope", "--run", run_name, "--redis-url", redis_url]) == 1
    assert main(["stats", "--run", "nosuchrun", "--redis-url", redis_url]) == 1
    assert "no replay buffer" in capsys.readouterr().err


def test_registers_under_a_pag_parser_and_reads_the_env_url(redis_url, run_name, filled, capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="pag")
    register(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("PAG_REDIS_URL", redis_url)
    args = parser.parse_args(["buffer", "top", "1", "--run", run_name])
    assert args.func(args) == 0
    assert filled[4].id in capsys.readouterr().out


def test_module_entry_point(redis_url, run_name, filled):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "buffer.cli", "stats", "--json", "--run", run_name,
                           "--redis-url", redis_url], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["size"] == 5
