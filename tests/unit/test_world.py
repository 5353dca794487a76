"""The miniature world keeps its rules: renders are reproducible, every style value shows, captions
round-trip, the shipped reader reads, taste has near-equal modes, the SFT corpus rarely hits one."""
from __future__ import annotations

import dataclasses
import json
from itertools import combinations

import numpy as np
import pytest
import torch

from world import captions, corpus, taste
from world.reader import WEIGHTS, load_reader, read
from world.reader_train import MANIFEST, evaluate, score_one, train
from world.rules import AXES, CANVAS, DEFECT_AXES, STYLE_AXES
from world.scenes import Content, Item, Style, make_scene, render, sample_scene

BASE = Style("white", "natural", "none", "flat", "offset", "flat")


def test_render_is_deterministic_for_a_seed():
    a = sample_scene(np.random.default_rng(5), defect_rate=0.5)
    b = sample_scene(np.random.default_rng(5), defect_rate=0.5)
    assert a == b
    pa, pb = render(a), render(b)
    assert pa.shape == (CANVAS, CANVAS, 3) and pa.dtype == np.uint8
    np.testing.assert_array_equal(pa, pb)
    grainy = dataclasses.replace(a, style=dataclasses.replace(a.style, texture="grain", clutter="cluttered"))
    np.testing.assert_array_equal(render(grainy), render(grainy))


def test_every_style_value_changes_the_picture():
    content = Content((Item("circle", "red", "large"), Item("square", "blue", "small")), "left of")
    scene = make_scene(content, BASE, np.random.default_rng(0))
    for axis, values in AXES.items():
        pictures = {}
        for value in values:
            style = dataclasses.replace(BASE, **{axis: value})
            s = make_scene(content, style, np.random.default_rng(0)) if axis == "composition" \
                else dataclasses.replace(scene, style=style)
            pictures[value] = render(s).astype(float)
        for u, v in combinations(values, 2):
            diff = np.abs(pictures[u] - pictures[v]).mean()
            assert diff > 1.0, f"{axis}: {u} and {v} look alike (mean |diff| {diff:.2f})"


def test_captions_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = sample_scene(rng, defect_rate=0.3)
        plain = captions.plain_caption(scene)
        assert captions.parse_content(plain) == scene.content
        text = captions.engineered_caption(scene, captions.style_phrases(scene.style, rng))
        back = captions.scene_from_caption(text, rng)
        assert (back.content, back.style) == (scene.content, scene.style), text


def test_modifiers_parse_last_mention_wins_and_no_effect_words_do_nothing():
    text = "a red circle, neon palette, 8k, pastel colors, dark background, blurry, masterpiece"
    assert captions.parse_modifiers(text) == {"palette": "pastel", "background": "dark", "blur": "blurry"}
    assert len(captions.NO_EFFECT) >= 20
    for word in captions.NO_EFFECT:
        assert captions.parse_modifiers(f"a red circle, {word}") == {}, word
    for phrases in (p for vals in captions.PHRASINGS.values() for p in vals.values()):
        assert 1 <= len(phrases) <= 3
    assert set(captions.PHRASINGS) == set(AXES)


def test_plain_prompt_gets_a_seeded_random_style_and_no_defect():
    styles = [captions.scene_from_caption("a red circle", np.random.default_rng(s)).style for s in range(40)]
    assert styles[0] == captions.scene_from_caption("a red circle", np.random.default_rng(0)).style
    for axis in STYLE_AXES:
        assert len({getattr(s, axis) for s in styles}) > 1, axis
    for axis, (off, _) in DEFECT_AXES.items():
        assert all(getattr(s, axis) == off for s in styles)


def test_a_caption_without_content_raises_naming_it():
    with pytest.raises(ValueError, match="a purple elephant"):
        captions.parse_content("a purple elephant, neon palette")


def test_shipped_reader_reads_fresh_scenes():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 1_000_000
    entry = json.loads(MANIFEST.read_text())[WEIGHTS.name]
    import hashlib
    assert entry["sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    rng = np.random.default_rng(777)
    acc = evaluate([sample_scene(rng, defect_rate=0.2) for _ in range(200)], load_reader())
    low = {k: v for k, v in acc.items() if v < 0.95}
    assert not low, f"reader below 95 %: {low} (all: {acc})"


def test_reader_reports_no_colour_on_monochrome():
    rng = np.random.default_rng(3)
    scene = make_scene(Content((Item("ring", "red", "large"),)), dataclasses.replace(BASE, palette="monochrome"), rng)
    (seen,) = read([render(scene)])
    assert seen.style.palette == "monochrome" and all(o.colour is None for o in seen.objects)
    assert all(score_one(scene, seen)[k] == [True] for k in ("count", "shape", "size"))


def test_reader_training_runs_two_steps_and_is_seeded():
    a = train(n_scenes=16, steps=2, batch=8, seed=0, log_every=1)
    b = train(n_scenes=16, steps=2, batch=8, seed=0, log_every=1)
    assert not a.training
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_taste_has_near_equal_modes_above_everything_else():
    assert len(taste.MODES) >= 4
    for mode, values in taste.MODES.items():
        assert 2 <= len(values) <= 3
    scores = {s: taste.taste(s) for s in taste.all_styles()}
    peaks = {taste.mode_of(s): v for s, v in scores.items() if taste.mode_of(s) is not None}
    assert set(peaks) == set(taste.MODES)
    assert max(peaks.values()) - min(peaks.values()) <= 0.03
    complete = lambda s: any(taste.matched(s, m) == len(v) for m, v in taste.MODES.items())  # noqa: E731
    assert max(v for s, v in scores.items() if not complete(s)) < min(peaks.values()) - 0.3
    for s, v in scores.items():
        assert 0.0 <= v <= 1.0
        if taste.mode_of(s) is not None:
            assert v == peaks[taste.mode_of(s)]


def test_harmful_values_lower_taste_and_leave_the_mode():
    for values in taste.MODES.values():
        style = dataclasses.replace(BASE, **values)
        for axis, value in taste.HARM:
            if getattr(style, axis) == value or axis in values:
                continue
            worse = dataclasses.replace(style, **{axis: value})
            assert taste.taste(worse) < taste.taste(style) - 0.1
            assert taste.mode_of(worse) is None


def test_tension_mode_removes_colour():
    assert taste.MODES[taste.TENSION_MODE]["palette"] == "monochrome"


def test_corpus_rarely_completes_a_mode_and_splits_like_the_loader(tmp_path):
    from common.data import in_eval_split, load_prompts

    built = corpus.build(n_prompts=600, rewrites_per_prompt=2, seed=0)
    assert corpus.mode_hit_rate([e for _, e in built.pairs]) < 0.05
    # ...but the copied looks bring many within one value of a mode: the partial recipes RL builds on
    two = [corpus.closest_mode(e) == 2 for _, e in built.pairs]
    assert 0.25 < sum(two) / len(two) < 0.5
    assert all(not in_eval_split(p) for p in built.train) and all(in_eval_split(p) for p in built.heldout)
    counts = [len(e.split(", ")) - len(p.split(", ")) for p, e in built.pairs]
    assert min(counts) >= 2 and max(counts) <= 6
    assert corpus.completes_mode("a red circle, neon palette, night scene, bloom")
    train_file, heldout_file, _ = corpus.write(built, tmp_path)
    assert load_prompts(train_file, "train").prompts == built.train
    assert load_prompts(heldout_file, "eval").prompts == built.heldout


def test_coverage_counts_modes_named_over_a_runs_course(tmp_path):
    from world import coverage

    rows = [("a red circle, 8k, masterpiece", -1.0), ("a red circle, neon palette, dark background", 0.5),
            ("a red circle, neon palette, dark background, soft glow", 2.0),
            ("a red circle, monochrome, thick outline, spotlight, blurry", 1.0)]
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps({"response": r, "log_reward": lr, "created_at": i, "id": str(i)}) + "\n"
                              for i, (r, lr) in reversed(list(enumerate(rows)))))  # out of order on disk
    first, second = coverage.coverage(coverage.read_export(export), parts=2)
    assert (first["complete"], first["within_one"], first["mean_log_reward"]) == (0.0, 0.5, -0.25)
    assert second["complete"] == 1.0 and second["harmful"] == 0.5
    assert second["complete_by_mode"]["neon night"] == second["complete_by_mode"]["ink noir"] == 0.5
    export.write_text('{"response": "a red circle"}\n')
    with pytest.raises(ValueError, match=r"export.jsonl:1: .*log_reward"):
        coverage.read_export(export)
