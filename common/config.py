"""One validated config tree for every role, built from layers merged in order, each a nested dict:

    preset (common/presets.py) → method (common/methods.py) → YAML file → `key=value` overrides

    cfg = load_config("tiny", yaml_path=None, overrides=["learner.ppo.clip=0.1"])

The sections are documented field by field in common/sections.py and common/sections_eval.py
(`pag config --list` prints every key with its default and meaning). A wrong key or value raises
ConfigError naming the field, the bad value and what is allowed, before anything starts. Keys of an
older layout (a config.yaml saved by an earlier version, an old `key=value`) are mapped to today's with
one warning (common/config_compat.py). Derived values live in `Config.derived()`, computed in one place.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError

from common.config_compat import OldKeysWarning, upgrade_tree
from common.errors import UsageError
from common.presets import PRESETS, Tree, merge
from common.sections import (BufferConfig, ImagesConfig, LearnerConfig, ModelConfig, PPOConfig, RenderConfig,
                             RewardConfig, RunConfig, SamplerConfig, Section, SpeedConfig)
from common.sections_eval import EvalConfig, EvalImagesConfig, IpgoConfig

__all__ = ["BufferConfig", "Config", "ConfigError", "EvalConfig", "EvalImagesConfig", "ImagesConfig", "IpgoConfig",
           "LearnerConfig", "ModelConfig", "PPOConfig", "RenderConfig", "RewardConfig", "RunConfig",
           "SamplerConfig", "SpeedConfig", "describe", "load_config", "parse_override", "read_saved"]


class ConfigError(UsageError, ValueError):
    """A config key or value that is wrong; the message names the field and what is allowed."""

    label = "config error"


class Config(Section):
    preset: str = "sd14"
    """the preset this config started from (common/presets.py)"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    ipgo: IpgoConfig = Field(default_factory=IpgoConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def derived(self) -> dict[str, Any]:
        """Values computed from the config, in one place."""
        per_step = self.learner.batch_size * self.learner.grad_accum
        replay = int(round(self.learner.batch_size * self.learner.replay_ratio))
        return {
            "trajectories_per_step": per_step,
            "replay_per_micro_batch": replay,
            "fresh_per_micro_batch": self.learner.batch_size - replay,
        }

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Short hash of what changes the data (model, render and reward), stored in the run's meta."""
        # where the workers run (reward.resources) does not change the data
        part = {"model": self.model.model_dump(mode="json"), "render": self.render.model_dump(mode="json"),
                "reward": self.reward.model_dump(mode="json", exclude={"resources"})}
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_keys(tree: dict[str, Any], model: type[BaseModel], where: str, source: str) -> None:
    for key, value in tree.items():
        fields = model.model_fields
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            name = f"{where}{key}"
            raise ConfigError(
                f"{source}: unknown config key '{name}'"
                + (f" (did you mean '{where}{hint[0]}'?)" if hint else "")
                + f"; allowed under '{where.rstrip('.') or 'top level'}': {', '.join(fields)}"
            )
        annotation = fields[key].annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{where}{key}.", source)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`learner.lr=3e-5` → (['learner', 'lr'], 3e-05); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. learner.lr=3e-5)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _nest(path: list[str], value: Any) -> Tree:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _format_validation(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        bad = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{loc}'")
        elif isinstance(bad, dict):  # a cross-field check on a whole section: the message names the fields
            lines.append(f"section '{loc}': {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"field '{loc}' = {bad!r}: {err['msg']}")
    return ConfigError(f"{source}: invalid config: " + "; ".join(lines))


def _upgrade(tree: Tree, source: str) -> tuple[Tree, list[str]]:
    try:
        return upgrade_tree(tree)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_yaml(path: Path) -> Tree:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _warn_old(mapped: list[str]) -> None:
    if mapped:
        warnings.warn("config keys of an older layout mapped to today's: " + "; ".join(mapped)
                      + " (write the new keys to silence this)", OldKeysWarning, stacklevel=3)


def read_saved(path: str | Path) -> Tree:
    """A saved config.yaml as a tree in today's keys (keys of an older layout mapped, with one warning)."""
    path = Path(path)
    tree, mapped = _upgrade(_read_yaml(path), f"config file {path}")
    _warn_old(mapped)
    return tree


def load_config(
    preset: str = "tiny",
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    method: Optional[str] = None,
) -> Config:
    """Preset → method (common/methods.py) → YAML file → key=value overrides, validated; raises ConfigError."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    tree = merge({"preset": preset}, PRESETS[preset]())
    source = f"preset {preset!r}"
    if method is not None:
        from common.methods import method_overrides

        try:
            tree = merge(tree, method_overrides(method))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        source = f"method {method!r}"
    mapped: list[str] = []
    if yaml_path is not None:
        path = Path(yaml_path)
        source = f"config file {path}"
        loaded, mapped = _upgrade(_read_yaml(path), source)
        loaded.pop("preset", None)
        _check_keys(loaded, Config, "", source)
        tree = merge(tree, loaded)
    for text in overrides:
        nested, notes = _upgrade(_nest(*parse_override(text)), f"override {text!r}")
        mapped.extend(notes)
        _check_keys(nested, Config, "", f"override {text!r}")
        tree = merge(tree, nested)
        source = f"override {text!r}" if len(overrides) == 1 else "overrides " + " ".join(overrides)
    _warn_old(mapped)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise _format_validation(exc, source) from None


def describe(model: type[BaseModel] = Config, where: str = "") -> list[str]:
    """One line per leaf field: `section.key = default  # meaning` — used by `pag config --list`."""
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe(annotation, f"{where}{name}."))
        else:
            default = info.default if info.default_factory is None else info.default_factory()
            lines.append(f"{where}{name} = {default!r}  # {' '.join((info.description or '').split())}")
    return lines
