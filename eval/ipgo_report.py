"""IPGO's own numbers in the eval report: its reward on the noise it was optimised with *and* on held-out
seeds, the harness's other scorers beside it (reward-hacking check), and its cost per prompt.

Per evaluated prompt the IPGO method (eval/methods/ipgo.py) calls `measure`: with IPGO's own sampler and
training reward (`ipgo.reward`, summed), for the text with its learned tokens and for the plain text,

    train_reward,   train_plain      on the fixed noise of `ipgo.seed` (the one the tokens were optimised on)
    heldout_reward, heldout_plain    mean over `eval.images.per_prompt` held-out seeds (eval.images.seed + i,
                                     skipping ipgo.seed)
    train_gain, heldout_gain         reward − plain on each

so the two differ only in the noise: train_gain − heldout_gain is what is fitted to that one noise (the
notebook reports train_reward of the best iterate, chosen on that same reward — optimistic). Cost: seconds
of optimisation per prompt (GPU- or CPU-seconds; prompt-batch tokens: their training time over their training
prompts) and peak GPU memory (CUDA only). `collect` averages these over prompts (mean ± 95 % CI) into
results.json["ipgo"]; `markdown` is the report's section, which repeats the harness's aesthetic gain,
relevance and extra scorers (the eval's sampler and seeds) beside them.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from eval.metrics import summarize
from ipgo.optimize import heldout_seeds  # noqa: F401 -- the seeds IPGO's measurements use, part of this interface

#: the measured fields averaged over prompts: (key, header)
FIELDS = [("train_reward", "reward, training noise"), ("train_gain", "gain, training noise"),
          ("heldout_reward", "reward, held-out seeds"), ("heldout_gain", "gain, held-out seeds")]
#: the harness's columns repeated in the section (the eval's own sampler and seeds)
HARNESS = [("aes_gain", "aesthetic gain"), ("rel", "relevance")]


def measure(models, text: str, tokens, seeds: Sequence[int], cost: dict[str, Any]) -> dict[str, Any]:
    """One prompt's info: training-noise and held-out-seed reward with and without `tokens`, plus `cost`."""
    from ipgo.optimize import mean_reward, render

    def r(tok, seed: Optional[int]) -> float:
        return render(models, text, tok, seed)[1]["reward"]

    train, train_plain = r(tokens, None), r(None, None)
    held, held_plain = mean_reward(models, text, tokens, seeds), mean_reward(models, text, None, seeds)
    return {"train_reward": train, "train_plain": train_plain, "train_gain": train - train_plain,
            "heldout_reward": held, "heldout_plain": held_plain, "heldout_gain": held - held_plain,
            "heldout_seeds": list(seeds), **cost}


def cost_of(line: dict[str, Any], shared_over: int = 1) -> dict[str, Any]:
    """Cost fields from a results.jsonl / batch result.json line; `shared_over` > 1: one training shared
    by that many prompts (prompt-batch). A line with a peak GPU memory ran on CUDA (ipgo.optimize._peak)."""
    peak = line.get("peak_memory_bytes")
    out: dict[str, Any] = {"seconds": float(line.get("seconds", float("nan"))) / shared_over,
                           "device": "GPU" if peak is not None else "CPU",
                           "cost_basis": "prompt-wise" if shared_over == 1 else f"prompt-batch / {shared_over} prompts"}
    if peak is not None:
        out["peak_mib"] = peak / 2**20
    return out


def collect(outputs: dict[str, dict[str, list]]) -> dict[str, dict[str, Any]]:
    """label → set → {device, cost_basis, prompts, <field>: {mean, ci95, n}} for methods whose outputs carry IPGO info."""
    out: dict[str, dict[str, Any]] = {}
    for label, per_set in outputs.items():
        for set_name, outs in per_set.items():
            infos = [o.info for o in outs if o.info and "heldout_reward" in o.info]
            if not infos:
                continue
            rows = [{k: float(v) for k, v in i.items() if k != "train_seed" and isinstance(v, (int, float))
                     and not isinstance(v, bool)} for i in infos]
            out.setdefault(label, {})[set_name] = {
                "device": "/".join(sorted({i["device"] for i in infos})), "cost_basis": infos[0]["cost_basis"],
                "heldout_seeds": infos[0]["heldout_seeds"], "reward": infos[0]["reward"],
                "train_seed": infos[0]["train_seed"], "prompts": len(infos), **summarize(rows)}
    return out


def _fmt(cell: Optional[dict[str, float]], digits: int = 3) -> str:
    if not cell or not np.isfinite(cell.get("mean", float("nan"))):
        return "—"
    return f"{cell['mean']:.{digits}f} ± {cell['ci95']:.{digits}f}"


def markdown(results: dict[str, Any], extra_keys: Sequence[str]) -> list[str]:
    """The report's IPGO section (empty when no IPGO method ran)."""
    ipgo = results.get("ipgo") or {}
    if not ipgo:
        return []
    heads = [h for _, h in FIELDS] + [f"harness {h}" for _, h in HARNESS] + [f"harness {k}" for k in extra_keys]
    lines = ["## IPGO: training noise against held-out seeds, other scorers, cost", "",
             "IPGO's own sampler and training reward (`ipgo.reward`), with its tokens and for the plain "
             "text (gain = with − plain): on the noise of the seed it was optimised with, and on held-out "
             "seeds (mean over them); the best iterate was chosen on the training noise, so its number there is "
             "optimistic. The harness columns are the table's (eval sampler and seeds), for a reward-hacking check. "
             "Cost: seconds of optimisation per prompt (GPU- or CPU-seconds as named) and peak GPU memory.", "",
             "| method | set | IPGO reward (training seed) | " + " | ".join(heads)
             + " | cost s/prompt | peak GPU MiB | held-out seeds |",
             "|---|---|---|" + "---|" * (len(heads) + 3)]
    for label, per_set in ipgo.items():
        for set_name, cell in per_set.items():
            table = (results["table"].get(label) or {}).get(set_name) or {}
            cols = [f"{cell['reward']} (seed {cell['train_seed']})"] + [_fmt(cell.get(k)) for k, _ in FIELDS] + [_fmt(table.get(k)) for k, _ in HARNESS]
            cols += [_fmt(table.get(k)) for k in extra_keys]
            cols += [f"{_fmt(cell.get('seconds'), 1)} {cell['device']} ({cell['cost_basis']})",
                     _fmt(cell.get("peak_mib"), 0), ", ".join(str(s) for s in cell["heldout_seeds"])]
            lines.append(f"| {label} | {set_name} | " + " | ".join(cols) + " |")
    return lines
