"""Named methods and ablations (common/methods.py): their overrides, precedence (the user's wins),
`run.method`, and `pag train --method NAME` end to end on tiny for every method."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, load_config
from common.methods import METHODS, method_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["tiny", "sd14"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_a_valid_config(preset, name):
    """A method sets its overrides (and run.method) on the preset, and changes nothing else."""
    def leaves(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    base = leaves(load_config(preset).model_dump())
    cfg = leaves(load_config(preset, method=name).model_dump())
    wanted = leaves(method_overrides(name))
    assert {k: cfg[k] for k in wanted} == wanted
    assert {k for k in cfg if cfg[k] != base[k]} <= set(wanted)


def test_methods_set_their_documented_switches():
    pag = load_config("tiny", method="pag")
    assert (pag.learner.objective, pag.buffer.prioritization) == ("fl-db", "reward") and pag.learner.reactivation_every > 0
    assert load_config("tiny", method="pag-no-reset").learner.reactivation_every == 0
    assert load_config("tiny", method="pag-no-prt").buffer.prioritization == "uniform"
    assert load_config("tiny", method="pag-no-fl").learner.objective == "db"
    tb = load_config("tiny", method="gfn-tb")
    assert (tb.learner.objective, tb.learner.reactivation_every, tb.buffer.prioritization) == ("tb", 0, "uniform")
    ppo = load_config("sd14", method="ppo")
    assert (ppo.learner.objective, ppo.learner.replay_ratio, ppo.learner.lr) == ("ppo", 0, 5e-5)
    assert (ppo.learner.ppo.epochs, ppo.learner.ppo.clip, ppo.learner.ppo.value_coef) == (4, 0.2, 2.3)
    assert ppo.sampler.temp_start == ppo.sampler.temp_end == 1.0


def test_user_overrides_win_over_the_method(tmp_path):
    cfg = load_config("tiny", overrides=["learner.lr=1e-4", "learner.trainable_blocks=2"], method="ppo")
    assert cfg.learner.lr == 1e-4 and cfg.learner.trainable_blocks == 2 and cfg.learner.objective == "ppo"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"buffer": {"prioritization": "reward"}}))
    assert load_config("tiny", path, method="pag-no-prt").buffer.prioritization == "reward"


def test_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match="unknown method 'sac'.*pag-no-fl"):
        load_config("tiny", method="sac")
    with pytest.raises(ConfigError, match="run.method.*not a named method"):
        load_config("tiny", overrides=["run.method=sac"])


def _env(tmp_path):
    # RAY_ADDRESS=local: a private Ray even while another job's `ray start` cluster is up on this machine
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0", RAY_ADDRESS="local")


def test_pag_config_shows_a_method(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pag.cli", "config", "--preset", "sd14", "--method", "ppo"],
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["run"]["method"] == "ppo" and cfg["learner"]["objective"] == "ppo"


TINY = ["sampler.max_len=8", "sampler.min_len=2", "sampler.prompts_per_batch=2", "learner.batch_size=8",
        "reward.batch_size=4", "reward.images.per_prompt=1", "reward.images.steps=2", "run.log_every=1"]


@pytest.mark.slow
@pytest.mark.ray
def test_pag_train_ppo_end_to_end(tmp_path_factory, tiny_sft):
    """Two learner steps through the real entry point (Ray, redis-server, actors) for the methods whose
    learner path differs from `pag`'s: ppo here (its own objective, value head, no replay); gfn-tb (trajectory
    balance, reactivation every step) in tests/e2e/test_proxy_train.py, whose run checks the same items.
    One image per prompt at 2 denoising steps keeps the run short.

    The ablations (pag-no-reset, pag-no-prt, pag-no-fl) differ from `pag` only in config, which
    test_every_method_is_a_valid_config checks; their code paths (no reactivation, uniform replay, the DB
    loss) run in tests/integration (test_reactivation, test_buffer, test_learner), and `pag` itself end to
    end in test_train_cli. Running each again through Ray cost ~33 s apiece (issue 18)."""
    path = tmp_path_factory.mktemp("method-ppo")
    result = subprocess.run([sys.executable, "-m", "pag.cli", "train", "--method", "ppo", "--steps", "2",
                             "--run-name", "ppo", "--no-report", *TINY, "learner.lr=1e-4"], cwd=path,
                            env=_env(path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = path / "runs" / "ppo"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["method"] == "ppo"
    assert saved["learner"]["lr"] == 1e-4, "the user's override wins over the method's 5e-5"
    assert (saved["learner"]["objective"], saved["learner"]["replay_ratio"]) == ("ppo", 0)
    assert saved["learner"]["reactivation_every"] == 0
    assert saved["buffer"]["prioritization"] == load_config("tiny", method="ppo").buffer.prioritization
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("ppo/kl" in m and m["buffer/filled_from_replay"] == 0 for m in metrics)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "value.safetensors").is_file(), latest
