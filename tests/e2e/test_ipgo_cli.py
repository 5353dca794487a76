"""`pag ipgo` end to end on tiny (in-process, no Ray): outputs, results.jsonl, resume, prompt-batch."""
from __future__ import annotations

import json
import math

import pytest

from pag.cli import main


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prompt_wise_outputs_and_resume(tmp_path, capsys):
    argv = ["ipgo", "a red car", "a cat on a sofa", "--no-ray", "--iterations", "3", "--runs-dir", str(tmp_path),
            "--run-name", "pw"]
    assert main(argv) == 0
    run = tmp_path / "pw"
    lines = _lines(run / "results.jsonl")
    assert [line["prompt"] for line in lines] == ["a red car", "a cat on a sofa"]
    for line in lines:
        assert line["iterations"] == 3 and math.isfinite(line["initial_reward"])
        out = run / "prompts" / line["dir"]
        for name in ("tokens.safetensors", "best.png", "initial.png", "curve.json", "result.json"):
            assert (out / name).is_file(), name
        curve = json.loads((out / "curve.json").read_text())["reward"]
        assert len(curve) == 3  # the best iterate is the curve's maximum, where it was reached
        assert line["best_reward"] == pytest.approx(max(curve)) and line["best_iteration"] == curve.index(max(curve))
    from ipgo.jobs import load_tokens

    tokens = load_tokens(run / "prompts" / lines[0]["dir"] / "tokens.safetensors")
    assert tokens["prefix"].shape == (10, 32)
    # an interrupted run: one prompt's result is gone; the rerun does only that one
    (run / "prompts" / lines[1]["dir"] / "result.json").unlink()
    (run / "results.jsonl").write_text(json.dumps(lines[0]) + "\n")
    mtime = (run / "prompts" / lines[0]["dir"] / "result.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (run / "prompts" / lines[0]["dir"] / "result.json").stat().st_mtime_ns == mtime
    assert [line["prompt"] for line in _lines(run / "results.jsonl")] == ["a red car", "a cat on a sofa"]
    assert "mean reward gain" in capsys.readouterr().out


def test_resume_with_another_config_is_refused(tmp_path):
    argv = ["ipgo", "a red car", "--no-ray", "--iterations", "1", "--runs-dir", str(tmp_path), "--run-name", "x"]
    assert main(argv) == 0
    assert main([argv[0], argv[1], "ipgo.lr=0.5", *argv[2:]]) == 2  # ConfigError → exit 2, nothing overwritten


def test_prompts_or_dataset_not_both(tmp_path):
    assert main(["ipgo", "--no-ray", "--runs-dir", str(tmp_path)]) == 2


def test_prompt_batch_trains_once_and_applies_to_held_out(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(8)))
    argv = ["ipgo", "ipgo.heldout_fraction=0.4", "--dataset", str(prompts), "--mode", "prompt-batch", "--epochs", "1",
            "--no-ray", "--runs-dir", str(tmp_path), "--run-name", "pb"]
    assert main(argv) == 0
    run = tmp_path / "pb"
    summary = json.loads((run / "batch" / "result.json").read_text())
    from ipgo.batch_run import split

    train, held = split(prompts.read_text().splitlines(), 0.4)
    assert summary["train_prompts"] == len(train) and train and held
    lines = _lines(run / "results.jsonl")
    assert sorted(line["prompt"] for line in lines) == sorted(held) and all(line["heldout"] for line in lines)
    assert all(line["heldout_seeds"] == [42, 43, 44] for line in lines)  # eval.images.seed upward, not ipgo.seed 0
    assert all(line["heldout_seed_best_reward"] != line["best_reward"] for line in lines), "other noise, other pictures"
    assert (run / "batch" / "tokens.safetensors").is_file()


def test_prompt_batch_uses_the_notebooks_batch_schedule_and_the_notebook_preset_resolves():
    """The notebook's prompt-batch cell: StepLR(15, 0.95); its prompt-wise cell: StepLR(10, 0.9)."""
    from common.config import load_config
    from ipgo.optimize import _Trainer, build_models

    models = build_models(load_config("tiny", overrides=["run.device=cpu"]))
    for batch, expected in ((True, (15, 0.95)), (False, (10, 0.9))):
        sched = _Trainer(models, batch=batch).sched
        assert (sched.step_size, sched.gamma) == expected
    nb = load_config("ipgo-notebook")
    assert (nb.model.sd, nb.ipgo.layout, nb.ipgo.bound) == ("sd-legacy/stable-diffusion-v1-5", "nopad", "clamp")


@pytest.mark.ray
def test_prompt_wise_fans_out_as_ray_tasks(ray_local, tmp_path):
    from common.config import load_config
    from ipgo.cli import run_prompt_wise

    cfg = load_config("tiny", overrides=["ipgo.iterations=2", "run.device=cpu"])
    prompts = ["a red car", "a cat on a sofa", "a bowl of fruit"]
    lines = run_prompt_wise(cfg, prompts, tmp_path / "ray", use_ray=True)
    assert [line["prompt"] for line in lines] == prompts
    assert sorted(_lines(tmp_path / "ray" / "results.jsonl"), key=lambda l: l["index"]) == lines
