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


# ------------------------------------------------------------------ ImageReward's two preprocessings
# The image-reward package and its weights cannot be had here (no network): the factories are driven with a
# stand-in `ImageReward` module that records what the scorer hands the model.

def test_official_imagereward_pixels_normalise_twice():
    from common.clip import OPENAI_MEAN, OPENAI_STD
    from scoring.scorers import official_imagereward_pixels

    gray = torch.full((2, 3, 32, 32), 128 / 255)
    pixels = official_imagereward_pixels(gray)
    assert pixels.shape == (2, 3, 224, 224)
    for c in range(3):
        once = (128 / 255 - OPENAI_MEAN[c]) / OPENAI_STD[c]
        twice = (once - OPENAI_MEAN[c]) / OPENAI_STD[c]
        assert pixels[:, c].flatten().tolist() == pytest.approx([twice] * 2 * 224 * 224, abs=1e-5)
    wide = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    assert official_imagereward_pixels(wide).shape == (1, 3, 224, 224)  # short side to 224, then the centre crop


class _FakeImageReward:
    """Stands in for ImageReward-v1.0: `score_gard` returns each image's pixel mean, `score` the text's length."""

    def __init__(self):
        self.calls = []
        outer = self

        class Tokens:
            def __init__(self, n):
                self.input_ids = torch.zeros(n, 75, dtype=torch.long)
                self.attention_mask = torch.ones(n, 75, dtype=torch.long)

        class Blip:
            @staticmethod
            def tokenizer(texts, **kwargs):
                outer.calls.append(("tokenizer", list(texts), kwargs))
                return Tokens(len(texts))

        self.blip = Blip()

    def score_gard(self, ids, mask, pixels):
        self.calls.append(("score_gard", pixels.clone()))
        return pixels.mean(dim=(1, 2, 3)).unsqueeze(1)

    def score(self, text, pictures):
        self.calls.append(("score", text, len(pictures)))
        return [float(len(text))] * len(pictures)


@pytest.fixture()
def fake_imagereward(monkeypatch):
    import types

    model = _FakeImageReward()
    module = types.SimpleNamespace(load=lambda name, device: model)
    monkeypatch.setitem(__import__("sys").modules, "ImageReward", module)
    return model


def test_imagereward_scorer_is_the_official_eval(cfg, fake_imagereward):
    from scoring.scorers import official_imagereward_pixels

    images = _images(3)
    out = build_scorers(["imagereward"], cfg.model)(images, ["a cat", "a dog", "a cat"])
    (_, texts, kwargs), (_, pixels) = fake_imagereward.calls
    assert texts == ["a cat", "a dog", "a cat"]
    assert kwargs == {"padding": "max_length", "truncation": True, "max_length": 75, "return_tensors": "pt"}
    assert torch.equal(pixels, official_imagereward_pixels(images))
    assert out["imagereward"].shape == (3,) and torch.allclose(out["imagereward"], pixels.mean(dim=(1, 2, 3)))


def test_imagereward_package_scorer_calls_score_per_text(cfg, fake_imagereward):
    out = build_scorers(["imagereward-package"], cfg.model)(_images(3), ["a cat", "a horse", "a cat"])
    assert fake_imagereward.calls == [("score", "a cat", 2), ("score", "a horse", 1)]
    assert out["imagereward"].tolist() == [5.0, 7.0, 5.0]
