"""Scorer registry and the tiny aesthetic / CLIP scorers (real open_clip classes, real LAION MLP)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from scoring.scorers import SCORERS, ScorerUnavailableError, UnknownScorerError, build_scorers, score_keys
from common.config import load_config
from common.clip import build_clip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def score(cfg):
    return build_scorers(["aesthetic", "clip"], cfg.model)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_unknown_scorer_names_the_known_ones(cfg):
    with pytest.raises(UnknownScorerError) as info:
        build_scorers(["aesthetic", "pickscroe"], cfg.model)
    message = str(info.value)
    assert "pickscroe" in message
    for name in ("aesthetic", "clip", "imagereward", "hps"):
        assert name in message


@pytest.mark.parametrize("name, package", [("imagereward", "image-reward"), ("hps", "hpsv2")])
def test_missing_package_error_names_it(cfg, name, package):
    module = {"imagereward": "ImageReward", "hps": "hpsv2"}[name]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ScorerUnavailableError, match=f"pip install {package}"):
        build_scorers(["aesthetic", "clip", name], cfg.model)


def test_score_keys():
    assert score_keys(["aesthetic", "clip"]) == ["aes", "clip"]
    assert score_keys(["clip", "hps"]) == ["clip", "hps"]


def test_scores_shapes_and_determinism(score):
    images = _images(4)
    out = score(images, ["a cat"] * 4)
    assert set(out) == {"aes", "clip"}
    for value in out.values():
        assert value.shape == (4,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    same = score(images.clone(), ["a cat"] * 4)
    assert torch.equal(out["aes"], same["aes"])  # identical images, identical aesthetic
    assert not torch.allclose(out["aes"][0], out["aes"][1])  # and different images differ


def test_clip_is_raw_cosine_with_each_images_own_prompt(cfg, score):
    images = _images(3, seed=1)
    prompts = ["a cat", "a red car", "a cat"]
    clip = build_clip(cfg.model)  # same seeded weights as the scorer's
    expected = (clip.encode_images(images) * clip.encode_text(prompts)).sum(-1)
    got = score(images, prompts)["clip"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 1.0  # a cosine: no ×100 logit scale
    swapped = score(images, ["a red car", "a cat", "a cat"])["clip"]
    assert not torch.allclose(swapped[:2], got[:2])


def test_aesthetic_is_the_mlp_on_normalised_embeddings(cfg, score):
    from common.clip import build_aesthetic

    images = _images(2, seed=2)
    emb = build_clip(cfg.model).encode_images(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(score(images, ["x", "y"])["aes"], build_aesthetic(cfg.model)(emb), atol=1e-5, rtol=1e-5)


def test_shape_mismatch_is_an_error(score):
    with pytest.raises(ValueError, match="len\\(prompts\\)"):
        score(_images(2), ["only one"])


def test_registered_scorer_runs_beside_the_builtins(cfg, monkeypatch):
    calls = []

    def factory(ctx):
        calls.append("setup")
        return lambda images, prompts: {"const": torch.full((len(prompts),), 7.0)}

    monkeypatch.setitem(SCORERS, "const", factory)
    from scoring import scorers

    monkeypatch.setitem(scorers.SCORE_KEYS, "const", ("const",))
    fn = build_scorers(["aesthetic", "clip", "const"], cfg.model)
    out = fn(_images(2), ["a", "b"])
    assert out["const"].tolist() == [7.0, 7.0] and {"aes", "clip"} <= set(out)
    fn(_images(2), ["a", "b"])
    assert calls == ["setup"]  # set-up once, not per call
