"""bench/world.py, the world models' quality gates: its scoring passes a perfect generator (the
renderer itself), and the whole bench runs end to end on a tiny untrained build, reporting its
failing gates in JSON rather than by exit code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import world as bench
from world.captions import scene_from_caption
from world.reader import WEIGHTS
from world.scenes import Content, Item, Style, render

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file() or not (bench.wm.ASSETS / bench.HELDOUT).is_file(),
                                reason="needs the shipped reader and held-out captions (world/assets)")


def _render_captions(pipe, captions, seed, **_):
    """A perfect 'generator': the world's own picture of each caption."""
    rng = np.random.default_rng(seed)
    return np.stack([render(scene_from_caption(c, rng)) for c in captions])


def test_match_content_pairs_objects_by_what_they_look_like():
    from world.reader import Attributes, SeenObject

    style = Style("white", "natural", "none", "flat", "offset", "flat")
    content = Content((Item("circle", "red", "large"), Item("square", "blue", "small")), "left of")
    seen = Attributes((SeenObject("square", "blue", "small", 20.0, 16.0), SeenObject("circle", "red", "large", 8.0, 16.0)),
                      style)
    assert bench.match_content(content, seen) == {"count": [True], "shape": [True, True], "size": [True, True],
                                                  "colour": [True, True], "relation": [True]}
    missed = Attributes(seen.objects[:1], style)  # only the square was drawn
    out = bench.match_content(content, missed)
    assert out["count"] == [False] and out["shape"] == [False, True] and out["relation"] == [False]


def test_a_perfect_generator_passes_the_faithfulness_and_style_gates(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(bench.wb, "generate", _render_captions)
    captions = bench.heldout_captions(bench.wm.ASSETS)
    faith = bench.faithfulness_figure(None, captions, 64, bench.DEFAULT_SEED)
    assert faith["attribute_accuracy"] >= 0.9, faith
    words = bench.style_words_figure(None, captions, 24 * 4, bench.DEFAULT_SEED)
    assert words["k"] == 4 and len(words["by_value"]) == 24
    assert np.mean(list(words["by_value"].values())) >= 0.9 and words["worst"]["accuracy"] >= 0.5, words


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    from world import build

    out = tmp_path_factory.mktemp("world_build")
    assert build.main(["--scale", "0.003", "--out", str(out), "--threads", "1"]) == 0  # ~25 s on 2 cores
    return out


def test_the_bench_runs_end_to_end_on_a_smoke_build(smoke_build, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "GRID_SEEDS", 1)
    grid = tmp_path / "grid.png"
    assert bench.main(["--assets", str(smoke_build), "--n", "8", "--grid", str(grid), "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["figures"]) == {"vae", "clip", "faithfulness", "style_words", "aesthetic", "grid"}
    assert set(report["gates"]) == set(bench.THRESHOLDS)
    for gate in report["gates"].values():
        assert set(gate) == {"value", "threshold", "pass"} and isinstance(gate["pass"], bool)
    assert report["all_pass"] == all(g["pass"] for g in report["gates"].values())
    assert report["all_pass"] is False  # an untrained build fails its gates, and says so in JSON
    assert report["figures"]["clip"]["group_size"] == bench.GROUP and report["figures"]["vae"]["psnr_db"] > 0
    assert report["figures"]["style_words"]["k"] == 1 and len(report["figures"]["style_words"]["by_value"]) == 24
    from PIL import Image

    with Image.open(grid) as picture:
        assert picture.size == (bench.GRID_LABEL + bench.GRID_TILE + 4, 18 * (bench.GRID_TILE + 4))


def _manifest_mismatches(root) -> list[str]:
    import hashlib

    manifest = json.loads((root / "MANIFEST.json").read_text())
    bad = []
    for rel, entry in manifest.items():
        if rel.startswith("_"):
            continue
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            bad.append(f"{rel}: sha256 differs from the manifest")
    return bad


def test_each_training_stage_runs_and_the_manifest_names_every_file_it_wrote(smoke_build):
    """The smoke build ran vae, clip, unet, sight and aesthetic a few steps each (`--scale 0.003`)."""
    manifest = json.loads((smoke_build / "MANIFEST.json").read_text())
    assert set(manifest["_build"]) == {"vae", "clip", "unet", "sight", "aesthetic"}
    for figures in manifest["_build"].values():
        assert np.isfinite(figures["final_loss"]) and figures["steps"] >= 2, figures
    written = {p.relative_to(smoke_build).as_posix() for p in smoke_build.rglob("*") if p.is_file()}
    assert written - {"MANIFEST.json"} == {k for k in manifest if not k.startswith("_")}
    assert {"sd/model_index.json", "sd/unet/config.json", "clip/config.json", "aesthetic.safetensors"} <= written
    assert _manifest_mismatches(smoke_build) == []
    weights = smoke_build / "aesthetic.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(b"changed")
        assert _manifest_mismatches(smoke_build) == ["aesthetic.safetensors: sha256 differs from the manifest"]
    finally:
        weights.write_bytes(original)


def test_the_shipped_world_weights_match_their_manifest():
    assert (bench.wm.SD_DIR / "model_index.json").is_file() and bench.wm.AESTHETIC.is_file()
    assert _manifest_mismatches(bench.wm.ASSETS) == []


def test_resuming_the_unet_goes_on_from_the_built_one(smoke_build, tmp_path, monkeypatch):
    """`--resume-unet` starts from the UNet under --out and saves its moving average (here of decay 0.5,
    so that three steps show through the float16 files)."""
    import shutil

    from world import build
    from world.weights import load_pipeline

    monkeypatch.setattr(build, "EMA_DECAY", 0.5)
    out = tmp_path / "resumed"
    shutil.copytree(smoke_build, out)
    before = load_pipeline(out).unet.state_dict()
    # --scale renders as few pictures as the smoke build (at 1.0 the stage renders 24,000: 110 s);
    # 1000 x 0.003 = 3 steps
    assert build.main(["--only", "unet", "--resume-unet", "--steps", "unet=1000", "--scale", "0.003", "--out", str(out),
                       "--threads", "1"]) == 0
    after = load_pipeline(out).unet.state_dict()
    moved = max((after[k].float() - before[k].float()).abs().max().item() for k in before)
    assert 0 < moved < 1e-2  # three Adam steps of at most 2e-4 each: a continuation, not a fresh UNet
    for config in out.rglob("config.json"):  # a loaded-then-saved model would ship this machine's path
        assert "_name_or_path" not in json.loads(config.read_text()), config
    figures = json.loads((out / "MANIFEST.json").read_text())["_build"]["unet"]
    assert figures["resumed"] is True and figures["steps"] == 3 and figures["lr"] == build.LR["unet"] / 2


def test_the_sight_stage_moves_the_image_tower_and_leaves_the_text_tower(smoke_build, tmp_path):
    """`--only sight` retrains the CLIP's image tower; its text tower -- the pipeline's text encoder, which the UNet
    was trained on -- must come out bit for bit the same, and sd/ is not rewritten."""
    import shutil

    from world import build
    from world.rules import AXES
    from world.weights import load_clip

    out = tmp_path / "sighted"
    shutil.copytree(smoke_build, out)
    before = load_clip(out).state_dict()
    sd_before = {p: p.read_bytes() for p in (out / "sd").rglob("*") if p.is_file()}
    assert build.main(["--only", "sight", "--scale", "0.003", "--out", str(out), "--threads", "1"]) == 0
    after = load_clip(out).state_dict()
    text = [k for k in before if k.startswith(("text_model.", "text_projection.")) or k == "logit_scale"]
    vision = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    assert text and vision and len(text) + len(vision) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in text)
    assert sum(not torch.equal(before[k], after[k]) for k in vision) > len(vision) // 2
    assert {p: p.read_bytes() for p in (out / "sd").rglob("*") if p.is_file()} == sd_before
    figures = json.loads((out / "MANIFEST.json").read_text())["_build"]["sight"]
    assert set(figures["heldout_head_accuracy"]) == set(AXES) and figures["generated"] == 64
    assert all(0 <= a <= 1 for a in figures["heldout_head_accuracy"].values()) and np.isfinite(figures["final_loss"])


def test_the_style_loss_scores_each_axis_by_its_own_softmax():
    from world.rules import AXES
    from world.scenes import Style
    from world.sight import HEAD_SCALE, style_labels, style_loss

    styles = [Style(**{a: v[i % len(v)] for a, v in AXES.items()}) for i in range(3)]
    labels = style_labels(styles)
    assert labels[1].tolist() == [1 % len(v) for v in AXES.values()]
    width = sum(len(v) for v in AXES.values())
    head = torch.nn.Linear(width, width, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(width) * 100 / HEAD_SCALE)  # logits = 100 x the one-hot of each axis's value
    onehots = torch.zeros(3, width)
    starts = np.cumsum([0] + [len(v) for v in AXES.values()])[:-1]
    for row, lab in enumerate(labels):
        onehots[row, torch.as_tensor(starts) + lab] = 1
    assert style_loss(head, onehots, labels).item() < 1e-6
    wrong = labels.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % len(next(iter(AXES.values())))  # one axis of eight wrong: 100 nats / 8
    assert style_loss(head, onehots, wrong).item() == pytest.approx(100 / len(AXES), rel=1e-3)


def test_stage_steps_names_the_bad_part():
    from world import build

    assert build._stage_steps("unet=6000, aesthetic=20") == {"unet": 6000, "aesthetic": 20}
    assert build._stage_steps("") == {}
    for bad in ("unet", "unet=0", "decoder=5", "unet=5k"):
        with pytest.raises(ValueError, match=repr(bad)):
            build._stage_steps(bad)
    assert build.main(["--steps", "unet=five", "--only", "unet"]) == 2


def test_the_moving_average_moves_a_thousandth_of_the_way_each_step():
    from world.build import _ema

    live = torch.nn.Linear(2, 2)
    shadow, update = _ema(live, 0.999)
    start = shadow.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    update()
    assert torch.allclose(shadow.weight, start + 0.001, atol=1e-6)
    assert not shadow.weight.requires_grad


def test_world_aesthetic_bench_counts_what_the_mlp_computes():
    """bench/world_aesthetic.py re-walks the MLP's layers to read its hidden units: the scores it reports are
    the MLP's own, and a unit no input switches on is counted dead."""
    from bench import world_aesthetic
    from common.clip import AestheticMLP

    torch.manual_seed(0)
    mlp = AestheticMLP(8, relu=True).eval()
    with torch.no_grad():
        mlp.layers[0].bias[:5] = -100.0  # five first-layer units that nothing activates
    emb = torch.nn.functional.normalize(torch.randn(32, 8), dim=-1)
    acts, out = world_aesthetic.hidden_activity(mlp, emb)
    assert np.allclose(out, mlp(emb).detach().numpy(), atol=1e-6)
    assert [a.shape[1] for a in acts] == [1024, 128, 64, 16]
    assert int((acts[0].max(0).values <= 0).sum()) >= 5


def test_world_aesthetic_style_probe_reads_an_axis_the_embedding_carries_and_not_one_it_does_not():
    from bench import world_aesthetic

    gen = torch.Generator().manual_seed(0)
    carried = ["dark" if i % 3 == 0 else "white" for i in range(400)]  # one embedding direction says which
    emb = torch.randn(400, 200, generator=gen) * 0.05  # wide enough to fit noise: only held-out pictures tell
    emb[:, 0] += torch.tensor([1.0 if v == "dark" else -1.0 for v in carried])
    noise = ["thin" if bool(b) else "thick" for b in torch.randint(2, (400,), generator=gen)]  # nothing carries it
    probe = world_aesthetic.style_probe(emb, {"background": carried, "outline": noise})
    assert probe["background"]["probe_accuracy"] == 1.0
    assert probe["background"]["majority"] == round(sum(v == "white" for v in carried[:50]) / 50, 3)
    assert probe["outline"]["probe_accuracy"] <= probe["outline"]["majority"] + 0.1, "no better than guessing"


def test_world_aesthetic_style_probe_guesses_the_commonest_value_when_nothing_is_carried():
    """A rare value the embedding says nothing about: the probe should fall back to the common one (a probe fit to
    centred targets would call half the pictures by the rare value and score far below the majority)."""
    from bench import world_aesthetic

    gen = torch.Generator().manual_seed(1)
    rare = ["blurry" if bool(b) else "sharp" for b in torch.rand(800, generator=gen) < 0.15]
    probe = world_aesthetic.style_probe(torch.randn(800, 8, generator=gen), {"blur": rare})
    assert probe["blur"]["probe_accuracy"] >= probe["blur"]["majority"] - 0.05
