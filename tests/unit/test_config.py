import pytest
import yaml

from common.config import Config, ConfigError, describe, load_config, parse_override


def test_sd14_preset_has_paper_defaults():
    cfg = load_config("sd14")
    assert cfg.learner.lr == 1e-5 and cfg.learner.flow_lr == 1e-4 and cfg.learner.grad_clip == 1.0
    assert cfg.learner.batch_size * cfg.learner.grad_accum == 256
    assert cfg.learner.reactivation_every == 2000 and cfg.learner.steps == 10000
    assert (cfg.sampler.min_len, cfg.sampler.max_len) == (15, 75)
    assert (cfg.sampler.temp_start, cfg.sampler.temp_end, cfg.sampler.temp_anneal_steps) == (2.0, 0.5, 5000)
    assert (cfg.reward.steps, cfg.reward.guidance, cfg.reward.images_per_prompt) == (20, 7.5, 3)
    assert (cfg.reward.beta, cfg.reward.clip_threshold, cfg.reward.clip_weight) == (0.05, 0.28, 20.0)
    assert cfg.buffer.capacity == 5000 and cfg.learner.replay_ratio == 0.5
    assert (cfg.learner.reward_temp_start, cfg.learner.reward_temp_end) == (2.0, 1.0)
    assert cfg.model.sd == "CompVis/stable-diffusion-v1-4" and cfg.model.clip_arch == "ViT-L-14"


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
