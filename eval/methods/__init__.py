"""Method registry: a MethodSpec (eval/spec.py) → a Method (eval/methods/base.py).

Kinds: plain, rule, sft (the reference policy), policy (any run or checkpoint), promptist, and ipgo
(eval/methods/ipgo.py, when that module is present: it yields conditioning, not text).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from common.config import Config, ModelConfig, read_saved
from common.formats import PolicyFormat
from eval.methods.base import Conditioning, Method, MethodOutput, Rewrite
from eval.spec import MethodSpec, MethodSpecError

__all__ = ["Conditioning", "Method", "MethodOutput", "Rewrite", "build_method"]


def run_model_config(run_dir: str | None, default: ModelConfig) -> ModelConfig:
    """The model section of the run's own config.yaml (its tokenizer, its kind); the eval's otherwise."""
    if not run_dir:
        return default
    raw = read_saved(Path(run_dir) / "config.yaml")  # keys of an older layout mapped
    return ModelConfig.model_validate(raw.get("model") or {}) if raw.get("model") else default


def run_format(run_dir: str | None, default: Config) -> PolicyFormat:
    """The run's own input format and response mode (its config.yaml's model.input_format and
    sampler.response), so a `suffix` run is evaluated the way it was trained; the eval config's otherwise."""
    if not run_dir:
        return PolicyFormat.from_config(default)
    raw = read_saved(Path(run_dir) / "config.yaml")
    model, sampler = raw.get("model") or {}, raw.get("sampler") or {}
    try:
        return PolicyFormat(model.get("input_format", "pag"), sampler.get("response", "full"))
    except ValueError as exc:
        raise MethodSpecError(f"{Path(run_dir) / 'config.yaml'}: {exc}") from exc


def build_method(spec: MethodSpec, cfg: Config, device: str = "cpu") -> Method:
    """Load what the method needs (policy weights, …) once."""
    if spec.kind == "plain":
        from eval.methods.plain import PlainMethod
        from scoring.reward import baseline_text

        return PlainMethod(lambda p: baseline_text(cfg, p))
    if spec.kind == "rule":
        from eval.methods.rule import RuleMethod

        return RuleMethod(cfg.eval.rule_suffix)
    if spec.kind == "sft":
        from eval.methods.policy import PolicyMethod

        path = spec.path
        if path is None:
            from sft.cache import ensure_sft

            path = ensure_sft(cfg)
        return PolicyMethod("sft", path, cfg.model, cfg.eval, fmt=PolicyFormat.from_config(cfg), device=device)
    if spec.kind == "policy":
        from eval.methods.policy import PolicyMethod

        return PolicyMethod(spec.label, spec.path, run_model_config(spec.run_dir, cfg.model), cfg.eval,
                            fmt=run_format(spec.run_dir, cfg), device=device, source=spec.raw)
    if spec.kind in ("promptist", "ipgo"):
        try:
            module = importlib.import_module(f"eval.methods.{spec.kind}")
        except ModuleNotFoundError as exc:
            if exc.name == f"eval.methods.{spec.kind}":
                raise MethodSpecError(f"--methods entry {spec.raw!r}: the {spec.kind} method is not in this "
                                      "checkout") from exc
            raise
        return module.build(spec, cfg, device)
    raise MethodSpecError(f"--methods entry {spec.raw!r}: no method of kind {spec.kind!r}")
