"""Keys of older config layouts, mapped to today's, so a config.yaml saved by an earlier version (and an
old `key=value` override) still loads. `upgrade_tree` works on plain dicts, before validation; the
loader (common/config.py) gathers what it mapped into one warning.

Layout 1 (issue: nested sections) moved the PPO constants under `learner.ppo`, the SD speed switches
under `reward.speed`, what every role renders alike into the shared `render` section, and each role's
images (count, steps, seeds) into one `ImagesConfig` (`reward.images`, `eval.images`).
"""
from __future__ import annotations

import copy
from typing import Any

Tree = dict[str, Any]

_PPO = {"epochs": "epochs", "clip": "clip", "value_clip": "value_clip", "value_coef": "value_coef",
        "gamma": "gamma", "lambda": "gae_lambda", "kl_init": "kl_coef", "kl_target": "kl_target",
        "kl_horizon": "kl_horizon"}
_SPEED = ("attention", "channels_last", "compile_unet", "compile_vae", "cuda_graphs", "vae_fp16", "render_batch",
          "overlap_scoring")

#: old dotted key → today's. Where several old keys meet in one shared key, the first listed wins.
RENAMED: dict[str, str] = {
    **{f"learner.ppo_{old}": f"learner.ppo.{new}" for old, new in _PPO.items()},
    **{f"reward.{name}": f"reward.speed.{name}" for name in _SPEED},
    "reward.images_per_prompt": "reward.images.per_prompt",
    "reward.steps": "reward.images.steps",
    "reward.seed": "reward.images.seed",
    "eval.images_per_prompt": "eval.images.per_prompt",
    "eval.steps": "eval.images.steps",
    "eval.seed": "eval.images.seed",
    "reward.guidance": "render.guidance",
    "eval.guidance": "render.guidance",
    "ipgo.guidance": "render.guidance",
    "reward.fp16": "render.fp16",
    "ipgo.fp16": "render.fp16",
}

#: keys that are gone: the only value they may hold (the one they always had) and where it lives now
REMOVED: dict[str, tuple[Any, str]] = {
    "eval.promptist_input": ("{prompt} Rephrase:", "common/formats.py TEMPLATES['promptist']"),
}


class OldKeysWarning(FutureWarning):
    """A config used keys of an older layout; they were mapped to today's."""


def _find(tree: Tree, parts: list[str]) -> tuple[bool, Any]:
    node: Any = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _pop(tree: Tree, parts: list[str]) -> tuple[bool, Any]:
    found, parent = _find(tree, parts[:-1])
    if not found or not isinstance(parent, dict) or parts[-1] not in parent:
        return False, None
    return True, parent.pop(parts[-1])


def _put(tree: Tree, parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def upgrade_tree(tree: Tree) -> tuple[Tree, list[str]]:
    """(a copy of `tree` in today's keys, one note per old key met); ValueError for a removed key that holds
    anything but the value it always had."""
    tree = copy.deepcopy(tree)
    notes: list[str] = []
    for old, (value, where) in REMOVED.items():
        found, held = _pop(tree, old.split("."))
        if found and held != value:
            raise ValueError(f"config key '{old}' is gone (its value is fixed: {where}); "
                             f"remove it instead of setting it to {held!r}")
        if found:
            notes.append(f"{old} removed ({where})")
    origin: dict[str, str] = {}
    for old, new in RENAMED.items():
        found, value = _pop(tree, old.split("."))
        if not found:
            continue
        present, current = _find(tree, new.split("."))
        if not present:
            _put(tree, new.split("."), value)
            origin[new] = old
            notes.append(f"{old} → {new}")
        elif current == value:
            notes.append(f"{old} → {new}")
        else:
            notes.append(f"{old} = {value!r} dropped: the shared {new} = {current!r} (from {origin.get(new, new)})")
    return tree, notes
