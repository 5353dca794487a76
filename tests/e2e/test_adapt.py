"""`pag adapt` through the real CLI on a tiny run: sampled rewrites are reproducible by seed, beam search gives n
distinct rewrites best first, and scored lines carry the reward and its parts (a private redis-server and the
reward worker's renderer and scorers). It decodes with the code `pag eval` and `pag serve` use (common/rewriting.py)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def adapt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pag.cli", "adapt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_adapt_samples_by_seed_and_beams_distinct_rewrites(tiny_run):
    first = adapt("a cat on a sofa", "--checkpoint", str(tiny_run), "-n", "3", "--seed", "4", "--no-score")
    assert first.returncode == 0, first.stderr[-2000:]
    again = adapt("a cat on a sofa", "--checkpoint", str(tiny_run), "-n", "3", "--seed", "4", "--no-score")
    assert first.stdout == again.stdout and len(first.stdout.splitlines()) == 3
    beam = adapt("a cat on a sofa", "--checkpoint", str(tiny_run), "-n", "3", "--decode", "beam", "--no-score")
    assert beam.returncode == 0, beam.stderr[-2000:]
    lines = beam.stdout.splitlines()
    assert len(lines) == 3 == len(set(lines))


def test_adapt_scores_each_rewrite_best_first(tiny_run):
    proc = adapt("a red house", "--checkpoint", str(tiny_run), "-n", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("[r=") and "aes_gain=" in line for line in lines)
    rewards = [float(line[3:].split()[0]) for line in lines]
    assert rewards == sorted(rewards, reverse=True)


def test_adapt_without_a_checkpoint_says_so(tmp_path):
    proc = adapt("a cat", "--checkpoint", str(tmp_path), "--no-score")
    assert proc.returncode != 0 and "has no checkpoint" in proc.stderr
