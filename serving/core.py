"""What `pag serve` does, as plain classes: load a run's policy and rewrite prompts (sampling or the paper's
diverse beam search, the code `pag eval` decodes with), render and score rewrites against the plain prompt
(the reward workers' renderer and scorers), and the HTTP request schema with its limits.

    rewriter = Rewriter.from_run(Path("runs/a"))
    texts = rewriter.rewrite([RewriteRequest(prompt="a cat", n=4)])[0]
    judge = Judge(rewriter.cfg)
    cards = judge.judge("a cat", texts)   # {"plain": {...}, "rewrites": [{...}, ...]}
    refined = Refiner(rewriter.cfg).refine(texts[0], iterations=10)   # IPGO: before/after pictures, reward curve
"""
from __future__ import annotations

import base64
import functools
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.config import Config, read_saved
from common.images import png_bytes
from common.runs import resolve_checkpoint

#: most rewrites one request may ask for (beam search runs n groups; sampling n rows)
MAX_REWRITES = 16
#: Stable Diffusion's text encoder reads 77 tokens (with its start and end tokens): a longer prompt is cut
MAX_CLIP_TOKENS = 77
#: most IPGO iterations one refinement may run (each renders and backpropagates through the sampler's last steps)
MAX_REFINE_ITERATIONS = 50


class RewriteRequest(BaseModel):
    """`POST /v1/rewrite`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=2000, description="the plain prompt to rewrite")
    n: int = Field(4, ge=1, le=MAX_REWRITES, description=f"rewrites to return (1-{MAX_REWRITES})")
    decode: Literal["sample", "beam"] = Field("sample", description="i.i.d. samples, or diverse beam search "
                                                                     "(the paper's eval: deterministic, best first)")
    temperature: float = Field(1.0, gt=0, le=5, description="sampling temperature (decode=sample)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed (decode=sample); same seed, same rewrites")
    render: bool = Field(False, description="render and score the plain prompt and every rewrite")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return stripped(value, "prompt is blank: give the words to rewrite")


class RefineRequest(BaseModel):
    """`POST /v1/refine`: IPGO on one chosen rewrite (learned tokens around its text encoding, not new words)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=2000, description="the rewrite (or any prompt) to refine")
    iterations: int = Field(10, ge=1, le=MAX_REFINE_ITERATIONS,
                            description=f"IPGO iterations (1-{MAX_REFINE_ITERATIONS}); the best one is kept")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return stripped(value, "text is blank: give the rewrite to refine")


def stripped(value: str, blank: str) -> str:
    """`value` without surrounding whitespace; ValueError(`blank`) when nothing is left."""
    if not value.strip():
        raise ValueError(blank)
    return value.strip()


def clip_token_count(prompt: str) -> int:
    """Tokens Stable Diffusion's text encoder would read, with its start and end tokens."""
    return len(_counting_tokenizer()(prompt)["input_ids"])


@functools.lru_cache(maxsize=1)
def _counting_tokenizer():
    """One CLIP tokenizer per process for counting: building it reads and sorts 49k merges (the ingress
    rebuilt it for every request and spent as much CPU on that as the policy on decoding, bench/serve.py)."""
    from common.models import clip_tokenizer

    return clip_tokenizer()


class Rewriter:
    """A run's policy, decoding as `pag eval` does (eval/methods/policy.py) with each request's settings."""

    def __init__(self, cfg: Config, policy_dir: Path, device: str = "cpu") -> None:
        from common.formats import PolicyFormat
        from eval.methods.policy import PolicyMethod

        self.cfg, self.policy_dir = cfg, Path(policy_dir)
        self.method = PolicyMethod("serve", str(policy_dir), cfg.model, cfg.eval, fmt=PolicyFormat.from_config(cfg),
                                   device=device)

    @classmethod
    def from_run(cls, path: Path, device: str = "cpu") -> "Rewriter":
        run_dir, ckpt = resolve_checkpoint(path)
        return cls(Config.model_validate(read_saved(run_dir / "config.yaml")), ckpt / "policy", device)

    def rewrite(self, requests: Sequence[RewriteRequest]) -> list[list[str]]:
        """The rewrites of each request, in order; requests with the same decoding run as one batch."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            key = (req.decode, req.n) if req.decode == "beam" else (req.decode, req.n, req.temperature, req.seed)
            groups[key].append(i)
        from common.rewriting import Decoding

        out: list[list[str]] = [[] for _ in requests]
        for rows in groups.values():
            first = requests[rows[0]]
            decoding = Decoding.from_eval(self.cfg.eval, decode=first.decode, temperature=first.temperature,
                                          seed=first.seed)
            for i, texts in zip(rows, self.method.rewriter.rewrite([requests[i].prompt for i in rows], first.n,
                                                                   decoding)):
                out[i] = texts
        return out


def _png(image: torch.Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


class Judge:
    """Render the plain prompt's baseline and each rewrite on the same noise, score them as the reward
    workers do: aesthetic gain over the baseline plus the CLIP relevance penalty, per rewrite."""

    def __init__(self, cfg: Config, device: Optional[str] = None) -> None:
        from scoring.render import build_reward_models

        self.cfg = cfg
        self.models = build_reward_models(cfg, device)
        if self.models.renderer is None:
            raise ValueError("reward.render=false: this run scores texts only; serve it without rendering "
                             "(pag serve --no-render)")

    @torch.no_grad()
    def judge(self, plain: str, rewrites: Sequence[str]) -> dict[str, Any]:
        from scoring.reward import PENALTIES, baseline_text, per_text_scores, reward_parts

        renderer = self.models.renderer
        base = baseline_text(self.cfg, plain)
        texts, k = [base, *rewrites], renderer.k
        images = renderer(texts)
        per_image = self.models.score_fn(images, [base] * len(images), [t for t in texts for _ in range(k)])
        means = per_text_scores(per_image, len(texts), k, self.cfg.reward)
        rows = [{name: float(m[j]) for name, m in means.items()} for j in range(len(texts))]
        plain_scores = {name: value for name, value in rows[0].items() if name not in PENALTIES}
        cards = []
        for j, text in enumerate(rewrites, start=1):
            cards.append({"text": text, "scores": {**rows[j], **reward_parts(rows[j], plain_scores)},
                          "images": [_png(img) for img in images[j * k:(j + 1) * k]]})
        return {"plain": {"text": base, "scores": plain_scores, "images": [_png(img) for img in images[:k]]},
                "rewrites": cards}


class Refiner:
    """IPGO on a chosen rewrite (ipgo/optimize.py, prompt-wise, the run's `ipgo` settings): a few learned tokens
    around its text encoding, trained by the gradient of the IPGO reward through the sampler's last steps on
    the run's fixed IPGO noise; the best iterate's picture beside the rewrite's own, with the reward curve."""

    def __init__(self, cfg: Config, device: Optional[str] = None) -> None:
        from common.models import resolve_device
        from ipgo.optimize import build_models

        self.cfg = cfg
        self.models = build_models(cfg, resolve_device(device or cfg.run.device))

    def refine(self, text: str, iterations: int) -> dict[str, Any]:
        from ipgo.optimize import optimize_prompt

        result = optimize_prompt(self.models, text, iterations)
        return {"text": text, "iterations": iterations, "reward_terms": list(self.cfg.ipgo.reward),
                "initial_reward": result.initial_reward, "best_reward": result.best_reward,
                "best_iteration": result.best_iteration, "curve": result.curve, "truncated": result.truncated,
                "seconds": round(result.seconds, 3),
                "images": {"before": _png(result.initial_image), "after": _png(result.best_image)}}
