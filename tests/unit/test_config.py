import warnings
from pathlib import Path

import pytest
import yaml

from common.config import Config, ConfigError, describe, load_config, parse_override, read_saved
from common.config_compat import OldKeysWarning
from common.methods import METHODS, method_overrides
from common.presets import PRESETS, merge


def test_sd14_preset_has_paper_defaults():
    cfg = load_config("sd14")
    assert cfg.learner.lr == 1e-5 and cfg.learner.flow_lr == 1e-4 and cfg.learner.grad_clip == 1.0
    assert cfg.learner.batch_size * cfg.learner.grad_accum == 256
    assert cfg.learner.reactivation_every == 2000 and cfg.learner.steps == 10000
    assert (cfg.sampler.min_len, cfg.sampler.max_len) == (15, 75)
    assert (cfg.sampler.temp_start, cfg.sampler.temp_end, cfg.sampler.temp_anneal_steps) == (2.0, 0.5, 5000)
    assert (cfg.reward.images.steps, cfg.render.guidance, cfg.reward.images.per_prompt) == (20, 7.5, 3)
    assert (cfg.reward.beta, cfg.reward.clip_threshold, cfg.reward.clip_weight) == (0.05, 0.28, 20.0)
    assert cfg.buffer.capacity == 5000 and cfg.learner.replay_ratio == 0.5
    assert (cfg.learner.reward_temp_start, cfg.learner.reward_temp_end) == (2.0, 1.0)
    assert cfg.model.sd == "CompVis/stable-diffusion-v1-4" and cfg.model.clip_arch == "ViT-L-14"
    # the one speed switch a GPU run adopted (docs/benchmarks.md); the measuring preset stays eager
    assert cfg.reward.speed.compile_unet and cfg.reward.speed.compile_vae and not cfg.reward.speed.cuda_graphs
    arch = load_config("sd14-arch").reward.speed
    assert not (arch.compile_unet or arch.compile_vae or arch.channels_last) and arch.attention == "sdpa"


def test_tiny_preset_is_offline_cpu():
    cfg = load_config("tiny")
    assert cfg.model.kind == "tiny" and cfg.reward.num_gpus == 0 and cfg.learner.num_gpus == 0


def test_overrides_parse_types():
    cfg = load_config("tiny", overrides=["learner.lr=3e-5", "buffer.eviction=fifo", "sampler.datasets=[coco_all]",
                                          "buffer.redis_url=null"])
    assert cfg.learner.lr == pytest.approx(3e-5)
    assert cfg.buffer.eviction == "fifo" and cfg.sampler.datasets == ["coco_all"] and cfg.buffer.redis_url is None


@pytest.mark.parametrize("override, needle", [
    ("learner.lr=abc", "learner.lr"),
    ("learner.lrr=1", "did you mean 'learner.lr'"),
    ("lerner.lr=1", "did you mean 'learner'"),
    ("learner.objective=sac", "'fl-db', 'db', 'tb' or 'ppo'"),
    ("learner.lr=-1", "greater than 0"),
    ("sampler.min_len=80", "min_len (80) must be below max_len"),
    ("nokey", "section.key=value"),
])
def test_bad_override_names_field_and_allowed(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert needle in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="choose one of sd14, tiny"):
        load_config("huge")


def test_yaml_file_layers_between_preset_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"learner": {"lr": 0.5, "steps": 7}}))
    cfg = load_config("tiny", path, ["learner.lr=0.25"])
    assert cfg.learner.steps == 7 and cfg.learner.lr == 0.25


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  nonsense: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*learner.nonsense"):
        load_config("tiny", path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("tiny", path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", overrides=["learner.steps=3"])
    cfg.save(tmp_path / "config.yaml")
    again = Config.model_validate(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and again.hash() == cfg.hash()


def test_parse_override_and_describe():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    lines = describe()
    assert any(line.startswith("learner.lr = 1e-05") for line in lines)


def test_derived_values():
    d = load_config("sd14").derived()
    assert d["trajectories_per_step"] == 256 and d["replay_per_micro_batch"] == 32


# ---------------------------------------------------------------- nested sections and the old layout

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD_TINY = FIXTURES / "config_v0_tiny.yaml"  # `pag config --preset tiny` before the sections nested


def _load_warned(*args, **kwargs) -> tuple[Config, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(*args, **kwargs)
    return cfg, [str(w.message) for w in caught if issubclass(w.category, OldKeysWarning)]


def test_nested_overrides_reach_their_sections():
    cfg = load_config("tiny", overrides=["learner.ppo.clip=0.1", "learner.ppo.kl_target=null",
                                         "reward.speed.compile_unet=true", "render.guidance=5",
                                         "reward.images.per_prompt=1", "eval.images.steps=2"])
    assert cfg.learner.ppo.clip == 0.1 and cfg.learner.ppo.kl_target is None and cfg.reward.speed.compile_unet
    assert cfg.render.guidance == 5.0 and cfg.reward.images.per_prompt == 1
    assert (cfg.eval.images.steps, cfg.eval.images.seed) == (2, 42), "a partial eval.images keeps the eval's seed"
    assert (cfg.reward.images.steps, cfg.reward.images.seed) == (4, 0), "the tiny preset's reward images stay"


@pytest.mark.parametrize("override, needle", [
    ("learner.ppo.clipp=1", "did you mean 'learner.ppo.clip'"),
    ("learner.ppo.clip=-1", "field 'learner.ppo.clip' = -1"),
    ("reward.speed.cuda_graphs=true", "section 'reward.speed': cuda_graphs needs compile_unet"),
    ("eval.images.per_prompt=0", "field 'eval.images.per_prompt' = 0"),
    ("eval.reward_metric=imagereward", "reward_metric=imagereward needs an ImageReward scorer"),
])
def test_bad_nested_override_names_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert needle in str(err.value)


def test_yaml_nested_sections_merge_key_by_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"eval": {"images": {"per_prompt": 1}}, "learner": {"ppo": {"epochs": 2}}}))
    cfg = load_config("tiny", path)
    assert (cfg.eval.images.per_prompt, cfg.eval.images.steps, cfg.eval.images.seed) == (1, 4, 42)
    assert cfg.learner.ppo.epochs == 2 and cfg.learner.ppo.clip == 0.2


def test_presets_and_methods_are_trees_merged_the_same_way():
    for name in METHODS:
        assert isinstance(method_overrides(name), dict)
        for preset in PRESETS:
            load_config(preset, method=name)  # every key of every preset and method exists and validates
    cfg = load_config("tiny", overrides=["learner.lr=1e-3", "sampler.temp_end=0.3"], method="ppo")
    assert cfg.run.method == "ppo" and cfg.learner.objective == "ppo" and cfg.learner.replay_ratio == 0
    assert cfg.learner.lr == 1e-3 and cfg.sampler.temp_end == 0.3, "the user's overrides win over the method's"
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}, {"d": 4}) == {"a": {"b": 3, "c": 2}, "d": 4}


def test_old_config_yaml_loads_with_one_warning_listing_the_old_keys():
    cfg, messages = _load_warned("tiny", OLD_TINY)
    # a saved config keeps the values it was saved with where a default changed since (issue 19: the official
    # eval.score_against=rewrite); everything else is today's tiny
    assert cfg.eval.score_against == "plain"
    today = load_config("tiny", overrides=["eval.score_against=plain"])
    assert cfg == today and len(messages) == 1, "the same config, one warning"
    for note in ("learner.ppo_clip → learner.ppo.clip", "learner.ppo_lambda → learner.ppo.gae_lambda",
                 "learner.ppo_kl_init → learner.ppo.kl_coef", "reward.attention → reward.speed.attention",
                 "reward.render_batch → reward.speed.render_batch", "reward.steps → reward.images.steps",
                 "reward.fp16 → render.fp16", "ipgo.guidance → render.guidance", "eval.seed → eval.images.seed",
                 "eval.promptist_input removed"):
        assert note in messages[0]
    assert cfg.render.fp16 is False and cfg.reward.images.steps == 4 and cfg.eval.images.seed == 42


def test_old_values_move_to_their_new_keys(tmp_path):
    old = yaml.safe_load(OLD_TINY.read_text())
    old["learner"].update(ppo_kl_init=0.0, ppo_epochs=2, ppo_lambda=0.9)
    old["reward"].update(compile_unet=True, cuda_graphs=True, steps=7, seed=3, images_per_prompt=1)
    old["eval"].update(seed=5, steps=9)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg, messages = _load_warned("tiny", tmp_path / "config.yaml")
    assert (cfg.learner.ppo.kl_coef, cfg.learner.ppo.epochs, cfg.learner.ppo.gae_lambda) == (0.0, 2, 0.9)
    assert cfg.reward.speed.compile_unet and cfg.reward.speed.cuda_graphs
    assert (cfg.reward.images.steps, cfg.reward.images.seed, cfg.reward.images.per_prompt) == (7, 3, 1)
    assert (cfg.eval.images.seed, cfg.eval.images.steps) == (5, 9) and len(messages) == 1
    with pytest.warns(OldKeysWarning, match="learner.ppo_epochs → learner.ppo.epochs"):
        assert read_saved(tmp_path / "config.yaml")["learner"]["ppo"]["epochs"] == 2


def test_old_overrides_map_too_and_new_keys_do_not_warn():
    cfg, messages = _load_warned("tiny", overrides=["learner.ppo_clip=0.1", "reward.overlap_scoring=true",
                                                    "eval.steps=3", "reward.guidance=6"])
    assert cfg.learner.ppo.clip == 0.1 and cfg.reward.speed.overlap_scoring and cfg.eval.images.steps == 3
    assert cfg.render.guidance == 6.0 and len(messages) == 1 and "eval.steps → eval.images.steps" in messages[0]
    _, quiet = _load_warned("tiny", overrides=["learner.ppo.clip=0.1", "eval.images.steps=3"])
    assert quiet == []


def test_old_keys_that_met_in_one_shared_key_keep_the_first_and_say_so(tmp_path):
    old = yaml.safe_load(OLD_TINY.read_text())
    old["eval"]["guidance"] = 5.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg, messages = _load_warned("tiny", tmp_path / "config.yaml")
    assert cfg.render.guidance == 7.5
    assert "eval.guidance = 5.0 dropped: the shared render.guidance = 7.5 (from reward.guidance)" in messages[0]


def test_a_removed_key_with_another_value_is_an_error(tmp_path):
    old = yaml.safe_load(OLD_TINY.read_text())
    old["eval"]["promptist_input"] = "{prompt} Improve:"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"config.yaml: config key 'eval.promptist_input' is gone"):
        load_config("tiny", tmp_path / "config.yaml")


def test_every_key_is_documented_on_one_line():
    lines = describe()
    leaves = [line.split(" = ")[0] for line in lines]
    assert len(leaves) == len(set(leaves)) and "learner.ppo.gae_lambda" in leaves and "render.fp16" in leaves
    assert all(line.split("  # ", 1)[1].strip() for line in lines), [ln for ln in lines if ln.endswith("# ")]
    root = Path(__file__).resolve().parents[2] / "common"
    for name in ("config.py", "config_compat.py", "sections.py", "sections_eval.py", "presets.py", "methods.py"):
        long = [i for i, line in enumerate((root / name).read_text().splitlines(), 1) if len(line) > 120]
        assert not long, f"common/{name}: lines {long} are over 120 characters"
