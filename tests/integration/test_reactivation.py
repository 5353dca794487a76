"""Flow reactivation as officially done (issue 10, item 3): the last flow layer re-drawn from N(0, 1)
with the optimiser state kept, and its effect on log F̃ and on the flow head's dormant ratio."""
import pytest
import torch

from actors.sampler import Sampler
from buffer import ReplayBuffer
from learner.flow import FlowHead
from learner.learner import Learner


def test_normal_init_redraws_weight_and_bias_from_a_standard_normal_and_keeps_moments():
    torch.manual_seed(0)
    head = FlowHead(32, 256)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head(torch.randn(4, 6, 32), torch.randn(4, 32)).sum().backward()
    optimizer.step()
    moments = {id(p): optimizer.state[p]["exp_avg"].clone() for p in head.out.parameters()}
    head.reinit_last_layer(optimizer, init="normal")
    w = head.out.weight.detach()
    assert abs(float(w.mean())) < 0.2 and 0.8 < float(w.std()) < 1.2, "N(0, 1), not the default U(±1/16)"
    for p in head.out.parameters():
        assert torch.equal(optimizer.state[p]["exp_avg"], moments[id(p)]), "official: optimiser state kept"
    with pytest.raises(ValueError, match="normal.*default"):
        head.reinit_last_layer(optimizer, init="xavier")


def test_normal_moves_log_flow_far_more_than_default():
    """The issue's ≈ 25×: with D = 256 hidden units, N(0, 1) vs U(±1/√D) is a factor √(3D) ≈ 28 in scale."""
    shifts = {}
    for init in ("normal", "default"):
        torch.manual_seed(0)
        head = FlowHead(32, 256)
        states, prompt = torch.randn(8, 6, 32), torch.randn(8, 32)
        with torch.no_grad():
            before = head(states, prompt)
            head.reinit_last_layer(None, init=init)
            shifts[init] = float((head(states, prompt) - before).abs().mean())
    assert shifts["normal"] > 10 * shifts["default"], shifts


@pytest.fixture(scope="module")
def cfg(small_learner_config):
    return small_learner_config("run.log_every=1")


def test_a_reactivation_in_the_learner_changes_log_flow_and_the_dormant_ratio(cfg, redis_url, run_name, tmp_path):
    """Two learners from the same seed on the same batches; one reactivates after step 4. At the
    reactivation log F̃(s_0) jumps, and the next steps' large flow gradients reshape the hidden layer
    whose dormant ratio the learner reports."""
    sampler = Sampler(cfg, buffer=None)
    batch = [t.replace(scores={"reward": 0.0}, log_reward=len(t.response_ids) / 2.0) for t in sampler.sample_batch()]
    runs = {}
    for name, every in (("reset", 4), ("plain", 0)):
        c = cfg.model_copy(deep=True)
        c.learner.reactivation_every = every
        with ReplayBuffer(redis_url, f"{run_name}{name}", seed=0) as buf:
            torch.manual_seed(0)
            learner = Learner(c, buf, tmp_path / name, resume=False)
            runs[name] = [learner.update([batch]) for _ in range(8)]
    reset, plain = runs["reset"], runs["plain"]
    for a, b in zip(reset[:4], plain[:4]):
        assert a["loss/log_z"] == b["loss/log_z"], "identical until the reactivation"
    assert reset[3]["plasticity/reactivations"] == 1 and plain[3]["plasticity/reactivations"] == 0
    jump = abs(reset[4]["loss/log_z"] - plain[4]["loss/log_z"])
    assert jump > 1.0, f"log F̃(s_0) moved by only {jump:.3g} nats"
    dormant_gap = max(abs(a["plasticity/flow_dormant"] - b["plasticity/flow_dormant"]) for a, b in zip(reset[5:], plain[5:]))
    assert dormant_gap >= 1 / cfg.learner.flow_hidden, "the dormant ratio moved by at least one unit"


def test_checkpoint_on_a_time_interval_too(cfg, redis_url, run_name, tmp_path):
    """learner.checkpoint_every_s saves between step multiples (a killed learner loses little); None: steps only."""
    sampler = Sampler(cfg, buffer=None)
    batch = [t.replace(scores={"reward": 0.0}, log_reward=0.0) for t in sampler.sample_batch()]
    for every_s, expected in ((1e-6, "step_000002"), (None, None)):
        c = cfg.model_copy(deep=True)
        c.learner.checkpoint_every_s = every_s
        out = tmp_path / str(every_s)
        with ReplayBuffer(redis_url, run_name, seed=0) as buf:
            learner = Learner(c, buf, out, resume=False)
            learner.update([batch])
            learner.update([batch])
        latest = out / "checkpoints" / "latest"
        assert (latest.read_text() if latest.exists() else None) == expected
