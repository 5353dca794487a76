"""bench/claim_mini.py's tables: read `pag eval`'s output, count mode coverage, summarise over seeds and prompts,
judge the issue's targets, draw the pictures and write docs/results-mini.md (issue 20)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

MAIN_ROWS = ("plain", "rule", "sft", "ppo", "gfn-tb", "pag")
ABLATION_ROWS = ("pag", "pag-no-reset", "pag-no-prt", "pag-no-fl")
#: a rewrite reaches a mode in pictures when at least this share of its pictures (2 of 3) show it
PICTURE_SHARE = 0.5
#: two-sided 95 % Student t quantiles by degrees of freedom (a CI over 3 seeds has 2)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def read_eval(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    results = json.loads((out_dir / "results.json").read_text())
    lines = [json.loads(line) for line in (out_dir / "rewrites.jsonl").read_text().splitlines() if line.strip()]
    return results, lines


def modes_per_prompt(lines: list[dict[str, Any]], label: str) -> dict[str, dict[str, Any]]:
    """Prompt → the modes its rewrites reach in their pictures (a rewrite reaches a mode when at least half of its
    pictures show it: one picture in eleven reaches some mode by chance) and in their words (all three values
    named), and how many of its rewrites reach each mode in pictures; from one method's rewrites.jsonl lines."""
    from scoring.world_scorer import mode_key
    from world.corpus import named_values
    from world.taste import MODES

    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line["method"] != label or "error" in line:
            continue
        row = out.setdefault(line["prompt"], {"pictures": set(), "text": set(), "rewrites": 0, "hist": {}})
        row["rewrites"] += 1
        named = named_values(line["text"])
        for mode in MODES:
            share = float(line.get(mode_key(mode), 0.0))
            if share >= PICTURE_SHARE:
                row["pictures"].add(mode)
                row["hist"][mode] = row["hist"].get(mode, 0) + 1
            if named[mode] == 3:
                row["text"].add(mode)
    return out


def dormant(run_dir: Path) -> Optional[dict[str, float]]:
    """First, last and peak τ-dormant ratio of the flow head over a run (None: never probed, e.g. PPO)."""
    values = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("plasticity/flow_dormant") is not None:
            values.append(float(row["plasticity/flow_dormant"]))
    if not values:
        return None
    return {"first": values[0], "last": values[-1], "max": max(values), "probes": len(values)}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95 % CI half-width by Student's t) over the finite values: eval's normal-quantile CI widened by t/z,
    as three seeds call for; half-width 0 for one value."""
    from eval.metrics import Z95, mean_ci as normal_ci

    finite = [x for x in values if math.isfinite(x)]
    mean, half = normal_ci(finite)
    return mean, (half * T95.get(len(finite) - 1, Z95) / Z95 if len(finite) > 1 else half)


METRICS = ("reward", "aes_gain", "rel", "text_diversity", "image_diversity", "taste")


def method_stats(per_seed: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]], label: str) -> dict[str, Any]:
    """One method's row over seeds (label's results in each seed's eval): each metric's mean with a CI over seeds
    (of the seed means) and over prompts (of the prompt means across seeds), mode coverage, the mode histogram."""
    seed_means: dict[str, list[float]] = {m: [] for m in (*METRICS, "modes_pictures", "modes_text")}
    prompt_vals: dict[str, dict[str, list[float]]] = {m: {} for m in seed_means}
    hist: dict[str, int] = {}
    rewrites = 0
    for results, lines in per_seed.values():
        set_name = next(iter(results["per_prompt"][label]))
        rows = results["per_prompt"][label][set_name]
        modes = modes_per_prompt(lines, label)
        rows = [{**row, "modes_pictures": len(modes.get(row["prompt"], {}).get("pictures", ())),
                 "modes_text": len(modes.get(row["prompt"], {}).get("text", ()))} for row in rows]
        for metric in seed_means:
            vals = {row["prompt"]: float(row[metric]) for row in rows if metric in row}
            if vals:
                seed_means[metric].append(float(np.mean(list(vals.values()))))
                for prompt, v in vals.items():
                    prompt_vals[metric].setdefault(prompt, []).append(v)
        for row in modes.values():
            rewrites += row["rewrites"]
            for mode, n in row["hist"].items():
                hist[mode] = hist.get(mode, 0) + n
    out: dict[str, Any] = {"seeds": len(per_seed), "rewrites": rewrites,
                           "mode_histogram": {m: round(n / max(1, rewrites), 4) for m, n in sorted(hist.items())}}
    for metric, means in seed_means.items():
        mean, ci_seeds = mean_ci(means)
        _, ci_prompts = mean_ci([float(np.mean(v)) for v in prompt_vals[metric].values()])
        out[metric] = {"mean": mean, "ci95_seeds": ci_seeds, "ci95_prompts": ci_prompts}
    return out


def targets(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets (the paper's shape) on the sampled rewrites: each with its figures and met or not."""
    def m(label: str, metric: str) -> float:
        return rows[label][metric]["mean"]

    pag_r, ppo_r = m("pag", "reward"), m("ppo", "reward")
    pag_modes, ppo_modes = m("pag", "modes_pictures"), m("ppo", "modes_pictures")
    out: dict[str, Any] = {
        "pag_reward_ge_90pct_ppo": {"pag": pag_r, "ppo": ppo_r,
                                    "met": bool(pag_r >= 0.9 * ppo_r if ppo_r > 0 else pag_r >= ppo_r)},
        "pag_modes_ge_3_and_2x_ppo": {"pag": pag_modes, "ppo": ppo_modes,
                                      "met": bool(pag_modes >= 3 and pag_modes >= 2 * ppo_modes)},
        "ppo_modes_le_1.5": {"ppo": ppo_modes, "met": bool(ppo_modes <= 1.5)},
    }
    for ab in ABLATION_ROWS[1:]:
        out[f"{ab}_below_pag"] = {
            "reward": m(ab, "reward"), "text_diversity": m(ab, "text_diversity"),
            "met": bool(m(ab, "reward") < pag_r or m(ab, "text_diversity") < m("pag", "text_diversity"))}
    abl = ABLATION_ROWS[1:]
    out["no_prt_lowest_reward"] = {"met": bool(min(abl, key=lambda a: m(a, "reward")) == "pag-no-prt")}
    out["no_fl_lowest_diversity"] = {"met": bool(min(abl, key=lambda a: m(a, "text_diversity")) == "pag-no-fl")}
    return out


def render_grid(cfg_overrides: Sequence[str], lines: list[dict[str, Any]], labels: Sequence[str], prompts: int,
                per_row: int, path: Path) -> None:
    """Per held-out prompt: its plain picture, then each method's first `per_row` sampled rewrites, one picture
    each (the eval's image-0 noise)."""
    import torch

    from common.config import load_config
    from common.images import image_grid
    from common.models import build_sd_pipeline
    from scoring.render import Renderer

    cfg = load_config(preset="mini", overrides=list(cfg_overrides))
    pipe = build_sd_pipeline(cfg.model, torch.device("cpu"), torch.float32)
    ev = cfg.eval
    renderer = Renderer(pipe, 1, ev.images.steps, cfg.render.guidance, ev.images.seed, cfg.model.image_size, 16)
    order = list(dict.fromkeys(line["prompt"] for line in lines))[:prompts]
    rows: list[tuple[str, list[np.ndarray]]] = []
    for prompt in order:
        texts = {label: [line["text"] for line in lines if line["method"] == label and line["prompt"] == prompt]
                 [:per_row] for label in labels}
        batch = [prompt] + [t for label in labels for t in texts[label]]
        with torch.no_grad():
            images = (renderer(batch).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        rows.append((f"plain: {prompt}", [images[0]]))
        at = 1
        for label in labels:
            rows.append((label, list(images[at:at + len(texts[label])])))
            at += len(texts[label])
    image_grid(rows, path, tile=64)


def histogram_plot(rows: dict[str, dict[str, Any]], labels: Sequence[str], path: Path) -> None:
    """Per method, the share of its sampled rewrites whose pictures reach each mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from world.taste import MODES

    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        hist = rows[label]["mode_histogram"]
        ax.bar(np.arange(len(MODES)) + i * width, [hist.get(mode, 0.0) for mode in MODES], width, label=label)
    ax.set_xticks(np.arange(len(MODES)) + 0.4 - width / 2, list(MODES))
    ax.set_ylabel("share of rewrites (pictures)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(stat: dict[str, float], seeds: int, digits: int = 3) -> str:
    """mean ± CI over seeds (CI over prompts); one seed: mean (CI over prompts)."""
    if not math.isfinite(stat["mean"]):
        return "–"
    over_seeds = f" ± {stat['ci95_seeds']:.{digits}f}" if seeds > 1 else ""
    return f"{stat['mean']:.{digits}f}{over_seeds} ({stat['ci95_prompts']:.{digits}f})"


#: this claim's labels → eval.paper.PUBLISHED's rows (docs/paper-numbers.md, checked cell for cell by a test)
PAPER_LABELS = {"sft": "sft", "ppo": "ppo", "rule": "rule", "gfn-tb": "tb", "pag": "pag",
                "pag-no-reset": "pag, no reactivation", "pag-no-prt": "pag, no prioritised replay",
                "pag-no-fl": "pag, no FL (DB)"}


def paper_rows(cell: str) -> dict[str, tuple[float, float]]:
    """The paper's (reward, diversity) per label in one column of its tables: ALL_SETS (the main comparison) or
    "coco" (the ablation)."""
    from eval.paper import PUBLISHED

    out = {}
    for label, row in PAPER_LABELS.items():
        ref = PUBLISHED["table"][row].get(cell)
        if ref:
            out[label] = (ref["reward"], ref["diversity"])
    return out


def table(stats: dict[str, dict[str, Any]], labels: Sequence[str], paper: dict[str, tuple[float, float]]) -> list[str]:
    lines = ["| method | reward | text diversity | image diversity | modes (pictures) | modes (words) | taste | "
             "paper reward / diversity |", "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        row = stats[label]
        ref = paper.get(label)
        n = row["seeds"]
        lines.append(f"| {label} | {_cell(row['reward'], n)} | {_cell(row['text_diversity'], n)} | "
                     f"{_cell(row['image_diversity'], n)} | {_cell(row['modes_pictures'], n, 2)} | "
                     f"{_cell(row['modes_text'], n, 2)} | {_cell(row['taste'], n)} | "
                     f"{f'{ref[0]:.2f} / {ref[1]:.2f}' if ref else '–'} |")
    return lines


ANALYSIS_START, ANALYSIS_END = "<!-- analysis: kept when the script rewrites this file -->", "<!-- /analysis -->"


def write_report(summary: dict[str, Any], labels: Sequence[str], args) -> Path:
    """docs/results-mini.md: both tables per decode beside the paper's, flow dormancy, targets, PPO's sweep, the
    pictures; a hand-written analysis between the ANALYSIS markers survives a rerun."""
    path = args.docs / "results-mini.md"
    old = path.read_text() if path.is_file() else ""
    analysis = (old[old.index(ANALYSIS_START):old.index(ANALYSIS_END) + len(ANALYSIS_END)]
                if ANALYSIS_START in old and ANALYSIS_END in old else f"{ANALYSIS_START}\n{ANALYSIS_END}")
    sweep = summary["ppo_sweep"]
    lines = ["# The paper's two tables in the miniature world", "",
             f"`{summary['command']}` -- {summary['seconds'] / 60:.0f} min on this machine; seeds {summary['seeds']}, "
             f"{summary['steps']} learner steps per run (batch and everything else: preset `mini`), the first "
             f"{summary['prompts']} held-out prompts (world_heldout.txt) × {summary['rewrites']} rewrites, 3 pictures "
             "each. bench/claim_mini.py's docstring says what each step does.", "",
             "Cells: mean ± 95 % CI over seeds (Student t; the CI over prompts in brackets); the untrained rows "
             "(plain, rule, sft) have one seed: mean (CI over prompts). *Reward* is eval's (aesthetic gain + "
             "relevance); *modes* count how many of the world's five taste modes a prompt's rewrites reach, in "
             f"their pictures (≥ {PICTURE_SHARE:.0%} of a rewrite's pictures read in the mode by the world's attribute "
             "reader) and in their words (all three of a mode's values named); *taste* is the hidden aesthetic the "
             "reader sees. The paper's column is docs/paper-numbers.md (its diversity is the paper's own measure).", ""]
    main_ref, abl_ref = paper_rows("4 sets (mean)"), paper_rows("coco")
    for decode, stats in summary["results"].items():
        name = "sampled (T = 1)" if decode == "sample" else "diverse beam search (16 groups)"
        lines += [f"## Table 1 -- methods, {name}", "", *table(stats, [x for x in MAIN_ROWS if x in stats], main_ref),
                  "", f"## Table 2 -- ablations, {name}", "",
                  *table(stats, [x for x in ABLATION_ROWS if x in stats], abl_ref), ""]
    if summary["flow_dormant"]:
        lines += ["## The flow head's dormant units", "", "τ-dormant ratio (τ = 0.1) of the flow head's hidden units, "
                  "first and last probe of a run and its peak, mean over seeds (PPO trains no flow head).", "",
                  "| method | first | last | peak |", "|---|---|---|---|"]
        lines += [f"| {m} | {d['first']:.3f} | {d['last']:.3f} | {d['max']:.3f} |"
                  for m, d in summary["flow_dormant"].items()]
        lines.append("")
    if summary["ppo_sweep"]["reward"]:
        kl, lr = sweep["best"]
        lines += ["## PPO's sweep", "", f"Seed {sweep['seed']}, held-out sampled reward per KL coefficient and "
                  "learning rate: " + ", ".join(f"{label}: {r:.3f}" for label, r in sweep["reward"].items())
                  + f" -- the best, kl_coef {kl:g} at lr {lr:g}, is PPO for every seed.", ""]
    if summary["targets"]:
        lines += ["## The issue's targets (sampled rewrites)", ""]
        lines += [f"- {name}: {'met' if t['met'] else '**missed**'} "
                  + ", ".join(f"{k} {v:.3f}" for k, v in t.items() if isinstance(v, float))
                  for name, t in summary["targets"].items()]
        lines.append("")
    if args.grid_prompts:
        lines += ["## Pictures", "", "Each held-out prompt's plain picture, then every method's first 8 sampled "
                  "rewrites (first seed), one picture each from the eval's image-0 noise:", "",
                  "![grid](results-mini/grid.png)", "", "Share of each method's sampled rewrites whose pictures "
                  "reach each mode:", "", "![modes](results-mini/modes.png)", ""]
    lines += ["## What it shows", "", analysis, ""]
    path.write_text("\n".join(lines))
    return path
