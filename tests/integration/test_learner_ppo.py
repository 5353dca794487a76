"""learner.objective=ppo in the Learner (plain class, real redis-server): on-policy collection, the
epochs, namespaced metrics, frozen lower blocks, and checkpoints holding the value head and the KL
controller."""
import math

import pytest
import torch

from actors.sampler import Sampler
from common.config import ConfigError, load_config
from learner.fresh import FreshTimeoutError
from learner.learner import Learner

PPO = ["learner.objective=ppo", "learner.replay_ratio=0", "learner.reactivation_every=0"]


@pytest.fixture(scope="module")
def cfg(small_learner_config):
    return small_learner_config("learner.trainable_blocks=1", "run.log_every=1", *PPO)


@pytest.fixture(scope="module")
def trajectories(cfg):
    sampler = Sampler(cfg, buffer=None)
    trajs = sampler.sample_batch() + sampler.sample_batch()
    return [t.replace(scores={"reward": len(t.response_ids) / 8}, log_reward=len(t.response_ids) / 8 / 0.05)
            for t in trajs]


def test_ppo_needs_no_replay():
    with pytest.raises(ConfigError, match="replay_ratio must be 0"):
        load_config("tiny", overrides=["learner.objective=ppo"])


def test_ppo_step_is_on_policy_and_trains_the_top_block_and_the_value_head(cfg, buffer, tmp_path, trajectories):
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    before = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    value_before = [p.detach().clone() for p in learner.objective.value.parameters()]
    buffer.add(trajectories[:8])
    m = learner.train_step(wait_s=5)
    assert m["step"] == 1 and m["buffer/fresh"] == 8 and m["buffer/filled_from_replay"] == 0
    for key in ("ppo/kl", "ppo/kl_coef", "ppo/clipfrac", "ppo/value_loss", "ppo/policy_loss", "ppo/approx_kl"):
        assert key in m and math.isfinite(m[key]), key
    assert m["ppo/kl"] == pytest.approx(0.0, abs=1e-3), "the policy starts as the reference"
    assert "plasticity/flow_dormant" not in m and "plasticity/policy_dormant" in m
    top = f"transformer.h.{learner.policy.config.n_layer - 1}."
    for name, p in learner.policy.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name.startswith(top) or name.startswith("transformer.ln_f.")), name
    assert any(not torch.equal(a, b.detach()) for a, b in zip(value_before, learner.objective.value.parameters()))
    assert len(learner.optimizer.state) > 0 and all(s["step"] == 4 for s in learner.optimizer.state.values()), \
        "4 epochs: 4 optimiser steps"


def test_ppo_never_fills_from_replay(cfg, buffer, tmp_path, trajectories):
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    buffer.add(trajectories[:4])  # only half a micro-batch is fresh
    with pytest.raises(FreshTimeoutError, match="objective=ppo.*only 4 of the 8 fresh"):
        learner.train_step(wait_s=1)


def test_checkpoint_holds_the_value_head_and_the_kl_controller(cfg, buffer, tmp_path, trajectories):
    a = Learner(cfg, buffer, tmp_path, resume=False)
    buffer.add(trajectories[:8])
    a.train_step(wait_s=5)
    a.objective.kl.value = 0.37  # as if the controller had moved
    path = a.save()
    assert (path / "value.safetensors").is_file()
    b = Learner(cfg, buffer, tmp_path, resume=True)
    assert b.step == 1 and b.objective.kl.value == pytest.approx(0.37)
    for p, q in zip(a.objective.value.parameters(), b.objective.value.parameters()):
        assert torch.equal(p, q)
    fl_db = load_config("tiny", overrides=["learner.batch_size=8", "learner.grad_accum=1"])
    c = Learner(fl_db, buffer, tmp_path / "other", resume=False)
    c.save()
    with pytest.raises(FileNotFoundError, match="value.safetensors"):
        Learner(cfg, buffer, tmp_path / "other", resume=True)
