"""The paper's methods and ablations as names: `pag train --method NAME` (and `pag config --method`).

Each method is a documented tree of overrides, like a preset (common/presets.py), merged after the preset
and before the user's YAML file and overrides, so anything the user sets explicitly wins. The name is stored in the
run's config as `run.method`, which is how `pag eval --methods` labels several runs.

The ablations follow the official code's switches (dbsxodud-11/PAG README.md, "Training": the three
components are `--flow_reset True` "Flow Reactivation", `--prioritization reward` "Reweighted
Training" and `--loss fl-db` "Reward Decomposition"; main.py offers `prioritization="none"` and
`loss="db"`/`"tb"` as the alternatives):

    pag           the paper's method: FL-DB, flow reactivation, reward-prioritised replay (the defaults)
    pag-no-reset  without flow reactivation                 (official --flow_reset False)
    pag-no-prt    without prioritised replay: uniform       (official --prioritization none)
    pag-no-fl     without the forward-looking decomposition: plain DB, the whole log-reward at
                  the terminal                              (official --loss db)
    gfn-tb        vanilla GFlowNet: trajectory balance, no reactivation, uniform replay
    ppo           reward maximisation, Promptist-style PPO: on-policy (no replay), lr 5e-5, sampling at
                  temperature 1 (π_old is the policy itself), no flow head to reactivate; the PPO
                  constants are the learner.ppo defaults (Promptist's). Promptist also trained only
                  the top 2 GPT-2 blocks: add learner.trainable_blocks=2 for that.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.presets import Tree, merge


@dataclass(frozen=True)
class Method:
    doc: str
    overrides: Tree = field(default_factory=dict)


_NO_RESET: Tree = {"learner": {"reactivation_every": 0, "reactivation_dormant": None}}
_UNIFORM: Tree = {"buffer": {"prioritization": "uniform"}}

METHODS: dict[str, Method] = {
    "pag": Method("PAG: FL-DB + flow reactivation + prioritised replay (the defaults)"),
    "pag-no-reset": Method("PAG without flow reactivation", _NO_RESET),
    "pag-no-prt": Method("PAG without prioritised replay (uniform)", _UNIFORM),
    "pag-no-fl": Method("PAG without the forward-looking reward decomposition (DB)", {"learner": {"objective": "db"}}),
    "gfn-tb": Method("vanilla GFlowNet: TB, no reactivation, uniform replay",
                     merge({"learner": {"objective": "tb"}}, _NO_RESET, _UNIFORM)),
    "ppo": Method("reward-maximising baseline: Promptist-style PPO, on-policy",
                  merge({"learner": {"objective": "ppo", "replay_ratio": 0, "lr": 5e-5}}, _NO_RESET,
                        {"sampler": {"temp_start": 1.0, "temp_end": 1.0}})),
}


def method_overrides(name: str) -> Tree:
    """The overrides of method `name` plus `run.method=name`; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return merge(METHODS[name].overrides, {"run": {"method": name}})
