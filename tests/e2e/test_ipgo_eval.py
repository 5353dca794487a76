"""IPGO in `pag eval`: the method yields conditioning (77 × d with a matching negative), reuses a run's
tokens, applies prompt-batch tokens to any prompt, and `pag eval --methods plain,ipgo` reports it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pag.cli import main
from common.config import load_config
from eval.methods.ipgo import build
from eval.spec import MethodSpec, MethodSpecError, parse_methods

ROOT = Path(__file__).resolve().parents[2]


def test_labels_starting_with_ipgo_are_the_ipgo_method(tmp_path):
    specs = parse_methods(f"ipgo,ipgo-batch:{tmp_path}")
    assert [(s.label, s.kind, s.path) for s in specs] == [("ipgo", "ipgo", None), ("ipgo-batch", "ipgo", str(tmp_path))]
    with pytest.raises(MethodSpecError, match="not a `pag ipgo` run"):
        build(specs[1], load_config("tiny"))


def test_prompt_wise_conditioning_and_reuse(tmp_path):
    cfg = load_config("tiny", overrides=["ipgo.iterations=2", f"run.runs_dir={tmp_path}"])
    method = build(MethodSpec("ipgo", "ipgo", None, raw="ipgo"), cfg)
    out = method.rewrite(["a red car", "a bowl of fruit"], n=4)
    assert [o.prompt for o in out] == ["a red car", "a bowl of fruit"]
    rewrite = out[0].rewrites[0]
    assert len(out[0].rewrites) == 1 and rewrite.text == "a red car"
    c = rewrite.conditioning
    assert c.prompt_embeds.shape == (77, 32) and c.negative_prompt_embeds.shape == (77, 32)
    assert c.prompt_embeds.dtype == np.float32 and rewrite.render_key().startswith("embeds:")
    run = method.run_dir
    lines = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()]
    assert [l["prompt"] for l in lines] == ["a red car", "a bowl of fruit"]
    stamp = (run / "prompts" / lines[0]["dir"] / "result.json").stat().st_mtime_ns
    again = build(MethodSpec("ipgo", "ipgo", None, raw="ipgo"), cfg).rewrite(["a red car", "a new prompt"], n=4)
    assert (run / "prompts" / lines[0]["dir"] / "result.json").stat().st_mtime_ns == stamp  # reused, not re-optimised
    assert np.array_equal(again[0].rewrites[0].conditioning.prompt_embeds, c.prompt_embeds)
    assert len((run / "results.jsonl").read_text().splitlines()) == 3
    info = out[0].info  # IPGO's own reward on its training noise and on held-out seeds, and its cost
    assert info["heldout_seeds"] == [42, 43, 44] and cfg.ipgo.seed not in info["heldout_seeds"]
    assert info["train_reward"] == pytest.approx(lines[0]["best_reward"], rel=1e-4, abs=1e-5)  # the chosen iterate, re-rendered
    assert info["train_plain"] == pytest.approx(lines[0]["initial_reward"], rel=1e-4, abs=1e-5)
    assert info["heldout_reward"] != info["train_reward"] and info["heldout_plain"] != info["train_plain"]
    assert info["heldout_gain"] == pytest.approx(info["heldout_reward"] - info["heldout_plain"])
    assert info["seconds"] == lines[0]["seconds"] > 0 and info["device"] == "CPU" and "peak_mib" not in info


def test_ipgo_report_section(tmp_path):
    from eval.ipgo_report import collect, heldout_seeds, markdown
    from eval.methods.base import MethodOutput

    assert heldout_seeds(0, 3, 1) == [0, 2, 3] and heldout_seeds(42, 2, 0) == [42, 43]
    cfg = load_config("tiny", overrides=["ipgo.iterations=2", f"run.runs_dir={tmp_path}", "eval.images.per_prompt=2"])
    out = build(MethodSpec("ipgo", "ipgo", None, raw="ipgo"), cfg).rewrite(["a red car", "a bowl of fruit"], n=1)
    outputs = {"plain": {"lexica": [MethodOutput(o.prompt) for o in out]}, "ipgo": {"lexica": out}}
    ipgo = collect(outputs)
    assert set(ipgo) == {"ipgo"}  # only methods that measured it
    cell = ipgo["ipgo"]["lexica"]
    assert cell["prompts"] == 2 and cell["device"] == "CPU" and cell["heldout_seeds"] == [42, 43]
    for key in ("train_reward", "train_gain", "heldout_reward", "heldout_gain", "seconds"):
        assert cell[key]["n"] == 2 and np.isfinite(cell[key]["mean"])
    assert cell["train_reward"]["mean"] == pytest.approx(np.mean([o.info["train_reward"] for o in out]))
    table = {"ipgo": {"lexica": {"aes_gain": {"mean": 0.25, "ci95": 0.5, "n": 2}}}}
    md = "\n".join(markdown({"ipgo": ipgo, "table": table}, ["hps"]))
    assert "## IPGO: training noise against held-out seeds" in md
    assert "reward, training noise" in md and "reward, held-out seeds" in md and "cost s/prompt" in md
    row = next(l for l in md.splitlines() if l.startswith("| ipgo | lexica"))
    assert f"{cell['heldout_reward']['mean']:.3f}" in row and "0.250 ± 0.500" in row and " CPU (prompt-wise)" in row
    assert row.count("|") == md.splitlines()[4].count("|")  # as many cells as headers
    assert markdown({"table": {}}, []) == []


def test_prompt_batch_run_applies_to_any_prompt(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(6)))
    assert main(["ipgo", "--dataset", str(prompts), "--mode", "prompt-batch", "--epochs", "1", "--no-ray",
                 "--runs-dir", str(tmp_path), "--run-name", "pb"]) == 0
    method = build(MethodSpec("ipgo-batch", "ipgo", str(tmp_path / "pb"), raw="x"), load_config("tiny"))
    out = method.rewrite(["a purple elephant", "a red car"], n=1)
    a, b = (o.rewrites[0].conditioning.prompt_embeds for o in out)
    assert np.allclose(a[:10], b[:10]) and np.allclose(a[-10:], b[-10:])  # the same learned prefix and suffix
    assert not np.allclose(a[10:-10], b[10:-10])  # around each prompt's own states
    summary = json.loads((tmp_path / "pb" / "batch" / "result.json").read_text())
    info = out[0].info  # one training's cost shared by its training prompts
    assert info["cost_basis"] == f"prompt-batch / {summary['train_prompts']} prompts"
    assert info["seconds"] == pytest.approx(summary["seconds"] / summary["train_prompts"])


@pytest.mark.slow
def test_pag_eval_with_ipgo(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pag.cli", "eval", "--methods", "plain,ipgo", "--limit", "1",
                           "--rewrites", "2", "--datasets", "lexica", "--no-progress", "--name", "i",
                           "--runs-dir", str(tmp_path), "ipgo.iterations=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval-i" / "results.json").read_text())
    assert set(results["table"]) == {"plain", "ipgo"}
    cell = results["table"]["ipgo"]["lexica"]
    assert cell["reward"]["n"] == 1 and np.isfinite(cell["reward"]["mean"]) and np.isfinite(cell["aes_gain"]["mean"])
    assert cell["aes_gain"]["mean"] != 0.0  # rendered from the injected tokens, not the plain text
    ipgo = results["ipgo"]["ipgo"]["lexica"]
    assert {"train_reward", "heldout_reward", "heldout_gain", "seconds"} <= set(ipgo) and ipgo["prompts"] == 1
    report = (tmp_path / "eval-i" / "report.md").read_text()
    assert "## IPGO: training noise against held-out seeds" in report and "| ipgo | lexica |" in report


def test_pag_plus_ipgo_refines_the_policy_rewrite(tmp_path):
    import torch

    from common.models import build_policy, build_tokenizer
    from learner.checkpoint import save_checkpoint

    cfg = load_config("tiny", overrides=["ipgo.iterations=1", f"run.runs_dir={tmp_path}", "eval.decode=sample",
                                          "eval.max_new_tokens=8", "eval.min_new_tokens=2"])
    tok = build_tokenizer(cfg.model)
    policy = build_policy(cfg.model, tok)
    run = tmp_path / "pag"
    cfg.save(run / "config.yaml")
    flow = torch.nn.Linear(2, 2)
    save_checkpoint(run, 1, policy, tok, flow, torch.optim.AdamW(flow.parameters()), {})
    method = build(MethodSpec("ipgo-pag", "ipgo", str(run), raw=f"ipgo-pag:{run}"), cfg)
    out = method.rewrite(["a red car"], n=4)
    rewrite = out[0].rewrites[0]
    assert out[0].prompt == "a red car" and rewrite.text != "a red car"
    assert rewrite.conditioning.prompt_embeds.shape == (77, 32)
    lines = [json.loads(l) for l in (method.run_dir / "results.jsonl").read_text().splitlines()]
    assert [l["prompt"] for l in lines] == [rewrite.text]  # IPGO optimised the rewrite, not the plain prompt
    method.close()
