"""eval/metrics.py and eval/spec.py: the maths of the table and the --methods parser (no models)."""
import math
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError
from eval.metrics import diversity, mean_ci, prompt_metrics, rewrite_scores, summarize
from eval.spec import MethodSpecError, parse_methods


def test_identical_rows_have_zero_diversity():
    row = np.random.default_rng(0).normal(size=8)
    assert diversity(np.stack([row] * 4)) == pytest.approx(0.0, abs=1e-12)
    assert diversity(np.stack([row * 3.0, row])) == pytest.approx(0.0, abs=1e-12)  # scale does not matter


def test_orthogonal_rows_have_diversity_one_and_single_row_zero():
    assert diversity(np.eye(5)) == pytest.approx(1.0)
    assert diversity(np.eye(5)[:1]) == 0.0


def test_diversity_is_one_minus_mean_pairwise_cosine_brute_force():
    e = np.random.default_rng(1).normal(size=(6, 4))
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for i, a in enumerate(e) for j, b in enumerate(e) if i != j]
    assert diversity(e) == pytest.approx(1 - np.mean(cos))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        diversity(np.zeros(3))


def test_mean_ci_normal_approximation():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, half = mean_ci(values)
    assert mean == 2.5 and half == pytest.approx(1.959964 * np.std(values, ddof=1) / 2, rel=1e-5)
    assert mean_ci([5.0]) == (5.0, 0.0)
    assert all(math.isnan(x) for x in mean_ci([float("nan")]))


def test_plain_against_itself_has_gain_zero_and_hinge_per_image():
    plain = {"aes": [5.0, 6.0, 7.0], "clip": [0.25, 0.30, 0.31]}
    s = rewrite_scores(plain, plain, threshold=0.28, weight=20.0)
    assert s["aes_gain"] == 0.0
    assert s["rel"] == pytest.approx(20 * (0.25 - 0.28) / 3)  # hinge per image, then the mean
    assert s["reward"] == pytest.approx(s["rel"])
    better = {"aes": [6.0, 7.0, 8.0], "clip": [0.3, 0.3, 0.3], "extra": {"imagereward": [0.1, 0.2, 0.3]}}
    s = rewrite_scores(plain, better, 0.28, 20.0)
    assert (s["aes_gain"], s["rel"], s["reward"]) == (pytest.approx(1.0), 0.0, pytest.approx(1.0))
    assert s["imagereward"] == pytest.approx(0.2) and "imagereward_gain" not in s  # the baseline has no score
    s = rewrite_scores({**plain, "extra": {"imagereward": [-0.4, -0.2, 0.0]}}, better, 0.28, 20.0)
    assert s["imagereward_gain"] == pytest.approx(0.2 - (-0.2))  # official eval.py:193-212: a gain over the baseline


def test_reward_metric_imagereward_puts_its_gain_in_the_reward():
    plain = {"aes": [5.0, 6.0, 7.0], "clip": [0.25, 0.30, 0.31], "extra": {"imagereward": [-0.4, -0.2, 0.0]}}
    better = {"aes": [6.0, 7.0, 8.0], "clip": [0.3, 0.3, 0.3], "extra": {"imagereward": [0.1, 0.2, 0.3]}}
    s = rewrite_scores(plain, better, 0.28, 20.0, metric="imagereward")
    assert s["reward"] == pytest.approx(0.4 + s["rel"]) and s["aes_gain"] == pytest.approx(1.0)  # the gain, not aes
    worse = {"aes": [6.0, 7.0, 8.0], "clip": [0.25, 0.25, 0.25], "extra": {"imagereward": [-1.0, -1.0, -1.0]}}
    s = rewrite_scores(plain, worse, 0.28, 20.0, metric="imagereward")
    assert s["reward"] == pytest.approx(-1.0 - (-0.2) + 20 * (0.25 - 0.28))
    assert math.isnan(rewrite_scores({**plain, "extra": {}}, better, 0.28, 20.0, metric="imagereward")["reward"])
    assert rewrite_scores(plain, better, 0.28, 20.0)["reward"] == pytest.approx(1.0)  # the default: aesthetic


def test_prompt_metrics_and_summary():
    rows = [{"reward": 1.0, "aes_gain": 1.0}, {"reward": 3.0, "aes_gain": 2.0}]
    m = prompt_metrics(rows, np.stack([np.ones(3)] * 2), np.eye(4))
    assert m["reward"] == 2.0 and m["aes_gain"] == 1.5 and m["text_diversity"] == pytest.approx(0.0)
    assert m["image_diversity"] == pytest.approx(1.0)
    summary = summarize([m, dict(m, reward=4.0)])
    assert summary["reward"]["mean"] == 3.0 and summary["reward"]["n"] == 2
    with_nan = summarize([m, dict(m, reward=4.0), dict(m, reward=float("nan"))])  # a prompt whose renders failed
    assert with_nan["reward"] == summary["reward"] and with_nan["aes_gain"]["n"] == 3


@pytest.mark.parametrize("text, needle", [
    ("plain,bogus", "unknown method 'bogus'"),
    ("plain,,rule", "empty entry"),
    ("plain:foo", "plain takes no path"),
    ("pag:/nonexistent/run", "/nonexistent/run does not exist"),
    ("promptist", "promptist needs the directory"),
    ("plain,plain", "used twice"),
    ("9x:runs", "not a method name"),
])
def test_bad_method_specs_name_the_entry(text, needle):
    with pytest.raises(MethodSpecError, match=needle) as info:
        parse_methods(text)
    assert isinstance(info.value, ConfigError)  # `pag` turns it into exit code 2


def test_run_without_checkpoint_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("preset: tiny\n")
    with pytest.raises(MethodSpecError, match="has no complete checkpoint"):
        parse_methods(f"pag:{tmp_path / 'run'}")
    specs = parse_methods("plain,rule,sft")
    assert [(s.label, s.kind) for s in specs] == [("plain", "plain"), ("rule", "rule"), ("sft", "sft")]


def test_paper_reference_only_on_sd14():
    from common.config import load_config
    from eval.paper import paper_table, published

    assert published(load_config("tiny")) is None
    ref = published(load_config("sd14"))
    assert ref is not None and paper_table(ref)[0].startswith("## The paper's published numbers")
    table = paper_table({"source": "x", "table": {"pag": {"lexica": {"reward": 1.5}}}})
    assert "| pag | lexica | 1.5 |" in table
    assert "| pag | coco | 0.32 | 0.88 |" in paper_table(ref)
    assert "| ppo | 4 sets (mean) | 0.02 | 0.7 |" in paper_table(ref)


def test_published_numbers_are_the_shipped_markdown_cell_for_cell():
    """eval/paper.py's PUBLISHED against docs/paper-numbers.md's two tables, row by row (no number typed twice
    without a check)."""
    from eval.paper import ALL_SETS, METHOD_LABELS, PUBLISHED

    text = (Path(__file__).resolve().parents[2] / "docs" / "paper-numbers.md").read_text()
    seen = 0
    for section, set_name in (("## Main comparison", ALL_SETS), ("## Ablation on COCO", "coco")):
        body = text[text.index(section):].split("\n## ")[0]
        for line in body.splitlines()[3:]:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 3 or not cells[1][:1].isdigit():
                continue
            label = METHOD_LABELS[cells[0]]
            assert PUBLISHED["table"][label][set_name] == {"reward": float(cells[1]), "diversity": float(cells[2])}
            seen += 1
    assert seen == 9 == sum(len(per_set) for per_set in PUBLISHED["table"].values())


def test_text_encoder_falls_back_to_the_packaged_minilm_only_when_asked_and_says_so():
    from common.config import load_config
    from common.models import ModelLoadError
    from eval.runner import build_text_encoder

    missing = "model.sentence_encoder=/nonexistent/paraphrase-MiniLM-L6-v2"
    with pytest.raises(ModelLoadError, match="(?s)paraphrase-MiniLM-L6-v2.*eval.text_encoder_fallback=true"):
        build_text_encoder(load_config("tiny", overrides=[missing]))
    cfg = load_config("tiny", overrides=[missing, "eval.text_encoder_fallback=true"])
    encoder, name = build_text_encoder(cfg)
    assert "all-MiniLM-L6-v2" in name
    emb = encoder.encode(["a red car", "a red car"])
    assert diversity(emb) == pytest.approx(0.0, abs=1e-6)


def test_user_prompt_files_are_sets_named_by_their_stem(tmp_path):
    from common.config import ConfigError, load_config
    from eval.runner import load_sets

    (tmp_path / "mine.txt").write_text("a red car\na blue boat\na red car\n")
    cfg = load_config("tiny", overrides=[f"eval.datasets=[{tmp_path / 'mine.txt'},chatgpt]", "eval.limit=3"])
    sets = load_sets(cfg)
    assert sets["mine"] == ["a red car", "a blue boat", "a red car"]  # as written: duplicates kept
    assert len(sets["chatgpt"]) == 3
    bad = load_config("tiny", overrides=["eval.datasets=[nosuchset]"])
    with pytest.raises(ConfigError, match="eval.datasets"):
        load_sets(bad)


def test_eval_takes_its_preset_from_the_runs_and_refuses_a_mix(tmp_path, monkeypatch):
    from common.config import ConfigError
    from eval.cli import eval_preset
    from eval.spec import MethodSpec

    for name, preset in (("a", "mini"), ("b", "mini"), ("c", "tiny")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"preset: {preset}\n")
    spec = {n: MethodSpec(n, "policy", str(tmp_path / n), str(tmp_path / n), f"{n}:{tmp_path / n}") for n in "abc"}
    monkeypatch.setenv("PAG_PRESET", "tiny")
    assert eval_preset(None, [MethodSpec("plain", "plain"), spec["a"], spec["b"]]) == "mini"
    assert eval_preset("mini", [spec["a"]]) == "mini"
    assert eval_preset(None, [MethodSpec("plain", "plain")]) == "tiny"  # no runs: $PAG_PRESET
    assert eval_preset("sd14", [MethodSpec("plain", "plain")]) == "sd14"
    with pytest.raises(ConfigError, match=r"mixes presets: a:.* \(mini\), c:.* \(tiny\)"):
        eval_preset(None, [spec["a"], spec["c"]])
    with pytest.raises(ConfigError, match="and --preset sd14.*drop --preset"):
        eval_preset("sd14", [spec["a"]])
