"""The Learner as a plain class against a real redis-server: a step on fresh + replay data,
acknowledgement, filling from replay, exact resume, non-finite handling, reactivation, publishing."""
import math

import pytest
import torch

from actors.sampler import Sampler
from learner.batch import collate
from learner.learner import Learner, NonFiniteLossError
from common.weights import WeightStore


@pytest.fixture(scope="module")
def cfg(small_learner_config):
    return small_learner_config()


@pytest.fixture(scope="module")
def trajectories(cfg):
    """Scored trajectories from the real sampler; reward = the response length (a learnable signal)."""
    sampler = Sampler(cfg, buffer=None)
    trajs = sampler.sample_batch() + sampler.sample_batch() + sampler.sample_batch()
    return [t.replace(scores={"aes": 1.0, "reward": len(t.response_ids) / 8}, log_reward=len(t.response_ids) / 2.0)
            for t in trajs]


def test_collate_layout(cfg, trajectories):
    batch = collate(trajectories[:3], 0, torch.device("cpu"))
    assert bool(batch["prompt_mask"][:, -1].all()), "prompts are left-padded"
    assert bool(batch["response_mask"][:, 0].all()), "responses are right-padded"
    assert batch["ref_logprobs"].shape == batch["response_ids"].shape
    for i, t in enumerate(trajectories[:3]):
        n = len(t.response_ids)
        assert batch["response_ids"][i, :n].tolist() == t.response_ids
        assert int(batch["response_mask"][i].sum()) == n


def test_train_step_uses_fresh_and_replay_and_acknowledges(cfg, buffer, tmp_path, trajectories):
    store = WeightStore()
    c = cfg.model_copy(deep=True)
    c.learner.fresh_policy = "fill"  # today's throughput mode: missing fresh slots come from replay
    learner = Learner(c, buffer, tmp_path, weights=store, resume=False)
    assert store.version() == 0 and store.step() == 0, "initial weights are published at start"
    buffer.add(trajectories[:12])
    m = learner.train_step(wait_s=5)
    assert m["step"] == 1 and math.isfinite(m["loss/total"])
    assert m["buffer/fresh"] == 4 and m["buffer/filled_from_replay"] == 0
    assert m["reward/reward"] > 0 and "plasticity/flow_dormant" in m
    assert m["weights/lag_mean"] == 0 == m["weights/lag_max"], "sampled by version 0, trained in step 1: no lag"
    assert store.version() == 1 and store.step() == 1
    # fresh stream drained by repeated steps → the learner fills from replay and counts it
    for _ in range(3):
        m = learner.train_step(wait_s=5)
    assert m["buffer/fresh"] == 0 and m["buffer/filled_from_replay"] == 4
    assert learner.counters["filled_from_replay"] >= 4
    # sampled by versions 1 and 3, trained in step 5: lags 3 and 1
    buffer.add([t.replace(policy_version=1 + 2 * (i % 2)) for i, t in enumerate(trajectories[12:16])])
    m = learner.train_step(wait_s=5)
    assert m["buffer/fresh"] == 4 and m["weights/lag_mean"] == 2 and m["weights/lag_max"] == 3


def test_fresh_entries_are_acknowledged(cfg, buffer, tmp_path, trajectories):
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    buffer.add(trajectories[:8])
    learner.train_step(wait_s=5)
    assert buffer.client.xpending(f"pag:{buffer.run}:fresh", "learner")["pending"] == 0


def test_loss_decreases_on_a_fixed_batch(cfg, buffer, tmp_path, trajectories):
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    batch = trajectories[:8]
    first = learner.update([batch])["loss/total"]
    for _ in range(15):
        last = learner.update([batch])["loss/total"]
    assert last < 0.5 * first


def test_checkpoint_resume_is_exact(cfg, buffer, tmp_path, trajectories):
    a = Learner(cfg, buffer, tmp_path, resume=False)
    for _ in range(2):
        a.update([trajectories[:8]])
    a.save()
    b = Learner(cfg, buffer, tmp_path, resume=True)
    assert b.step == a.step == 2
    for (name, pa), pb in zip(a.policy.named_parameters(), b.policy.parameters()):
        assert torch.equal(pa, pb), name
    for pa, pb in zip(a.flow.parameters(), b.flow.parameters()):
        assert torch.equal(pa, pb)
    # the same next step from both (optimiser moments restored) gives identical weights
    torch.manual_seed(7)
    ma = a.update([trajectories[8:16]])
    torch.manual_seed(7)
    mb = b.update([trajectories[8:16]])
    assert ma["loss/total"] == mb["loss/total"]
    for pa, pb in zip(list(a.policy.parameters()) + list(a.flow.parameters()),
                      list(b.policy.parameters()) + list(b.flow.parameters())):
        assert torch.equal(pa, pb)


def test_resume_refuses_a_checkpoint_of_the_other_flow_head(small_learner_config, buffer, tmp_path):
    """Both heads have the same tensor names: without the kind in flow.safetensors' metadata, a `film`
    checkpoint would load into an `official` head and silently compute something else."""
    Learner(small_learner_config("learner.flow_head=film"), buffer, tmp_path, resume=False).save()
    with pytest.raises(ValueError, match="learner.flow_head='film'.*'official'.*resume with learner.flow_head=film"):
        Learner(small_learner_config(), buffer, tmp_path, resume=True)
    assert Learner(small_learner_config("learner.flow_head=film"), buffer, tmp_path, resume=True).step == 0


def test_resume_restores_rng(cfg, buffer, tmp_path, trajectories):
    a = Learner(cfg, buffer, tmp_path, resume=False)
    a.save()
    expected = torch.rand(3)
    Learner(cfg, buffer, tmp_path, resume=True)
    assert torch.equal(torch.rand(3), expected)


def test_nonfinite_loss_is_skipped_then_stops(cfg, buffer, tmp_path, trajectories):
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    bad = [t.replace(log_reward=float("nan")) for t in trajectories[:8]]
    before = [p.clone() for p in learner.policy.parameters()]
    m = learner.update([bad])
    assert m["loss/nonfinite_steps"] == 1 and learner.step == 0
    assert all(torch.equal(p, q) for p, q in zip(before, learner.policy.parameters())), "skipped, not applied"
    learner.update([trajectories[:8]])  # a good step resets the run of failures
    for _ in range(cfg.learner.max_nonfinite - 1):
        learner.update([bad])
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite"):
        learner.update([bad])


def test_flow_reactivation_every_m_steps(cfg, buffer, tmp_path, trajectories):
    c = cfg.model_copy(deep=True)
    c.learner.reactivation_every, c.learner.reactivation_init = 2, "default"
    learner = Learner(c, buffer, tmp_path, resume=False)
    learner.update([trajectories[:8]])
    out_before = learner.flow.out.weight.clone()
    inp_before = learner.flow.inp.weight.clone()
    m = learner.update([trajectories[:8]])
    assert m["plasticity/reactivations"] == 1
    assert not torch.allclose(learner.flow.out.weight, out_before, atol=1e-3), "last layer re-initialised"
    assert all(p is not learner.flow.out.weight for p in learner.optimizer.state), "its Adam moments dropped"
    assert not torch.equal(learner.flow.inp.weight, inp_before), "the rest trained on"


@pytest.mark.parametrize("objective", ["db", "tb"])
def test_ablation_objectives_train(cfg, buffer, tmp_path, trajectories, objective):
    c = cfg.model_copy(deep=True)
    c.learner.objective = objective
    c.learner.flow_lr = 0.05  # the flow head must absorb the whole reference log-likelihood at the terminal
    learner = Learner(c, buffer, tmp_path, resume=False)
    first = learner.update([trajectories[:8]])["loss/total"]
    for _ in range(15):
        last = learner.update([trajectories[:8]])["loss/total"]
    assert math.isfinite(last) and last < first


def _hand_fl_db(batch, out, log_flow, log_reward, gamma: float, tau: float) -> float:
    """FL-DB written out token by token: mean over trajectories of Σ_t δ_t²,
        δ_t = log F(s_t) + log P_F(y_t) − log p_ref(y_t)/(γτ) − log F(s_{t+1}),  log F(s_T) = log_reward/τ."""
    total = 0.0
    for b in range(batch["response_mask"].shape[0]):
        steps = int(batch["response_mask"][b].sum())
        for t in range(steps):
            after = float(log_reward[b]) / tau if t == steps - 1 else float(log_flow[b, t + 1])
            delta = (float(log_flow[b, t]) + float(out["log_pf"][b, t])
                     - float(batch["ref_logprobs"][b, t]) / (gamma * tau) - after)
            total += delta ** 2
    return total / batch["response_mask"].shape[0]


def test_balance_loss_is_the_hand_computed_fl_db_with_tau_and_gamma_not_1(small_learner_config, buffer, tmp_path,
                                                                          trajectories):
    """Learner's FL-DB loss at a step where τ = 2.2 (annealing 3 → 1 over 10 steps, step 4) and γ = 1.7,
    against the residuals written out token by token:
        δ_t = log F(s_t) + log P_F(y_t) − log p_ref(y_t)/(γτ) − log F(s_{t+1}),  log F(s_T) = (r/β)/τ,
    L = mean over trajectories of Σ_t δ_t²."""
    from common.decoding import teacher_forced

    c = small_learner_config("learner.reward_temp_start=3.0", "learner.reward_temp_end=1.0",
                             "learner.reward_temp_anneal_steps=10", "learner.ref_temp=1.7")
    objective = Learner(c, buffer, tmp_path, resume=False).objective
    # three cut short (the tiny policy rarely stops early): the batch has padding, which the diagnostics must skip
    trajs = [t.replace(response_ids=t.response_ids[:n], ref_logprobs=t.ref_logprobs[:n]) if n else t
             for t, n in zip(trajectories[:6], (3, 0, 5, 0, 4, 0))]
    assert len({len(t.response_ids) for t in trajs}) > 1
    with torch.no_grad():
        loss, info = objective.loss_on(trajs, step=4)
        batch = objective.collate(trajs)
        out = teacher_forced(objective.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                             batch["response_mask"], objective.eos_id, min_len=c.sampler.min_len)
        log_flow = objective.flow(out["state_hidden"], out["prompt_sum"])  # the official head's prompt input
    tau, gamma = 3.0 - 2.0 * 4 / 10, 1.7
    assert info["tau"] == pytest.approx(tau)
    assert float(loss) == pytest.approx(_hand_fl_db(batch, out, log_flow, batch["log_reward"], gamma, tau), rel=1e-4)
    mask = batch["response_mask"].bool()  # and the diagnostics, each from the same pass
    lengths = mask.sum(-1).float()
    assert info["length"] == pytest.approx(float(lengths.mean())) and mask.shape[0] != mask.shape[1]
    assert info["log_pf_mean"] == pytest.approx(float(out["log_pf"][mask].mean()), rel=1e-5)
    assert info["entropy"] == pytest.approx(float(out["entropy"][mask].mean()), rel=1e-5)
    assert info["log_z"] == pytest.approx(float(log_flow[:, 0].mean()), rel=1e-5)


def test_balance_loss_forbids_eos_before_min_len_and_penalises_short_trajectories(small_learner_config, buffer,
                                                                                   tmp_path, trajectories):
    """With sampler.min_len 6, the loss's log P_F is what the sampler can draw -- EOS masked out of the first six
    distributions -- and a trajectory of n < 6 tokens before its end has its log-reward lowered by
    learner.min_len_penalty × (6 − n). The policy is biased towards EOS (+12 on its logit, p ≈ 0.7) so that the mask
    moves log P_F by about a nat per token, not by the random policy's ≈ 2e-5."""
    from common.decoding import teacher_forced
    from learner.losses import min_length_penalty

    c = small_learner_config("sampler.min_len=6", "learner.min_len_penalty=0.5", "learner.ref_temp=1.0",
                             "learner.reward_temp_start=1.0", "learner.reward_temp_end=1.0")
    objective = Learner(c, buffer, tmp_path, resume=False).objective
    eos_bias = torch.zeros(objective.policy.config.vocab_size)
    eos_bias[objective.eos_id] = 12.0
    objective.policy.lm_head.register_forward_hook(lambda module, args, logits: logits + eos_bias)
    trajs = [t.replace(response_ids=t.response_ids[:n], ref_logprobs=t.ref_logprobs[:n]) if n else t
             for t, n in zip(trajectories[:6], (3, 0, 5, 0, 4, 0))]
    with torch.no_grad():
        loss, info = objective.loss_on(trajs, step=0)
        batch = objective.collate(trajs)
        args = (objective.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                batch["response_mask"], objective.eos_id)
        out, free = teacher_forced(*args, min_len=6), teacher_forced(*args)
        log_flow = objective.flow(out["state_hidden"], out["prompt_sum"])
    mask = batch["response_mask"].bool()
    assert float((out["log_pf"] - free["log_pf"])[mask].abs().max()) > 0.5, "the EOS bias must make the mask matter"
    tokens = batch["response_mask"].sum(-1) - 1
    assert int((tokens < 6).sum()) == 3, "three trajectories shorter than min_len"
    penalised = batch["log_reward"] + min_length_penalty(tokens, 6, 0.5).to(batch["log_reward"])
    assert float(loss) == pytest.approx(_hand_fl_db(batch, out, log_flow, penalised, 1.0, 1.0), rel=1e-4)
    assert info["log_pf_mean"] == pytest.approx(float(out["log_pf"][mask].mean()), rel=1e-5)


def test_an_objective_update_computes_its_diagnostics_unless_told_not_to(cfg, buffer, tmp_path, trajectories):
    """`BalanceObjective.update` without `diagnostics` reports the entropy (a caller that does not know about
    logging steps gets every metric); the learner asks for it on logging steps only."""
    learner = Learner(cfg, buffer, tmp_path, resume=False)
    full = learner.objective.update([trajectories[:4]], learner.optimizer, step=0)
    assert full is not None and all("entropy" in info for info in full.infos)
    lean = learner.objective.update([trajectories[:4]], learner.optimizer, step=1, diagnostics=False)
    assert lean is not None and not any("entropy" in info for info in lean.infos)
