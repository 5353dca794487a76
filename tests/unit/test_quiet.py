"""A healthy run is quiet: our own calls into transformers, diffusers and open_clip raise no warnings
(no deprecated keyword left behind), and what cleaning did to a dataset is said once, at INFO."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from common import clip as C
from common import data
from common import models as M
from common.beam_search import diverse_beam_search
from common.config import load_config
from common.decoding import encode_prompts, ref_logprobs, sample, teacher_forced


def _described(caught: list[warnings.WarningMessage]) -> str:
    return "\n".join(f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught)


def test_tiny_models_and_decoding_raise_no_warnings(tmp_path):
    cfg = load_config("tiny").model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = M.build_tokenizer(cfg)
        policy, ref = M.build_policy(cfg, tok), M.build_reference(cfg, tok)
        ids, mask = encode_prompts(tok, ["a cat", "a lighthouse on a cliff at dusk"], torch.device("cpu"))
        response, response_mask = sample(policy, ids, mask, max_len=6, min_len=1, temperature=1.0,
                                         eos_id=tok.eos_token_id, generator=torch.Generator().manual_seed(0))
        teacher_forced(policy, ids, mask, response, response_mask, tok.eos_token_id)
        ref_logprobs(ref, ids, mask, response, response_mask)
        diverse_beam_search(policy, ids, mask, num_groups=2, beams_per_group=2, diversity_penalty=1.0,
                            length_penalty=-1.0, min_new_tokens=1, max_new_tokens=4, eos_id=tok.eos_token_id)
        pipe = M.build_sd_pipeline(cfg)
        pipe.save_pretrained(tmp_path / "sd")  # then through the pretrained path, which takes a load dtype
        M.build_sd_pipeline(cfg.model_copy(update={"kind": "pretrained", "sd": str(tmp_path / "sd")}))
        C.build_aesthetic(cfg)(C.build_clip(cfg).encode_text(["a cat"]))
    assert not caught, _described(caught)


@pytest.fixture
def fresh_notes(monkeypatch):
    """A process that has not loaded any dataset yet."""
    monkeypatch.setattr(data, "notes", data.DatasetNotes(data.logger))


def test_default_datasets_are_described_once_at_info(fresh_notes, caplog):
    cfg = load_config("tiny")
    with caplog.at_level(logging.DEBUG, logger="common.data"):
        for _ in range(2):  # the preflight, then the sampler, in one process
            data.load_train_prompts(cfg.sampler.datasets)
            for name in cfg.eval.datasets:
                data.load_prompts(name, dedup=False)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "common.data"]
    assert all(level == logging.INFO for level, _ in lines), lines
    texts = [text for _, text in lines]
    assert len(texts) == len(set(texts)) == 3, texts
    assert "coco: dropped 1 duplicate(s) of 256 prompts" in texts
    assert "pickapic: truncated 11 of 300 prompts to 75 tokens" in texts
    assert any(t.startswith("diffusiondb_ipgo+pickapic+coco_all: dropped 1 training prompt(s) found in the paper")
               for t in texts)


def test_saving_and_loading_a_policy_draws_no_progress_bars(tmp_path, capsys):
    """transformers' own bars ("Writing model shards", "Loading weights") are off: checkpoints are saved and loaded
    in actors whose output lands on the driver's progress line."""
    cfg = load_config("tiny").model
    policy = M.build_policy(cfg, M.build_tokenizer(cfg))
    capsys.readouterr()
    policy.save_pretrained(tmp_path)
    type(policy).from_pretrained(tmp_path)
    assert capsys.readouterr().err == ""


def test_loading_a_saved_pipeline_prints_nothing(capfd):
    """The miniature world's saved pipeline, loaded as every reward worker loads it: no "install accelerate"
    recommendation (accelerate is no dependency) and no "Loading pipeline components" bar."""
    capfd.readouterr()
    M.build_sd_pipeline(load_config("mini").model)
    out = capfd.readouterr()
    printed = out.out + out.err
    assert "accelerate" not in printed and "Loading pipeline components" not in printed, printed[-2000:]
