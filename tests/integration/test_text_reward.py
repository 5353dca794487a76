"""The offline text reward (scoring/style.py, scoring/text_scorers.py): the logistic fit, the cached style
classifier's held-out accuracy, the relevance hinge, the reward composition, and a reward worker that
renders nothing (reward.render=false), through Redis like any other."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from scoring.reward import paper_reward, reward_parts
from scoring.style import fit_logistic, text_relevance

torch.set_num_threads(2)


def test_logistic_fit_separates_and_is_balanced():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(1.0, 0.5, (30, 4)), rng.normal(-1.0, 0.5, (90, 4))])
    y = np.array([1] * 30 + [0] * 90)
    w, b = fit_logistic(x, y)
    assert (((x @ w + b) > 0).astype(int) == y).mean() >= 0.97
    with pytest.raises(ValueError, match="both labels"):
        fit_logistic(x, np.ones(120, dtype=int))


def test_reward_parts():
    mine, plain = {"aes": 5.5, "clip": 0.3, "rel": -0.4}, {"aes": 5.0, "clip": 0.31}
    assert reward_parts(mine, plain) == paper_reward(5.5, 5.0, -0.4)  # the paper's reward, unchanged
    text = reward_parts({"style": 2.0, "text_cos": 0.3, "rel_text": -3.0}, {"style": -1.0, "text_cos": 1.0})
    assert text == {"style_gain": 3.0, "rel_text": -3.0, "reward": 0.0}
    hinge = text_relevance(torch.tensor([0.9, 0.45, 0.2]), 0.45, 20.0)
    assert hinge.tolist() == pytest.approx([0.0, 0.0, -5.0])


def test_config_tiny_proxy_and_render_check():
    cfg = load_config("tiny-proxy")
    assert cfg.reward.render is False and cfg.sampler.response == "suffix"
    assert cfg.reward.scorers == ["style", "relevance_text"]
    assert load_config("tiny").reward.render is True
    with pytest.raises(ConfigError, match="reward.render"):
        load_config("tiny", overrides=["reward.render=maybe"])


@pytest.fixture(scope="module")
def text_scorers():
    from scoring.scorers import build_scorers

    return build_scorers(["style", "relevance_text"], load_config("tiny-proxy").model)


def test_style_classifier_held_out_accuracy(text_scorers):
    """From the cached fit: the EVAL split of the same sets, never seen by the fit."""
    from scoring.style import style_data

    texts, labels = style_data("eval")
    assert len(texts) > 200 and 0 < labels.mean() < 1
    style = text_scorers(None, texts, texts)["style"].numpy()
    accuracy = float(((style > 0).astype(int) == labels).mean())
    assert accuracy >= 0.9, accuracy


def test_modifiers_raise_style_and_a_dropped_subject_is_penalised(text_scorers):
    plain = "a brown dog sitting on a wooden bench in a park"
    rewrites = [plain, plain + ", highly detailed, digital painting, artstation, concept art, sharp focus",
                "highly detailed, digital painting, artstation, concept art, sharp focus, by greg rutkowski"]
    s = text_scorers(None, [plain] * 3, rewrites)
    assert s["text_cos"][0] == pytest.approx(1.0, abs=1e-5)
    assert s["style"][1] > s["style"][0] + 1.0, "modifiers look engineered"
    rel = text_relevance(s["text_cos"].double(), 0.45, 20.0)
    assert rel[1] == 0.0 and rel[2] < -2.0, "kept subject: no penalty; dropped subject: penalised"
    kept = float(s["style"][1] - s["style"][0] + rel[1])
    dropped = float(s["style"][2] - s["style"][0] + rel[2])
    assert kept > dropped


def test_reward_worker_without_rendering(redis_url, run_name):
    from actors.reward_worker import RewardWorker
    from scoring.render import build_reward_models
    from common.trajectory import Trajectory

    cfg = load_config("tiny-proxy")
    worker = RewardWorker(cfg, redis_url, run_name)
    assert worker.renderer is None
    plain = "two people riding bicycles down a city street"
    trajs = [Trajectory(prompt=plain, response=r, prompt_ids=[1, 2], response_ids=[3, 4], ref_logprobs=[-1.0, -1.0])
             for r in (plain + ", cinematic lighting, 8k, trending on artstation", "a bowl of soup, 8k")]
    scored, failed = worker.score_batch(trajs)
    assert not failed and len(scored) == 2
    for t in scored:
        s = t.scores
        assert s["reward"] == pytest.approx(s["style_gain"] + s["rel_text"])
        assert s["style_plain"] == pytest.approx(s["style"] - s["style_gain"])
        assert t.log_reward == pytest.approx(s["reward"] / cfg.reward.beta)
    assert scored[0].scores["reward"] > scored[1].scores["reward"]
    again, _ = worker.score_batch(trajs[:1])
    assert worker.stats.plain_cache_hits == 1 and again[0].scores["reward"] == pytest.approx(scored[0].scores["reward"])
    worker.close()
    with pytest.raises(ValueError, match="only hold text scorers"):
        build_reward_models(load_config("tiny-proxy", overrides=["reward.scorers=[style,aesthetic]"]))
