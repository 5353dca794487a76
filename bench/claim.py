"""Issue 13's experiment on the `tiny-proxy` preset: does reward-maximising RL collapse while PAG stays diverse?

    PYTHONPATH=$PWD python bench/claim.py --seeds 1 2 3 --steps 120 --out runs/claim   # JSON + claim.md

`--preset mini` runs issue 20's instead, the paper's two tables in the miniature world (bench/claim_mini.py,
`python bench/claim.py --preset mini --help`).

For each seed, PAG (`learner.objective=fl-db`), the vanilla GFlowNet (`tb`) and PPO (`ppo`, on-policy:
`learner.replay_ratio=0`) are trained with `pag train --preset tiny-proxy --steps N` (the real pipeline:
samplers → Redis → reward workers → replay → learner); SFT is the shared starting checkpoint. Each policy then
rewrites `--prompts` held-out plain captions (the EVAL split of coco_all, never trained on) `--rewrites`
times, by sampling (T = `--temperature`) and by diverse beam search (the paper's protocol: one beam per
group, Hamming penalty 1.0, length penalty −1.0), in the preset's suffix mode. Every rewrite is scored with
the preset's own reward (style gain + relevance_text hinge, scoring/style.py) and the prompt's rewrites give:

- text diversity: 1 − mean off-diagonal cosine of their all-MiniLM-L6-v2 embeddings
- distinct suffixes: how many different continuations (the text after "x, ") among them

Reported per method as mean ± sd over seeds, plus the most frequent suffixes. The issue's targets: PAG's
diversity ≥ 2× PPO's at a reward ≥ 90 % of PPO's, both rewards above SFT's.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

METHODS = {"pag": ["learner.objective=fl-db"], "tb": ["learner.objective=tb"],
           "ppo": ["learner.objective=ppo", "learner.replay_ratio=0"]}


def train(method: str, seed: int, steps: int, out: Path) -> Path:
    """One `pag train` run; returns its run directory (reused if it already finished)."""
    run_dir = out / "runs" / f"{method}-s{seed}"
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_dir
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = str(out / "ray")  # a private local Ray per run, even where a `ray start` cluster is up
    cmd = [sys.executable, "-m", "pag.cli", "train", "--preset", "tiny-proxy", "--steps", str(steps),
           "--run-name", run_dir.name, "--runs-dir", str(out / "runs"), "--no-report", f"run.seed={seed}",
           *METHODS[method]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return run_dir


class Judge:
    """The preset's reward and the diversity measures, on CPU."""

    def __init__(self, cfg) -> None:
        from scoring.scorers import build_scorers

        self.cfg = cfg
        self.score = build_scorers(cfg.reward.scorers, cfg.model)

    def __call__(self, plain: str, rewrites: list[str]) -> dict:
        from common.formats import stem
        from scoring.style import text_relevance

        s = self.score(None, [plain] * (len(rewrites) + 1), [plain] + rewrites)
        rel = text_relevance(s["text_cos"][1:].double(), self.cfg.reward.text_threshold, self.cfg.reward.text_weight)
        reward = (s["style"][1:].double() - float(s["style"][0]) + rel).numpy()
        return {"reward": float(reward.mean()),
                "suffixes": [r[len(stem(plain)) + 2:] if r.startswith(stem(plain) + ", ") else r for r in rewrites]}


def diversity(encoder, texts: list[str]) -> float:
    emb = encoder.encode(texts)
    sim = emb @ emb.T
    n = len(texts)
    return float(1 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))


def rewrites_of(cfg, policy, tok, prompts: list[str], n: int, decode: str, temperature: float, seed: int) -> list[list[str]]:
    from common.beam_search import diverse_beam_search
    from common.decoding import encode_prompts, sample
    from common.formats import PolicyFormat

    fmt, s, eos = PolicyFormat.from_config(cfg), cfg.sampler, tok.eos_token_id
    out = []
    for i, plain in enumerate(prompts):
        ids, mask = encode_prompts(tok, [plain], torch.device("cpu"), fmt)
        with torch.no_grad():
            if decode == "beam":
                resp, rmask, _ = diverse_beam_search(policy, ids, mask, num_groups=n, beams_per_group=1,
                                                     diversity_penalty=1.0, length_penalty=-1.0,
                                                     min_new_tokens=s.min_len, max_new_tokens=s.max_len, eos_id=eos)
                resp, rmask = resp[0], rmask[0]
            else:
                gen = torch.Generator().manual_seed(seed * 100_003 + i)
                resp, rmask = sample(policy, ids.repeat(n, 1), mask.repeat(n, 1), s.max_len, s.min_len,
                                     temperature, eos, generator=gen)
        out.append([fmt.rewrite(plain, tok.decode([t for t in row[m.bool()].tolist() if t != eos]))
                    for row, m in zip(resp, rmask)])
    return out


def evaluate(cfg, policy_dir: str, prompts, n: int, temperature: float, seed: int, judge, encoder) -> dict:
    from common.models import build_policy, build_tokenizer

    tok = build_tokenizer(cfg.model)
    policy = build_policy(cfg.model.model_copy(update={"sft_checkpoint": None}), tok, checkpoint=policy_dir).eval()
    result = {}
    for decode in ("sample", "beam"):
        rows = rewrites_of(cfg, policy, tok, prompts, n, decode, temperature, seed)
        judged = [judge(p, r) for p, r in zip(prompts, rows)]
        suffixes = [s for j in judged for s in j["suffixes"]]
        result[decode] = {
            "reward": float(np.mean([j["reward"] for j in judged])),
            "diversity": float(np.mean([diversity(encoder, r) for r in rows])),
            "distinct_suffixes": float(np.mean([len(set(j["suffixes"])) for j in judged])),
            "top_suffixes": collections.Counter(suffixes).most_common(5),
        }
    return result


def main(argv=None) -> None:
    from common.config import load_config
    from common.data import load_prompts
    from common.runs import latest_checkpoint
    from sft.cache import ensure_sft

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=120, help="learner steps per training run")
    p.add_argument("--methods", default="pag,tb,ppo")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--rewrites", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", default="runs/claim")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("tiny-proxy")
    start = time.perf_counter()
    sft = ensure_sft(cfg)
    prompts = load_prompts("coco_all", "eval").prompts[: args.prompts]
    judge = Judge(cfg)
    from common.models import build_sentence_encoder

    encoder = build_sentence_encoder(cfg.model)
    results: dict = {"sft": {}, **{m: {} for m in args.methods.split(",")}}
    for seed in args.seeds:
        results["sft"][seed] = evaluate(cfg, sft, prompts, args.rewrites, args.temperature, seed, judge, encoder)
        for method in args.methods.split(","):
            run_dir = train(method, seed, args.steps, out)
            results[method][seed] = evaluate(cfg, str(latest_checkpoint(run_dir) / "policy"), prompts,
                                             args.rewrites, args.temperature, seed, judge, encoder)
    summary = {"seeds": args.seeds, "steps": args.steps, "prompts": len(prompts), "rewrites": args.rewrites,
               "temperature": args.temperature, "seconds": round(time.perf_counter() - start, 1), "results": results}
    (out / "claim.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"Seeds {args.seeds}, {args.steps} learner steps, {len(prompts)} held-out prompts × {args.rewrites} rewrites",
             "", "| method | decode | reward | text diversity | distinct suffixes | top suffix |", "|---|---|---|---|---|---|"]
    for method, per_seed in results.items():
        for decode in ("sample", "beam"):
            rows = [per_seed[s][decode] for s in args.seeds]
            stat = lambda k: f"{statistics.mean(r[k] for r in rows):.3f} ± {statistics.pstdev(r[k] for r in rows):.3f}"  # noqa: E731
            top = rows[0]["top_suffixes"][0] if rows[0]["top_suffixes"] else ("", 0)
            lines.append(f"| {method} | {decode} | {stat('reward')} | {stat('diversity')} | {stat('distinct_suffixes')} "
                         f"| {top[0][:40].replace('|', '/')} ({top[1]}) |")
    (out / "claim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--preset", choices=["tiny-proxy", "mini"], default="tiny-proxy")
    known, rest = which.parse_known_args()
    if known.preset == "mini":
        root = Path(__file__).resolve().parents[1]
        # run as a script, bench/ heads sys.path, where bench/world.py would shadow the `world` package
        sys.path[:] = [str(root)] + [p for p in sys.path if Path(p or ".").resolve() != root / "bench"]
        from bench import claim_mini

        claim_mini.main(rest)
    else:
        main(rest)
