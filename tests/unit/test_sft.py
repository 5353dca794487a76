"""`pag sft`: the pairs, a short real training run, the cache and the command line."""
from __future__ import annotations

import json
import threading

import pytest
import torch

import sft.cache
import sft.cli
import sft.pairs
import sft.train
from pag.cli import main as pag
from common.config import ConfigError, load_config
from common.data import PAPER_EVAL_SETS, load_prompts
from common.models import build_policy, build_tokenizer

DATASETS = ["diffusiondb_ipgo", "pickapic", "coco_all"]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return sft.pairs.build_pairs(DATASETS, seed=0)


def key(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!-")


@pytest.fixture(scope="module")
def eval_prompts() -> set[str]:
    return {key(p) for name in PAPER_EVAL_SETS for p in load_prompts(name, "all").prompts}


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- pairs

def test_split_rule():
    assert sft.pairs.plain_of("Steve Ballmer as The  Incredible Hulk, artstation, 8k ") == "steve ballmer as the incredible hulk"
    assert sft.pairs.modifiers_of("Steve Ballmer as The Incredible Hulk, artstation, 8k") == ["artstation", "8k"]
    assert sft.pairs.plain_of("a quiet forest by Greg Rutkowski | octane render") == "a quiet forest"
    assert sft.pairs.modifiers_of("a quiet forest by Greg Rutkowski | octane render") == ["by greg rutkowski", "octane render"]
    assert sft.pairs.split_modifiers("a cat on a sofa") == ("a cat on a sofa", "")


def test_pairs_are_deterministic_clean_and_of_both_kinds(pairs, eval_prompts):
    assert len(pairs) > 500
    assert sft.pairs.build_pairs(DATASETS, seed=0) == pairs
    assert sft.pairs.build_pairs(DATASETS, seed=1) != pairs  # the sampled modifiers depend on the seed
    assert all(plain and target and plain != target for plain, target in pairs)
    assert not [p for p in pairs if key(p[0]) in eval_prompts or key(p[1]) in eval_prompts]
    coco = set(load_prompts("coco_all").prompts)
    appended = [(x, y) for x, y in pairs if x in coco]
    stripped = [(x, y) for x, y in pairs if x == sft.pairs.plain_of(y) and x != y.lower()]
    assert len(appended) > 200 and len(stripped) > 200
    assert all(y.startswith(x.rstrip(" .") + ", ") for x, y in appended)
    vocab = {m for m, _ in sft.pairs.modifier_vocabulary(load_prompts("pickapic").prompts + load_prompts("diffusiondb_ipgo").prompts)}
    for x, y in appended[:50]:
        mods = y[len(x.rstrip(" .")) + 2:].split(", ")
        assert 2 <= len(mods) <= 6 and set(mods) <= vocab


def test_pairs_drop_eval_prompts_even_when_derived(tmp_path, monkeypatch):
    """An engineered prompt whose stripped subject is a paper-eval prompt must not become a pair."""
    chatgpt = {key(p) for p in load_prompts("chatgpt").prompts if "," not in p}
    suffixes = ["artstation", "8k", "highly detailed", "octane render", "by greg rutkowski", "concept art"]
    lines = [f"{p}, {s}" for p in sorted(chatgpt)[:5] for s in suffixes]
    lines += [f"a red fox number {i} in the snow, {s}" for i in range(5) for s in suffixes[:2]]
    file = tmp_path / "eng.txt"
    file.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sft.pairs, "ENGINEERED_SETS", (*sft.pairs.ENGINEERED_SETS, str(file)))
    engineered = load_prompts(file, "train").prompts
    assert any(key(sft.pairs.plain_of(p)) in chatgpt for p in engineered)  # the filter has work to do
    pairs = sft.pairs.build_pairs([str(file)], seed=0)
    assert pairs and all(x.startswith("a red fox number") for x, _ in pairs)


def test_eval_sets_contribute_nothing(eval_prompts):
    pairs = sft.pairs.build_pairs(["pickapic", "lexica", "chatgpt"], seed=0)
    assert pairs and not [p for p in pairs if key(p[0]) in eval_prompts or key(p[1]) in eval_prompts]


# ---------------------------------------------------------------- training

def test_short_sft_lowers_loss_and_saves_a_loadable_checkpoint(tmp_path, pairs):
    cfg = load_config("tiny")
    subset = pairs[::24][:32]
    tok = build_tokenizer(cfg.model)
    before = sft.train.evaluate_nll(build_policy(cfg.model, tok), tok, subset)

    out = sft.train.train_sft(cfg, tmp_path / "ckpt", steps=20, batch_size=8, lr=3e-3, log=lambda _: None, pairs=subset)

    assert out == tmp_path / "ckpt"
    meta = json.loads((out / "sft.json").read_text())
    assert meta["steps"] == 20 and meta["pairs"] == 32 and len(meta["config_hash"]) == 12
    loaded = build_policy(cfg.model, tok, checkpoint=str(out))
    after = sft.train.evaluate_nll(loaded, tok, subset)
    assert after < before - 1.0, (before, after)
    assert meta["final_loss"] == pytest.approx(after, abs=1e-3)
    assert build_tokenizer(cfg.model.model_copy(update={"tokenizer": str(out)})).eos_token_id == tok.eos_token_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_sampled_softmax_matches_exact_when_it_keeps_every_token():
    torch.manual_seed(0)
    states, weight = torch.randn(7, 8), torch.randn(50, 8)
    targets = torch.tensor([1, 3, 3, 9, 0, 49, 1])
    exact = torch.nn.functional.cross_entropy(states @ weight.T, targets)
    full = sft.train.SampledSoftmax(targets, 50, negatives=1000, seed=0)  # k clipped to all 45 other tokens
    assert full(states, targets, weight).item() == pytest.approx(exact.item(), abs=1e-5)
    sampled = sft.train.SampledSoftmax(targets, 50, negatives=10, seed=0)
    assert torch.isfinite(sampled(states, targets, weight))


def test_failed_save_leaves_no_checkpoint(tmp_path, pairs, monkeypatch):
    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sft.train, "_replace_dir", broken)
    with pytest.raises(OSError):
        sft.train.train_sft(load_config("tiny"), tmp_path / "ckpt", steps=1, batch_size=2, log=lambda _: None, pairs=pairs[:4])
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, pairs):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an SFT checkpoint"):
        sft.train.train_sft(load_config("tiny"), tmp_path, steps=1, log=lambda _: None, pairs=pairs[:4])


# ---------------------------------------------------------------- ensure_sft

@pytest.fixture
def counted_training(tmp_path, monkeypatch):
    """PAG_CACHE in tmp_path, a 2-step tiny default, and a counter of real training runs."""
    monkeypatch.setenv("PAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sft.train.DEFAULTS, "tiny", sft.train.SFTSettings(steps=2, batch_size=2, lr=1e-3, negatives=64))
    calls = []
    real = sft.train.train_sft

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(sft.cache, "train_sft", counting)
    return calls


def test_ensure_sft_trains_once_then_uses_the_cache(tmp_path, counted_training):
    cfg = load_config("tiny")
    first = sft.cache.ensure_sft(cfg)
    assert first.startswith(str(tmp_path / "cache" / "sft" / "tiny-"))
    stamp = (tmp_path / "cache" / "sft").stat().st_mtime_ns
    assert sft.cache.ensure_sft(cfg) == first
    assert len(counted_training) == 1
    assert json.loads((tmp_path / "cache" / "sft" / first.split("/")[-1] / "sft.json").read_text())["steps"] == 2
    assert (tmp_path / "cache" / "sft").stat().st_mtime_ns == stamp

    other = sft.cache.ensure_sft(load_config("tiny", overrides=["model.seed=1"]))  # new weights and pairs: a new key
    assert other != first and len(counted_training) == 2


def test_ensure_sft_concurrent_callers_train_once(counted_training):
    cfg = load_config("tiny")
    results, barrier = [], threading.Barrier(2)

    def call():
        barrier.wait()
        results.append(sft.cache.ensure_sft(cfg))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(counted_training) == 1


def test_ensure_sft_explicit_checkpoint_and_sd14(counted_training):
    assert sft.cache.ensure_sft(load_config("tiny", overrides=["model.sft_checkpoint=/ckpt/x"])) == "/ckpt/x"
    assert sft.cache.ensure_sft(load_config("sd14", overrides=["model.sft_checkpoint=me/sft"])) == "me/sft"
    with pytest.raises(ConfigError, match=r"model.sft_checkpoint .*`pag sft --preset sd14`.*Promptist"):
        sft.cache.ensure_sft(load_config("sd14"))  # vanilla GPT-2 as the reference would change the target
    assert sft.cache.ensure_sft(load_config("sd14-arch")) == "gpt2", "random-weight speed preset: no SFT needed"
    assert counted_training == []


def test_pag_train_sd14_without_sft_stops_before_anything_starts(tmp_path, capsys):
    from pag.cli import main

    code = main(["train", "--preset", "sd14", "--runs-dir", str(tmp_path / "runs")])
    assert code == 2 and "pag sft --preset sd14" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists(), "no run directory, no Redis, no Ray"


# ---------------------------------------------------------------- command line

def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        pag(["sft", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--steps" in text and "--out" in text and "Rephrase" in text


def test_cli_runs_a_tiny_sft(tmp_path, capsys):
    out = tmp_path / "sft"
    assert pag(["sft", "--steps", "2", "--batch-size", "2", "--out", str(out), "--samples", "2", "model.seed=2"]) == 0
    printed = capsys.readouterr().out
    assert f"model.sft_checkpoint={out}" in printed and "sampled rewrites" in printed
    assert json.loads((out / "sft.json").read_text())["seed"] == 2
    assert pag(["sft", "--steps", "0", "--out", str(out)]) == 2  # a config error, not a traceback


def test_sft_steps_come_from_the_config_unless_given_and_key_the_cache():
    tiny, mini = load_config(preset="tiny"), load_config(preset="mini")
    assert sft.train.settings_for(tiny).steps == sft.train.DEFAULTS["tiny"].steps
    assert sft.train.settings_for(mini).steps == mini.model.sft_steps == 2000
    assert sft.train.settings_for(mini, steps=7).steps == 7, "pag sft --steps wins over model.sft_steps"
    shorter = load_config(preset="mini", overrides=["model.sft_steps=400"])
    some = [("a red circle", "a red circle, neon palette")]
    assert sft.train.sft_hash(mini, some, sft.train.settings_for(mini)) != \
        sft.train.sft_hash(shorter, some, sft.train.settings_for(shorter))
