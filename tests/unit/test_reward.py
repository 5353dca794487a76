"""The paper's reward maths (`scoring.reward`): the relevance hinge per image, then the mean."""
import pytest
import torch

from scoring.reward import paper_reward, relevance


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
