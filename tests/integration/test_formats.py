"""Policy formats (common/formats.py): templates, suffix-mode rewrites, SFT targets, and that the sampler,
the learner's batch and SFT all read and write the same tokens."""
from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, load_config
from common.decoding import ref_logprobs, teacher_forced
from common.formats import PolicyFormat, stem
from learner.batch import collate
from sft.train import encode_pairs, format_pairs, sft_hash, settings_for

from actors.sampler import Sampler

SUFFIX = PolicyFormat("pag", "suffix")


def test_templates():
    assert PolicyFormat().policy_input("a cat") == "a cat Rephrase:\n"
    assert PolicyFormat("promptist").policy_input("a cat") == "a cat Rephrase:"
    assert SUFFIX.policy_input("A cat on a sofa.") == "A cat on a sofa. Rephrase:\nA cat on a sofa,"
    assert PolicyFormat("promptist", "suffix").policy_input("a cat") == "a cat Rephrase: a cat,"
    with pytest.raises(ValueError, match="input_format"):
        PolicyFormat("chatml")


def test_rewrite_text():
    assert PolicyFormat().rewrite("a cat", " a cat, oil painting ") == "a cat, oil painting"
    assert SUFFIX.rewrite("A cat on a sofa.", " oil painting, 4k") == "A cat on a sofa, oil painting, 4k"
    assert SUFFIX.rewrite("a cat", "  ") == "a cat"
    assert stem(" a dog ,. ") == "a dog"


def test_sft_targets_are_what_follows_the_plain_prompt():
    assert PolicyFormat().sft_target("a cat", "a cat, 4k") == "a cat, 4k"
    assert SUFFIX.sft_target("a cat on a sofa", "A cat on a sofa, oil painting, by greg") == " oil painting, by greg"
    assert SUFFIX.sft_target("a cat.", "a cat. trending on artstation") == " trending on artstation"
    # not a prefix: the engineered prompt's tail after its first separator
    assert SUFFIX.sft_target("a kitten", "portrait of a cat | highly detailed") == " highly detailed"
    assert SUFFIX.sft_target("a cat", "a cat") is None
    assert format_pairs([("a cat", "a cat"), ("a cat", "a cat, 4k")], SUFFIX) == [("a cat", "a cat, 4k")]


def test_config_keys_default_and_validate():
    cfg = load_config("tiny")
    assert (cfg.model.input_format, cfg.sampler.response) == ("pag", "full")
    cfg = load_config("tiny", overrides=["model.input_format=promptist", "sampler.response=suffix"])
    assert PolicyFormat.from_config(cfg) == PolicyFormat("promptist", "suffix")
    with pytest.raises(ConfigError, match="sampler.response"):
        load_config("tiny", overrides=["sampler.response=prefix"])


def test_sft_pairs_and_cache_key_follow_the_format():
    from common.models import build_tokenizer

    cfg = load_config("tiny")
    tok = build_tokenizer(cfg.model)
    batch = encode_pairs(tok, [("a red car", "a red car, studio lighting")], fmt=SUFFIX)
    prompt = tok.decode(batch["prompt_ids"][0][batch["prompt_mask"][0].bool()])
    response = batch["response_ids"][0][batch["response_mask"][0].bool()].tolist()
    assert prompt == "a red car Rephrase:\na red car,"
    assert tok.decode(response[:-1]) == " studio lighting" and response[-1] == tok.eos_token_id
    pairs = [("a cat", "a cat, 4k")]
    suffix_cfg = load_config("tiny", overrides=["sampler.response=suffix"])
    assert sft_hash(cfg, pairs, settings_for(cfg)) != sft_hash(suffix_cfg, pairs, settings_for(cfg))


@pytest.mark.parametrize("input_format", ["pag", "promptist"])
def test_suffix_sampler_and_learner_agree(buffer, input_format):
    """The sampler's trajectories: policy input ends in "stem,", the rewrite is stem + ", " + continuation,
    and the learner's teacher-forced pass over them gives the sampler's reference log-probs."""
    cfg = load_config("tiny", overrides=["sampler.prompts_per_batch=2", "sampler.samples_per_prompt=2",
                                         "sampler.min_len=2", "sampler.max_len=6", "sampler.response=suffix",
                                         f"model.input_format={input_format}"])
    sampler = Sampler(cfg, buffer)
    trajs = sampler.sample_batch(["A cat on a sofa.", "two dogs"])
    tok, eos = sampler.tokenizer, sampler.tokenizer.eos_token_id
    for t in trajs:
        assert tok.decode(t.prompt_ids) == PolicyFormat(input_format, "suffix").policy_input(t.prompt)
        continuation = tok.decode([i for i in t.response_ids if i != eos])
        assert t.response == f"{stem(t.prompt)}, {continuation.strip()}".rstrip(", ")
        assert 2 <= len(t.response_ids) <= 6
    for t in trajs:
        t.log_reward = 0.0  # unscored; collate only carries it
    batch = collate(trajs, eos, torch.device("cpu"))  # the learner's own batch
    ref = ref_logprobs(sampler.reference, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                       batch["response_mask"])
    assert torch.allclose(ref, batch["ref_logprobs"], atol=1e-5)
    out = teacher_forced(sampler.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                         batch["response_mask"], eos, min_len=2)
    assert out["log_pf"].shape == ref.shape and bool(torch.isfinite(out["log_pf"]).all())
