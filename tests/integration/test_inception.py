"""The official eval's image measure (issue 19, item 6): pytorch-fid's InceptionV3 pool-3 features with eval.py's
0-255 input scaling, as a mean pairwise cosine similarity. The FID weights cannot be downloaded here, so the
real architecture runs with random weights: only the download is replaced."""
import urllib.error

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_fid", reason="pip install 'pag[fid]'")

from common.models import ModelLoadError  # noqa: E402
from eval.inception import DIM, build_inception, official_features  # noqa: E402
from eval.metrics import prompt_metrics  # noqa: E402


@pytest.fixture
def random_weights(monkeypatch):
    """The FID InceptionV3 built as pytorch-fid builds it, its state-dict download replaced by the random init."""
    import pytorch_fid.inception as fid
    import torchvision.models.inception as tv

    monkeypatch.setattr(fid, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tv.Inception3, "load_state_dict", lambda self, state, *a, **k: None)


def test_features_are_pool3_of_0_255_pixels(random_weights):
    torch.manual_seed(0)
    model = build_inception(torch.device("cpu"))
    images = torch.rand(3, 3, 32, 32)
    features = official_features(model, images)
    assert features.shape == (3, DIM) and torch.isfinite(features).all()
    with torch.no_grad():  # eval.py feeds np.array(PIL image).float(): 0-255, not the [0, 1] the network expects
        expected = model((images * 255).round())[0].flatten(1)
        unit = model(images)[0].flatten(1)
    torch.testing.assert_close(features, expected)
    assert features.norm() > 10 * unit.norm(), "inputs up to 255 reach the network, not [0, 1]"


def test_offline_without_cached_weights_says_how_to_get_them(monkeypatch):
    import pytorch_fid.inception as fid

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fid, "load_state_dict_from_url", offline)
    with pytest.raises(ModelLoadError, match=r"InceptionV3\(\)\".*pt_inception-2015-12-05.*eval.inception=false"):
        build_inception(torch.device("cpu"))


def test_similarity_is_the_mean_over_distinct_pairs():
    """utils.py:46 batch_cosine_similarity_kernel: diagonal left out. Two equal rows and one orthogonal:
    pairs (1, 2) = 1, (1, 3) = (2, 3) = 0, so 1/3."""
    rows = [{"reward": 1.0}]
    feats = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    m = prompt_metrics(rows, np.eye(2), np.eye(3), feats)
    assert m["image_similarity_inception"] == pytest.approx(1 / 3)
    assert "image_similarity_inception" not in prompt_metrics(rows, np.eye(2), np.eye(3))


def test_eval_records_carry_inception_features_through_the_cache(random_weights):
    from common.config import load_config
    from eval.cache import decode_record
    from eval.worker import EvalWorker, decode_results, encode_items, render_id

    cfg = load_config("tiny", overrides=["eval.images.steps=1", "eval.images.per_prompt=2", "eval.inception=true"])
    assert render_id(cfg, "float32") != render_id(load_config("tiny", overrides=["eval.images.steps=1",
                                                                                 "eval.images.per_prompt=2"]),
                                                  "float32"), "records with features are cached apart"
    item = {"against": "a red car", "key": "a red car, 8k", "text": "a red car, 8k", "thumb": False}
    (result,) = decode_results(EvalWorker(cfg.to_dict()).process(encode_items([item])))
    record = decode_record(result["record"])
    assert record["inc"].shape == (2, DIM) and np.isfinite(record["inc"]).all()
