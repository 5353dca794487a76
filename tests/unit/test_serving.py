"""`pag serve`'s work without Ray (serving/core.py): the request schema and its limits, a run's policy rewriting
by sampling (seeded) or diverse beam search, batched requests equal to single ones, and rendering + scoring
against the plain prompt's pictures on the same noise. A tiny run with random weights (tests/conftest.py)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.runs import resolve_checkpoint
from serving.core import (MAX_REFINE_ITERATIONS, MAX_REWRITES, Judge, RefineRequest, Refiner, Rewriter, RewriteRequest,
                          clip_token_count)


@pytest.mark.parametrize("fields, where, says", [
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "   "}, "prompt", "prompt is blank"),
    ({"prompt": "a cat", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "a cat", "n": MAX_REWRITES + 1}, "n", f"less than or equal to {MAX_REWRITES}"),
    ({"prompt": "a cat", "decode": "greedy"}, "decode", "'sample' or 'beam'"),
    ({"prompt": "a cat", "temperature": 0}, "temperature", "greater than 0"),
    ({"prompt": "a cat", "images": 3}, "images", "Extra inputs are not permitted"),
])
def test_a_bad_request_names_the_field_and_the_limit(fields, where, says):
    with pytest.raises(ValidationError) as err:
        RewriteRequest(**fields)
    (error,) = err.value.errors()
    assert error["loc"] == (where,) and says in error["msg"]


def test_clip_tokens_count_the_start_and_end_tokens():
    assert clip_token_count("a cat") == 4
    assert clip_token_count(" ".join(["cat"] * 80)) == 82


def test_a_path_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} has no checkpoint"):
        resolve_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def rewriter(tiny_run):
    return Rewriter.from_run(tiny_run)


def test_sampling_is_seeded_and_a_batch_equals_its_requests_alone(rewriter):
    a = RewriteRequest(prompt="a cat on a sofa", n=3, seed=1)
    b = RewriteRequest(prompt="a red house", n=3, seed=1)
    c = RewriteRequest(prompt="a cat on a sofa", n=3, seed=2)
    together = rewriter.rewrite([a, b, c])
    assert [len(t) for t in together] == [3, 3, 3]
    assert together == [rewriter.rewrite([r])[0] for r in (a, b, c)]
    assert together[0] != together[2]  # another seed, other rewrites


def test_beam_search_gives_n_distinct_rewrites_deterministically(rewriter):
    req = RewriteRequest(prompt="a cat on a sofa", n=4, decode="beam")
    first, again = rewriter.rewrite([req])[0], rewriter.rewrite([req])[0]
    assert first == again and len(first) == 4 and len(set(first)) == 4


def test_the_judge_renders_the_plain_prompt_and_each_rewrite_and_scores_the_gain(rewriter):
    judge = Judge(rewriter.cfg)
    out = judge.judge("a cat on a sofa", ["a cat on a sofa, 8k", "a cat, oil painting"])
    k = rewriter.cfg.reward.images.per_prompt
    assert out["plain"]["text"].startswith("a cat on a sofa") and len(out["plain"]["images"]) == k
    assert len(out["rewrites"]) == 2
    for card in out["rewrites"]:
        s = card["scores"]
        assert len(card["images"]) == k and all(i.startswith("data:image/png;base64,") for i in card["images"])
        assert s["aes_gain"] == pytest.approx(s["aes"] - out["plain"]["scores"]["aes"])
        assert s["reward"] == pytest.approx(s["aes_gain"] + s["rel"]) and s["rel"] <= 0


def test_refinement_runs_bounded_ipgo_and_returns_both_pictures(rewriter):
    """IPGO on a chosen rewrite: `iterations` steps on the run's IPGO noise, the best kept, before/after pictures."""
    out = Refiner(rewriter.cfg).refine("a cat, oil painting", iterations=3)
    assert out["iterations"] == 3 and len(out["curve"]) == 3
    assert out["best_reward"] == max(out["curve"]) and out["curve"][out["best_iteration"]] == out["best_reward"]
    assert out["reward_terms"] == list(rewriter.cfg.ipgo.reward) and out["truncated"] is False
    assert all(out["images"][k].startswith("data:image/png;base64,") for k in ("before", "after"))
    assert out["images"]["before"] != out["images"]["after"], "the learned tokens change the picture"


@pytest.mark.parametrize("fields, where, says", [
    ({"text": " "}, "text", "text is blank"),
    ({"text": "a cat", "iterations": 0}, "iterations", "greater than or equal to 1"),
    ({"text": "a cat", "iterations": MAX_REFINE_ITERATIONS + 1}, "iterations",
     f"less than or equal to {MAX_REFINE_ITERATIONS}"),
    ({"text": "a cat", "seed": 1}, "seed", "Extra inputs are not permitted"),
])
def test_a_bad_refinement_names_the_field_and_the_limit(fields, where, says):
    with pytest.raises(ValidationError) as err:
        RefineRequest(**fields)
    (error,) = err.value.errors()
    assert error["loc"] == (where,) and says in error["msg"]
