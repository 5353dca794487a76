"""Turn gathered records into the paper's table: `tabulate` (metrics per prompt, then mean ± 95 % CI)
and `write_report` → report.md, results.json, rewrites.jsonl, scatter.png, grid_<set>.png."""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from eval.methods import MethodOutput
from eval.metrics import prompt_metrics, rewrite_scores, summarize
from eval.runner import EvalData
from scoring.reward import baseline_text

log = logging.getLogger(__name__)

#: schema of results.json; bump when its layout changes
RESULTS_SCHEMA = 1
#: the table's columns: (metric key, header)
COLUMNS = [("reward", "reward"), ("aes_gain", "aesthetic gain"), ("rel", "relevance"),
           ("text_diversity", "text diversity"), ("image_diversity", "image diversity")]


def tabulate(data: EvalData) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results dict for results.json, one row per rewrite for rewrites.jsonl)."""
    cfg = data.cfg
    encoder = data.stats["text_encoder_obj"]
    all_texts = sorted({r.text for per_set in data.outputs.values() for outs in per_set.values()
                        for o in outs for r in o.rewrites})
    text_emb = dict(zip(all_texts, encoder.encode(all_texts))) if all_texts else {}

    table: dict[str, dict[str, Any]] = {}
    per_prompt: dict[str, dict[str, list]] = {}
    rows_out: list[dict[str, Any]] = []
    failures: dict[str, int] = {}
    for label, per_set in data.outputs.items():
        table[label], per_prompt[label] = {}, {}
        for set_name, outs in per_set.items():
            rows = []
            for out in outs:
                row, lines, failed = _score_prompt(data, label, set_name, out, text_emb)
                rows_out += lines
                if failed:
                    failures[label] = failures.get(label, 0) + failed
                if row is not None:
                    rows.append(row)
            per_prompt[label][set_name] = rows
            table[label][set_name] = summarize([{k: v for k, v in r.items() if isinstance(v, float)} for r in rows])
    ev = cfg.eval
    results = {
        "schema": RESULTS_SCHEMA, "name": cfg.run.name, "preset": cfg.preset,
        "methods": [{"label": s.label, "kind": s.kind, "source": s.raw, "weights": s.path} for s in data.specs],
        "sets": {name: len(p) for name, p in data.sets.items()},
        "text_encoder": data.text_encoder, "image_encoder": f"open_clip {cfg.model.clip_arch}/{cfg.model.clip_pretrained}",
        "render_id": data.render_id, "target_model": cfg.model.sd, "eval": ev.model_dump(mode="json"),
        "reward": {"clip_threshold": cfg.reward.clip_threshold, "clip_weight": cfg.reward.clip_weight},
        "stats": {k: v for k, v in data.stats.items() if k != "text_encoder_obj"},
        "failures": failures, "table": table, "per_prompt": per_prompt,
    }
    from eval.ipgo_report import collect
    from eval.paper import published

    ipgo = collect(data.outputs)
    if ipgo:  # training-noise / held-out-seed reward and cost of the IPGO methods (eval/ipgo_report.py)
        results["ipgo"] = ipgo
    ref = published(cfg)
    if ref:
        results["paper"] = ref
    return results, rows_out


def _score_prompt(data: EvalData, label: str, set_name: str, out: MethodOutput,
                  text_emb: dict[str, np.ndarray]) -> tuple[Optional[dict[str, Any]], list[dict[str, Any]], int]:
    """One prompt's rewrites by one method → (its metrics row, None when no rewrite was scored;
    one line per rewrite for rewrites.jsonl, with `error` where it was not scored; how many were not)."""
    thr, weight = data.cfg.reward.clip_threshold, data.cfg.reward.clip_weight
    base = baseline_text(data.cfg, out.prompt)
    plain = data.records.get((base, base))
    scored, texts, images, inception, lines = [], [], [], [], []
    for rank, rw in enumerate(out.rewrites):
        key = (base, rw.render_key())
        rec = data.records.get(key)
        line: dict[str, Any] = {"set": set_name, "method": label, "prompt": out.prompt, "rank": rank, "text": rw.text}
        if rec is None or plain is None:
            line["error"] = data.errors.get(key) or data.errors.get((base, base)) or "not scored"
        else:
            s = rewrite_scores(plain, rec, thr, weight, data.cfg.eval.reward_metric)
            line.update(s)
            scored.append(s)
            texts.append(rw.text)
            images.append(rec["emb"])
            if rec.get("inc") is not None:
                inception.append(rec["inc"])
        lines.append(line)
    failed = len(lines) - len(scored)
    if not scored:
        return None, lines, failed
    inc = np.concatenate(inception) if inception and len(inception) == len(images) else None
    m = prompt_metrics(scored, np.stack([text_emb[t] for t in texts]), np.concatenate(images), inc)
    return {"prompt": out.prompt, "rewrites": len(scored), **m}, lines, failed


def _fmt(cell: Optional[dict[str, float]]) -> str:
    if not cell or not math.isfinite(cell.get("mean", float("nan"))):
        return "—"
    return f"{cell['mean']:.3f} ± {cell['ci95']:.3f}"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _decode_png(blob: Optional[bytes], size: int) -> np.ndarray:
    if not blob:
        return np.full((size, size, 3), 200, dtype=np.uint8)  # a grey tile: not rendered
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"))


def write_grids(data: EvalData, out_dir: Path) -> list[str]:
    """grid_<set>.png: columns = the first eval.grid_prompts prompts; row 1 the plain prompt's image 0,
    then per method the image 0 of its first (best-ranked) rewrite."""
    from common.images import image_grid

    size, names = data.cfg.eval.thumb_size, []
    for set_name, prompts in data.sets.items():
        shown = prompts[: data.cfg.eval.grid_prompts]
        bases = [baseline_text(data.cfg, p) for p in shown]
        rows = [("plain prompt", [_decode_png((data.records.get((b, b)) or {}).get("thumb"), size) for b in bases])]
        plain_labels = {s.label for s in data.specs if s.kind == "plain"}  # the first row already shows it
        for label, per_set in data.outputs.items():
            if label in plain_labels:
                continue
            tiles = []
            for out in per_set[set_name][: len(shown)]:
                key = (baseline_text(data.cfg, out.prompt), out.rewrites[0].render_key()) if out.rewrites else None
                rec = data.records.get(key) if key else None
                tiles.append(_decode_png((rec or {}).get("thumb"), size))
            rows.append((label, tiles))
        name = f"grid_{set_name}.png"
        image_grid(rows, out_dir / name, tile=size)
        names.append(name)
    return names


def write_scatter(results: dict[str, Any], path: Path) -> None:
    """Reward against text diversity, one point per (method, set) with 95 % CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = "osD^vP*X"
    sets = list(results["sets"])
    for i, (label, per_set) in enumerate(results["table"].items()):
        color = f"C{i % 10}"
        for j, set_name in enumerate(sets):
            cell = per_set.get(set_name) or {}
            if "reward" not in cell:
                continue
            x, y = cell["text_diversity"], cell["reward"]
            ax.errorbar(x["mean"], y["mean"], xerr=x["ci95"], yerr=y["ci95"], fmt=markers[j % len(markers)],
                        color=color, capsize=2, label=label if j == 0 else None)
    for j, set_name in enumerate(sets):
        ax.plot([], [], markers[j % len(markers)], color="grey", label=set_name)
    ax.set_xlabel(f"text diversity ({results['text_encoder'].split(' (')[0]})")
    ax.set_ylabel("reward (aesthetic gain + relevance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _preamble(data: EvalData, results: dict[str, Any]) -> list[str]:
    """report.md's title and how the numbers were made: sets, decoding, images, relevance, cache, methods."""
    cfg, ev, st = data.cfg, data.cfg.eval, data.stats
    decode = (f"diverse beam search ({ev.rewrites} groups × {ev.beams_per_group} beam, diversity penalty "
              f"{ev.diversity_penalty}, length penalty {ev.length_penalty})" if ev.decode == "beam" else
              f"{ev.rewrites} i.i.d. samples at temperature {ev.temperature}")
    return [f"# Evaluation `{cfg.run.name}`", "",
            f"Preset `{cfg.preset}`; sets: " + ", ".join(f"`{s}` ({n})" for s, n in results["sets"].items())
            + f"; rewrites: {decode}, {ev.min_new_tokens}–{ev.max_new_tokens} new tokens.",
            f"Images: rendered by `{cfg.model.sd}`, {ev.images.per_prompt} per text, {ev.images.steps} steps "
            f"(DPM-Solver++ for SD v1.x, the pipeline's own scheduler otherwise), guidance {cfg.render.guidance}, "
            f"{cfg.model.image_size}², image i from the noise of seed {ev.images.seed} + i for every text "
            "(the plain prompt is rendered as written, without the policy's template).",
            f"Relevance: mean over images of {cfg.reward.clip_weight:g}·min(0, max(0, cos) − {cfg.reward.clip_threshold:g}). "
            f"Text diversity encoder: **{data.text_encoder}**; image diversity: CLIP image embeddings "
            f"({results['image_encoder']}).",
            f"Cache: {st.get('cache_hits', 0)} of {st.get('items', 0)} texts from the cache, {st.get('rendered', 0)} "
            f"rendered on {st.get('workers', 1)} worker(s)"
            + (f" at {st['images_per_s']:.2f} images/s" if st.get("images_per_s") else "") + ".", "",
            "Methods: " + ", ".join(f"`{m['label']}` ({m['source']})" for m in results["methods"]), ""]


def write_report(data: EvalData, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    results, rows = tabulate(data)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    with open(out_dir / "rewrites.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    write_scatter(results, out_dir / "scatter.png")
    grids = write_grids(data, out_dir)

    ev = data.cfg.eval
    extra = [name for name in ev.scorers]
    extra_keys = sorted({k for per_set in results["table"].values() for cell in per_set.values() for k in cell}
                        - {c for c, _ in COLUMNS} - {"aes", "clip"})
    lines = [*_preamble(data, results), "## Results (mean ± 95 % CI over prompts)", "",
             "| method | set | " + " | ".join(h for _, h in COLUMNS) + "".join(f" | {k}" for k in extra_keys) + " |",
             "|---|---|" + "---|" * (len(COLUMNS) + len(extra_keys))]
    for set_name in results["sets"]:
        for label, per_set in results["table"].items():
            cell = per_set.get(set_name) or {}
            lines.append(f"| {label} | {set_name} | " + " | ".join(_fmt(cell.get(c)) for c, _ in COLUMNS)
                         + "".join(f" | {_fmt(cell.get(k))}" for k in extra_keys) + " |")
    if extra:
        lines += ["", f"Extra scorers ({', '.join(extra)}) judge a rewrite's images against the "
                      f"{'plain prompt' if ev.score_against == 'plain' else 'rewrite itself (the official variant)'}; "
                      f"`<scorer>_gain` is the rewrite's score minus the baseline images' score."]
    if ev.reward_metric == "imagereward":
        lines += ["", "`reward` is ImageReward's gain over the baseline images plus relevance (eval.reward_metric="
                      "imagereward, as the official eval.py --reward_metric imagereward), not the aesthetic gain."]
    if "image_similarity_inception" in extra_keys:
        lines += ["", "`image_similarity_inception` is the official eval's image measure (eval.py:372-381): the mean "
                      "pairwise cosine *similarity* of InceptionV3 pool-3 features (higher: less diverse; "
                      "eval/inception.py); `image diversity` is ours, 1 − the same over CLIP image embeddings."]
    if results["failures"]:
        lines += ["", "**Failed rewrites** (not in the means; see rewrites.jsonl `error`): "
                  + ", ".join(f"{k}: {v}" for k, v in results["failures"].items())]
    if "ipgo" in results:
        from eval.ipgo_report import markdown

        lines += ["", *markdown(results, extra_keys)]
    if "paper" in results:
        from eval.paper import paper_table

        lines += ["", *paper_table(results["paper"])]
    lines += ["", "## Reward against text diversity", "", "![scatter](scatter.png)", "",
              "## Images", "", f"Columns: the first {ev.grid_prompts} prompts of each set; rows: the plain prompt, "
              "then each method's first rewrite (image 0, the same noise in every row).", ""]
    for name in grids:
        lines += [f"### {name[5:-4]}", "", f"![{name}]({name})", ""]
    lines += ["## Eval config", "", "```yaml", yaml.safe_dump({"eval": ev.model_dump(mode="json")}, sort_keys=False).rstrip(),
              "```", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"
