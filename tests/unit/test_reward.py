"""The paper's reward maths (`scoring.reward`): the relevance hinge per image, then the mean."""
import pytest
import torch

from types import SimpleNamespace

from scoring.reward import baseline_text, paper_reward, per_text_scores, relevance, reward_parts


def test_relevance_hinges_each_image_before_the_mean():
    clip = torch.tensor([0.25, 0.30, 0.31])
    # per image: 20·(0.25 − 0.28) = −0.6, 0, 0 → mean −0.2; a hinge after the mean (0.2867 > 0.28) would give 0
    assert float(relevance(clip, 0.28, 20.0)) == pytest.approx(-0.2, abs=1e-6)
    assert float(relevance(clip.mean(-1, keepdim=True), 0.28, 20.0)) == 0.0


def test_relevance_clamps_negative_cosines_and_batches():
    clip = torch.tensor([[-0.5, -0.5, -0.5], [0.9, 0.9, 0.9]])
    out = relevance(clip, 0.28, 20.0)
    assert out.shape == (2,)
    assert float(out[0]) == pytest.approx(-20 * 0.28), "a negative cosine counts as 0, not below"
    assert float(out[1]) == 0.0, "no bonus above the threshold"


def test_relevance_is_differentiable_below_the_threshold_only():
    clip = torch.tensor([0.1, 0.5], requires_grad=True)
    relevance(clip, 0.28, 20.0).backward()
    assert clip.grad.tolist() == pytest.approx([10.0, 0.0])


def test_paper_reward_components():
    same = paper_reward(5.0, 5.0, 0.0)
    assert same == {"aes_gain": 0.0, "rel": 0.0, "reward": 0.0}
    low = paper_reward(6.0, 5.5, -0.6)
    assert low["aes_gain"] == pytest.approx(0.5) and low["reward"] == pytest.approx(-0.1)


def test_per_text_scores_means_each_texts_images_and_hinges_clip_per_image():
    """Two texts × three images, the reward workers' layout (text j's images in rows 3j … 3j + 2)."""
    r = SimpleNamespace(clip_threshold=0.28, clip_weight=10.0, text_threshold=0.5, text_weight=10.0)
    scores = {"aes": torch.tensor([5.0, 6.0, 7.0, 1.0, 2.0, 6.0]),
              "clip": torch.tensor([0.25, 0.30, 0.31, 0.10, 0.40, 0.40]),
              "text_cos": torch.tensor([0.6, 0.6, 0.6, 0.3, 0.3, 0.3])}
    out = per_text_scores(scores, 2, 3, r)
    assert out["aes"].dtype == torch.float64 and out["aes"].tolist() == pytest.approx([6.0, 3.0])
    assert out["clip"].tolist() == pytest.approx([0.2867, 0.30], abs=1e-4)
    # per image, not on the mean: text 0's mean 0.2867 is above 0.28 yet its first image costs 10·0.03 / 3;
    # text 1's mean 0.30 too, yet its first image costs 10·0.18 / 3 (the weight is the config's, not the default 20)
    assert out["rel"].tolist() == pytest.approx([-0.1, -0.6], abs=1e-6)
    assert out["rel_text"].tolist() == pytest.approx([0.0, -2.0], abs=1e-6), "the sentence hinge, on the text"
    text_only = per_text_scores({"style": torch.tensor([0.5, -1.0])}, 2, 1, r)
    assert set(text_only) == {"style"} and text_only["style"].tolist() == [0.5, -1.0]


def test_reward_parts_adds_every_gain_and_penalty_by_name():
    mine = {"aes": 6.0, "style": 0.5, "rel": -0.2, "rel_text": -1.0, "clip": 0.3}
    out = reward_parts(mine, {"aes": 5.5, "style": -0.5})
    assert out == pytest.approx({"aes_gain": 0.5, "style_gain": 1.0, "rel": -0.2, "rel_text": -1.0, "reward": 0.3})
    assert reward_parts({"aes": 6.0, "rel": -0.6}, {"aes": 5.5}) == pytest.approx(paper_reward(6.0, 5.5, -0.6))
    with pytest.raises(KeyError, match="style"):
        reward_parts({"style": 0.5}, {"aes": 5.5})


def test_baseline_text_is_the_plain_prompt_or_the_policy_input_around_it():
    cfg = SimpleNamespace(reward=SimpleNamespace(baseline="plain"), model=SimpleNamespace(input_format="pag"))
    assert baseline_text(cfg, "a cat") == "a cat"
    cfg.reward.baseline = "policy_input"
    assert baseline_text(cfg, "a cat") == "a cat Rephrase:\n"
