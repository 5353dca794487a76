"""Diverse beam search (`common.beam_search.diverse_beam_search`) on tiny random GPT-2s, against brute force:
greedy decoding, exhaustive enumeration, the EOS rule, left padding and the Hamming penalty; and against
transformers 4.46.3's group beam search, kept as a fixture (tests/fixtures/beam_hf4, bench/beam_search_vs_hf4.py)."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.beam_search_vs_hf4 import CASES, compare
from common.beam_search import diverse_beam_search

torch.set_num_threads(1)


def _gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return GPT2LMHeadModel(config).double().eval()  # float64: no near-ties between cached and full passes


V, EOS = 40, 39


@pytest.fixture(scope="module")
def model():
    return _gpt2(V)


def _prompts(lengths, P: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (len(lengths), P), generator=gen)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, P - n:] = 1
    return ids.masked_fill(mask == 0, EOS), mask


@torch.no_grad()
def _log_probs(model, prompt, response):
    """log softmax of the next token after prompt + response, one unpadded pass, no cache (V,)."""
    ids = torch.tensor([list(prompt) + list(response)])
    return torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)


def _greedy(model, prompt, min_new: int, max_new: int) -> list[int]:
    out: list[int] = []
    for t in range(max_new):
        logp = _log_probs(model, prompt, out)
        if t < max(1, min_new):
            logp[EOS] = float("-inf")
        out.append(int(logp.argmax()))
        if out[-1] == EOS:
            break
    return out


def _run(model, ids, mask, **kw):
    args = dict(num_groups=4, beams_per_group=1, diversity_penalty=0.0, length_penalty=-1.0,
                min_new_tokens=2, max_new_tokens=8, eos_id=EOS)
    args.update(kw)
    return diverse_beam_search(model, ids, mask, **args)


def _rows(ids, mask, b):
    return [ids[b, i][mask[b, i].bool()].tolist() for i in range(ids.shape[1])]


def test_zero_penalty_every_group_is_greedy(model):
    ids, mask = _prompts([6, 3, 5], P=6)
    out_ids, out_mask, scores = _run(model, ids, mask, diversity_penalty=0.0, min_new_tokens=3)
    for b in range(3):
        greedy = _greedy(model, ids[b][mask[b].bool()].tolist(), 3, 8)
        assert _rows(out_ids, out_mask, b) == [greedy] * 4
        assert torch.allclose(scores[b], scores[b, :1].expand(4))


def test_large_penalty_first_tokens_all_differ(model):
    ids, mask = _prompts([5, 4], P=5)
    out_ids, _, _ = _run(model, ids, mask, num_groups=8, diversity_penalty=1e4)
    for b in range(2):
        assert len(set(out_ids[b, :, 0].tolist())) == 8
    same, _, _ = _run(model, ids, mask, num_groups=8, diversity_penalty=0.0)
    assert len(set(same[0, :, 0].tolist())) == 1  # the penalty is what separates them


def _exhaustive(model, prompt, min_new: int, max_new: int, length_penalty: float, eos: int, vocab: int):
    """Every complete response with its 4.x score: EOS-ended (length counts the EOS) or max_new long."""
    out = []
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if eos in seq[:-1] or (n < max_new and seq[-1] != eos):
                continue
            total = 0.0
            for t, token in enumerate(seq):
                logp = _log_probs(model, prompt, seq[:t])
                if t < max(1, min_new):
                    logp[eos] = float("-inf")
                total += float(logp[token])
            if total > float("-inf"):
                out.append((total / n ** length_penalty, list(seq)))
    return sorted(out, key=lambda s: -s[0])


@pytest.mark.parametrize("length_penalty", [0.0, -1.0, 1.0])
def test_one_group_of_k_beams_is_exhaustive_search(length_penalty):
    """Vocabulary {0, 1, EOS=2}, 3 new tokens: 12 beams hold every live prefix, so nothing is pruned."""
    small = _gpt2(3, seed=2)
    prompt = [0, 1, 1, 0]
    ids, mask = torch.tensor([prompt]), torch.ones(1, 4, dtype=torch.long)
    out_ids, out_mask, scores = diverse_beam_search(
        small, ids, mask, num_groups=1, beams_per_group=12, diversity_penalty=0.0, length_penalty=length_penalty,
        min_new_tokens=1, max_new_tokens=3, eos_id=2)
    truth = _exhaustive(small, prompt, 1, 3, length_penalty, eos=2, vocab=3)
    assert len(truth) == 2 + 4 + 8  # EOS after 1 or 2 tokens, or 3 tokens without EOS
    assert _rows(out_ids, out_mask, 0) == [seq for _, seq in truth[:12]]
    assert torch.allclose(scores[0].double(), torch.tensor([s for s, _ in truth[:12]], dtype=torch.float64),
                          atol=1e-5)


def test_no_eos_before_min_new_tokens_and_sorted(model):
    ids, mask = _prompts([4, 6], P=6)
    for min_new in (0, 1, 4):
        out_ids, out_mask, scores = _run(model, ids, mask, num_groups=6, diversity_penalty=2.0,
                                         length_penalty=-2.0, min_new_tokens=min_new)
        lengths = out_mask.sum(-1)
        for b in range(2):
            for i in range(6):
                row = out_ids[b, i, : lengths[b, i]].tolist()
                assert EOS not in row[: max(1, min_new)]
                assert EOS not in row[:-1]  # EOS only as the last token
        assert bool((scores[:, :-1] >= scores[:, 1:]).all())
        assert bool((out_ids[out_mask == 0] == EOS).all())


def test_left_padded_batch_equals_one_prompt_at_a_time(model):
    ids, mask = _prompts([7, 2, 5], P=7)
    kw = dict(num_groups=3, beams_per_group=2, diversity_penalty=0.7, length_penalty=-1.0, min_new_tokens=2)
    out_ids, out_mask, scores = _run(model, ids, mask, **kw)
    for b in range(3):
        alone = ids[b][mask[b].bool()][None]
        one_ids, one_mask, one_scores = _run(model, alone, torch.ones_like(alone), **kw)
        assert _rows(out_ids, out_mask, b) == _rows(one_ids, one_mask, 0)
        assert torch.allclose(scores[b], one_scores[0], atol=1e-5)
    again = _run(model, ids, mask, **kw)
    assert torch.equal(again[0], out_ids) and torch.equal(again[2], scores)  # deterministic


def test_bad_arguments_are_named(model):
    ids, mask = _prompts([3], P=3)
    with pytest.raises(ValueError, match="min_new_tokens"):
        _run(model, ids, mask, min_new_tokens=8, max_new_tokens=8)
    with pytest.raises(ValueError, match="num_groups"):
        _run(model, ids, mask, num_groups=0)
    with pytest.raises(ValueError, match="LEFT-padded"):
        _run(model, ids.flip(1), torch.tensor([[1, 0, 0]]))



def test_penalty_counts_each_earlier_group_not_just_presence(model):
    """λ between one and two times the gap from the best first token a to the runner-up b: group 1 still
    takes a (penalty λ < gap); group 2 sees a chosen twice, 2λ > gap, and takes b. A penalty counted by
    presence (λ once) would give a a third time."""
    ids, mask = _prompts([5], 5)
    logp = _log_probs(model, ids[0].tolist(), [])
    logp[EOS] = float("-inf")  # min_new_tokens=1
    (a, b) = logp.topk(2).indices.tolist()
    gap = float(logp[a] - logp[b])
    out_ids, out_mask, _ = _run(model, ids, mask, num_groups=3, diversity_penalty=0.75 * gap, min_new_tokens=1,
                                max_new_tokens=3)
    assert sorted(row[0] for row in _rows(out_ids, out_mask, 0)) == sorted([a, a, b])


def test_same_beams_and_scores_as_transformers_4_group_beam_search():
    """Saved transformers 4.46.3 outputs: λ ∈ {0.5, 1, 2}, 1–3 beams per group, 3–16 groups, length penalty −2…1,
    left-padded prompts: every sequence equal and every score within 1e-6 (4.x sums in float32)."""
    lams = {case[3] for case in CASES}
    assert {0.5, 2.0} <= lams and max(case[2] for case in CASES) == 3
    verdict = compare(Path(__file__).resolve().parents[1] / "fixtures" / "beam_hf4")
    assert verdict["transformers_reference"] == "4.46.3"
    assert all(case["ids_equal"] for case in verdict["cases"]), verdict
    assert max(case["max_rel_score_diff"] for case in verdict["cases"]) < 1e-6, verdict


def test_the_smallest_vocabulary_the_check_accepts_decodes():
    """Two tokens, two beams: the 2k = 4 candidates are the whole group (a wider top-k would overrun it)."""
    ids = torch.zeros(1, 3, dtype=torch.long)
    out, mask, scores = diverse_beam_search(_gpt2(2), ids, torch.ones_like(ids), num_groups=1, beams_per_group=2,
                                            diversity_penalty=0.0, length_penalty=1.0, min_new_tokens=1,
                                            max_new_tokens=3, eos_id=1)
    rewrites = {tuple(row[m.bool()].tolist()) for row, m in zip(out[0], mask[0])}
    assert out.shape[:2] == (1, 2) and len(rewrites) == 2 and float(scores[0, 0]) >= float(scores[0, 1])
