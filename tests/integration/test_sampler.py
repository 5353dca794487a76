"""The Sampler as a plain class against a real redis-server: batches, EOS rules, backpressure, weights."""
import pytest
import torch

from common.config import load_config
from common.timing import role_times
from common.weights import WeightStore, pack_state_dict

from actors.sampler import Sampler


@pytest.fixture(scope="module")
def cfg():
    torch.set_num_threads(2)
    return load_config("tiny", overrides=["sampler.prompts_per_batch=2", "sampler.samples_per_prompt=3",
                                          "sampler.min_len=3", "sampler.max_len=8", "sampler.max_pending=10"])


def test_batch_shapes_and_eos_rules(cfg, buffer):
    sampler = Sampler(cfg, buffer)
    trajs = sampler.sample_batch()
    assert len(trajs) == 2 * 3
    eos = sampler.tokenizer.eos_token_id
    for t in trajs:
        assert len(t.response_ids) == len(t.ref_logprobs) <= cfg.sampler.max_len
        assert eos not in t.response_ids[: cfg.sampler.min_len], "EOS is forbidden before min_len"
        assert eos not in t.response_ids[:-1], "nothing follows EOS"
        assert all(lp <= 0 for lp in t.ref_logprobs)
        assert t.prompt_ids[-1] != eos and t.policy_version == 0 and t.run == buffer.run
        assert sampler.tokenizer.decode(t.prompt_ids).endswith(" Rephrase:\n")
    assert len({t.prompt for t in trajs}) == 2, "K rewrites of each prompt"


def test_prompts_cycle_by_epoch(cfg, buffer):
    sampler = Sampler(cfg, buffer)
    n = len(sampler.prompts)
    first_epoch = sampler.next_prompts(n)
    assert sorted(first_epoch) == sorted(sampler.prompts)
    assert sampler.next_prompts(n) != first_epoch, "each epoch is shuffled anew"


def test_backpressure_holds_the_bound(cfg, buffer):
    sampler = Sampler(cfg, buffer)
    pushed = [sampler.step() for _ in range(6)]
    batch = 2 * 3
    # the bound is checked before each batch: pending never exceeds max_pending + one batch − 1
    assert buffer.pending_len() <= cfg.sampler.max_pending + batch - 1
    assert pushed[:2] == [batch, batch] and pushed[-1] == 0
    entries = buffer.read_pending("w", 100)
    buffer.ack_pending([e for e, _ in entries])
    assert sampler.step() == batch, "room again once a reward worker acknowledged"
    spent = role_times(buffer.meta())["sampler"]  # where its time went, in the run's meta
    assert spent["sample"] > 0 and set(spent) <= {"weights", "sample", "push", "wait"}, spent  # < 1 ms: not yet


def test_pulls_newer_weights_and_anneals(cfg, buffer):
    store = WeightStore()
    sampler = Sampler(cfg, buffer, weights=store)
    assert sampler.pull_weights() is False and sampler.version == -1
    t0 = sampler.temperature()
    state = {k: v.clone() for k, v in sampler.policy.state_dict().items()}
    state["transformer.h.0.mlp.c_fc.weight"] += 1.0
    store.publish(cfg.sampler.temp_anneal_steps, pack_state_dict(state))
    assert sampler.pull_weights() is True and sampler.policy_step == cfg.sampler.temp_anneal_steps
    assert torch.equal(sampler.policy.transformer.h[0].mlp.c_fc.weight, state["transformer.h.0.mlp.c_fc.weight"])
    assert t0 == cfg.sampler.temp_start and sampler.temperature() == pytest.approx(cfg.sampler.temp_end)
    assert all(t.policy_version == cfg.sampler.temp_anneal_steps for t in sampler.sample_batch())
    assert sampler.pull_weights() is False, "nothing newer"
    # a learner restarted from an older checkpoint publishes a smaller step: samplers follow it
    store.publish(3, pack_state_dict(sampler.policy.state_dict()))
    assert sampler.pull_weights() is True and sampler.policy_step == 3 and sampler.version == 1


def test_stop_flag_ends_the_loop(cfg, buffer):
    sampler = Sampler(cfg, buffer)
    buffer.set_meta(stop="1")
    assert sampler.run(max_batches=5) == 0
    buffer.set_meta(stop="0")
    assert sampler.run(max_batches=1) == 6


def test_packed_weights_leave_tied_tensors_out_and_restore_them(cfg):
    """GPT-2 ties lm_head to wte: the broadcast ships that storage once, and a receiver's tie restores it."""
    from safetensors.torch import load as st_load

    from common.models import build_policy, build_tokenizer

    tok = build_tokenizer(cfg.model)
    sender, receiver = build_policy(cfg.model, tok), build_policy(cfg.model, tok)
    with torch.no_grad():
        sender.transformer.wte.weight.add_(1.0)
    blob = pack_state_dict(sender.state_dict())
    names = set(st_load(blob))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    receiver.load_state_dict(st_load(blob), strict=False)
    assert torch.equal(receiver.lm_head.weight, sender.lm_head.weight), "the tie carries the new embedding"


def test_an_unreachable_redis_at_the_stop_check_is_retried(cfg, buffer, monkeypatch):
    """The loop's stop-flag read is retried with back-off like its batches: an outage there once ended the
    sampler's thread for the rest of the run (found by the SIGINT + redis-kill e2e test)."""
    import redis

    sampler, real, calls = Sampler(cfg, buffer), buffer.meta, []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("Error 111 connecting: Connection refused.")
        return real()

    monkeypatch.setattr(buffer, "meta", flaky)
    assert sampler.run(max_batches=1) == 2 * 3 and len(calls) >= 2
