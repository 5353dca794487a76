"""Checkpoints that survive what a long run meets: kill -9 in the middle of a write, a full disk, a crash
while a checkpoint of the same step is being replaced. `--resume` must always find one it can load."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from common.models import GPT2_TOKENIZER_DIR
from common.runs import latest_checkpoint
from learner import checkpoint
from learner.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from learner.flow import FlowHead

#: the writer the kill test starts and kills: the same modules and calls as a learner's save
WRITER = textwrap.dedent("""
    import sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from common.models import GPT2_TOKENIZER_DIR
    from learner.checkpoint import save_checkpoint
    from learner.flow import FlowHead
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=64))
    flow = FlowHead(64, 32)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(flow.parameters()))
    tok = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR))
    step = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        save_checkpoint(sys.argv[1], step, policy, tok, flow, opt, {"written": step})
        step += 1
""")


def _modules():
    policy = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=64))
    flow = FlowHead(64, 32)
    return policy, flow, torch.optim.AdamW(list(policy.parameters()) + list(flow.parameters()))


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR))


def _loads(run_dir) -> int:
    """The step of the checkpoint --resume would pick, loaded into fresh modules as the learner does."""
    path = latest_checkpoint(run_dir)
    assert path is not None, f"no loadable checkpoint in {run_dir}: {sorted(os.listdir(run_dir / 'checkpoints'))}"
    policy, flow, opt = _modules()
    state = load_checkpoint(path, policy, flow, opt, restore_rng=False)
    assert state["counters"]["written"] == state["step"] == int(path.name.split("_")[1])
    return state["step"]


def test_kill_9_in_the_middle_of_writes_always_leaves_a_loadable_checkpoint(tmp_path):
    run_dir, rng, steps = tmp_path / "run", random.Random(21), []
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for _ in range(4):
        start = 1 if not steps else steps[-1] + 1
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(start)], stdout=subprocess.PIPE,
                                env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.3, 1.2))  # a checkpoint takes ~0.1 s: most kills land inside one
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        steps.append(_loads(run_dir))
    assert steps == sorted(steps) and steps[-1] > 4, steps  # progress was made and never went back
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp_")]
    assert len(leftovers) <= 1  # at most the write under way at the last kill; the next save clears it


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, tokenizer, monkeypatch):
    policy, flow, opt = _modules()
    save_checkpoint(tmp_path, 1, policy, tokenizer, flow, opt, {"written": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, 2, policy, tokenizer, flow, opt, {"written": 2})
    message = str(info.value)
    assert "step_000002" in message and "No space left on device" in message and "MiB free" in message
    assert "step_000001 stays" in message and "--resume" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    monkeypatch.undo()
    assert _loads(tmp_path) == 1


def test_a_lost_latest_target_falls_back_to_the_newest_complete_checkpoint(tmp_path, tokenizer):
    """A crash between removing step_N and renaming its replacement in (saving step N again) leaves `latest`
    naming nothing; the newest complete checkpoint is used, and a half one (no state.json) is not."""
    policy, flow, opt = _modules()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, policy, tokenizer, flow, opt, {"written": step})
    root = tmp_path / "checkpoints"
    (root / "step_000003" / "policy").mkdir(parents=True)  # half a copy, never installed
    (root / "latest").write_text("step_000004")
    assert _loads(tmp_path) == 2
    (root / "latest").write_text("step_000002")
    assert json.loads((root / "step_000002" / "state.json").read_text())["step"] == 2 and _loads(tmp_path) == 2
