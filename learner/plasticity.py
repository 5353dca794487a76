"""Plasticity diagnostics: the τ-dormant neuron ratio (Sokar et al., 2023) and the reactivation rule.

For a layer with units i and activations h_i over a batch,

    s_i = E|h_i| / ( (1/N) Σ_j E|h_j| ),      unit i is τ-dormant  ⇔  s_i ≤ τ,

and the ratio is the fraction of dormant units. The paper reads a rising ratio in the flow head as
the sign of the mode collapse that flow reactivation cures; we report it for the flow head's hidden
layer (`FlowHead.act`) and for every MLP activation of the policy (GPT-2 `transformer.h[i].mlp.act`).

Hooks only accumulate per-unit sums of |h| (no activation is kept), so a probe can stay on across
gradient-accumulation micro-batches at negligible cost.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from common.constants import FLOW_DORMANT, POLICY_DORMANT


def dormant_ratio(activations: Tensor, tau: float = 0.1, mask: Optional[Tensor] = None) -> float:
    """Fraction of τ-dormant units of activations (..., N); `mask` (...) selects the rows that count."""
    return _ratio_from_sums(*_unit_sums(activations, mask), tau)


def _unit_sums(activations: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(Σ |h_i| per unit (N,), number of rows counted) over the selected rows."""
    flat = activations.detach().abs().float().reshape(-1, activations.shape[-1])  # (rows, N)
    if mask is not None:
        if mask.shape != activations.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match activations {tuple(activations.shape[:-1])}"
            )
        flat = flat[mask.reshape(-1).bool()]
    return flat.sum(0), torch.tensor(float(flat.shape[0]))


def _ratio_from_sums(total: Tensor, count: Tensor, tau: float) -> float:
    if count <= 0:
        return float("nan")
    mean_abs = total / count  # E|h_i|, (N,)
    layer_mean = mean_abs.mean()
    if layer_mean <= 0:
        return 1.0  # every unit is silent
    return float(((mean_abs / layer_mean) <= tau).float().mean())


def policy_mlp_activations(model: nn.Module) -> dict[str, nn.Module]:
    """GPT-2's MLP activation modules by name: {"policy_mlp0": transformer.h[0].mlp.act, …}."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no transformer.h blocks; expected a GPT-2 style model")
    return {f"policy_mlp{i}": block.mlp.act for i, block in enumerate(blocks)}


class DormantProbe:
    """Context manager: forward hooks that accumulate Σ|h| per unit on named modules.

        with DormantProbe({"flow": head.act, **policy_mlp_activations(model)},
                          masks={"flow": response_mask, ...}) as probe:
            ...forward passes...
        probe.ratios(tau=0.1)   # {"flow": 0.03, "policy_mlp0": 0.0, ...}

    `masks[name]` (optional) must match the module output's leading dims; its zeros are padding.
    Masks can be replaced between forward passes through `probe.masks`.
    """

    def __init__(self, modules: Mapping[str, nn.Module], masks: Optional[Mapping[str, Tensor]] = None) -> None:
        self.modules = dict(modules)
        self.masks: dict[str, Tensor] = dict(masks or {})
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            total, count = _unit_sums(output, self.masks.get(name))
            if name in self._sums:
                old_total, old_count = self._sums[name]
                total, count = old_total + total.to(old_total), old_count + count
            self._sums[name] = (total, count)
        return hook

    def __enter__(self) -> "DormantProbe":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def ratios(self, tau: float = 0.1) -> dict[str, float]:
        """Dormant ratio per module seen by at least one forward pass."""
        return {name: _ratio_from_sums(total, count, tau) for name, (total, count) in self._sums.items()}


def dormant_metrics(
    policy: nn.Module,
    flow_head: nn.Module,
    forward: Callable[[], object],
    tau: float = 0.1,
    policy_mask: Optional[Tensor] = None,
    flow_mask: Optional[Tensor] = None,
) -> dict[str, float]:
    """Run `forward()` under a probe and return metrics keyed `plasticity/…`:

    `flow_dormant` (when `forward` ran the flow head: an objective that does not train it, PPO, does
    not run it), `policy_dormant` (mean over MLP layers) and `policy_dormant/layer{i}`.
    `policy_mask` (B, P+T) is the attention mask of [x; y]; `flow_mask` (B, T) the response mask.
    """
    modules = {"flow": flow_head.act, **policy_mlp_activations(policy)}
    masks = {}
    if flow_mask is not None:
        masks["flow"] = flow_mask
    if policy_mask is not None:
        masks.update({name: policy_mask for name in modules if name != "flow"})
    with DormantProbe(modules, masks) as probe:
        forward()
    ratios = probe.ratios(tau)
    layers = [ratios[name] for name in modules if name != "flow" and name in ratios]
    metrics = {FLOW_DORMANT: ratios["flow"]} if "flow" in ratios else {}
    if layers:
        metrics[POLICY_DORMANT] = sum(layers) / len(layers)
    for i, value in enumerate(layers):
        metrics[f"{POLICY_DORMANT}/layer{i}"] = value
    return metrics


def should_reactivate(
    step: int, every: int, dormant: Optional[float] = None, threshold: Optional[float] = None
) -> bool:
    """Flow reactivation rule: every `every` steps (0 = never), or when the flow head's dormant
    ratio passes `threshold` (None = off). Step 0 never triggers the periodic reset."""
    periodic = every > 0 and step > 0 and step % every == 0
    triggered = threshold is not None and dormant is not None and dormant > threshold
    return periodic or triggered
