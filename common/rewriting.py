"""Rewrites of plain prompts from a policy: i.i.d. samples seeded per prompt, or the paper's diverse beam
search. The one decoding `pag eval` (eval/methods/policy.py), `pag adapt` and `pag serve` share.

    rewriter = PromptRewriter(model, tokenizer, PolicyFormat("pag"))
    rewriter.rewrite(["a cat"], 4, Decoding.from_eval(cfg.eval))   # [[4 rewrites of "a cat"]]

`sample`: a prompt's generator is seeded by (decoding seed, prompt) alone, so its rewrites do not depend on
what else shares its batch. `beam`: n groups x `beams_per_group` beams, Hamming penalty, length penalty,
deterministic, best first. Both forbid EOS before `min_new_tokens`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from common.formats import PolicyFormat


def prompt_seed(seed: int, prompt: str) -> int:
    """A sampling seed that depends on the decoding seed and the prompt's text only."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Decoding:
    decode: str = "beam"  # or "sample"
    temperature: float = 1.0
    seed: int = 42
    min_new_tokens: int = 15
    max_new_tokens: int = 75
    beams_per_group: int = 1
    diversity_penalty: float = 1.0
    length_penalty: float = -1.0

    @classmethod
    def from_eval(cls, ev, **changes) -> "Decoding":
        """The `eval.` section's decoding (its seed is `eval.images.seed`), with `changes` applied."""
        fields = dict(decode=ev.decode, temperature=ev.temperature, seed=ev.images.seed,
                      min_new_tokens=ev.min_new_tokens, max_new_tokens=ev.max_new_tokens,
                      beams_per_group=ev.beams_per_group, diversity_penalty=ev.diversity_penalty,
                      length_penalty=ev.length_penalty)
        return cls(**{**fields, **changes})


class PromptRewriter:
    """A causal LM's rewrites. The input and the rewrite text come from `fmt` (the run's PolicyFormat); an
    explicit `template` (Promptist's own) replaces the input template and implies full-text responses."""

    def __init__(self, model, tokenizer, fmt: PolicyFormat, template: Optional[str] = None,
                 device: torch.device | str = "cpu") -> None:
        if template is not None and fmt.response != "full":
            raise ValueError("PromptRewriter: an explicit template is only for full-text responses")
        self.model, self.tokenizer, self.fmt, self.template = model, tokenizer, fmt, template
        self.device = torch.device(device)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.template is not None:
            texts = [self.template.format(prompt=p) for p in prompts]
        else:
            texts = [self.fmt.policy_input(p) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        eos = self.tokenizer.eos_token_id
        out = []
        for row, m in zip(ids, mask):
            tokens = [t for t in row[m.bool()].tolist() if t != eos]
            out.append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def rewrite(self, prompts: Sequence[str], n: int, decoding: Decoding) -> list[list[str]]:
        """n rewrites of each prompt, in order."""
        prompts = list(prompts)
        return self._beam(prompts, n, decoding) if decoding.decode == "beam" else self._sample(prompts, n, decoding)

    def _sample(self, prompts: list[str], n: int, d: Decoding) -> list[list[str]]:
        from common.decoding import sample

        out = []
        for prompt in prompts:
            ids, mask = self.encode([prompt] * n)
            gen = torch.Generator(self.device).manual_seed(prompt_seed(d.seed, prompt))
            resp, rmask = sample(self.model, ids, mask, d.max_new_tokens, d.min_new_tokens, d.temperature,
                                 self.tokenizer.eos_token_id, generator=gen)
            out.append([self.fmt.rewrite(prompt, t) for t in self.texts(resp, rmask)])
        return out

    def _beam(self, prompts: list[str], n: int, d: Decoding) -> list[list[str]]:
        from common.beam_search import diverse_beam_search

        ids, mask = self.encode(prompts)
        out_ids, out_mask, scores = diverse_beam_search(
            self.model, ids, mask, num_groups=n, beams_per_group=d.beams_per_group,
            diversity_penalty=d.diversity_penalty, length_penalty=d.length_penalty,
            min_new_tokens=d.min_new_tokens, max_new_tokens=d.max_new_tokens, eos_id=self.tokenizer.eos_token_id)
        order = scores.argsort(dim=1, descending=True)  # (B, R): best first, whatever order it returned
        texts = []
        for b in range(out_ids.shape[0]):
            rows = order[b, :n]
            texts.append([self.fmt.rewrite(prompts[b], t) for t in self.texts(out_ids[b, rows], out_mask[b, rows])])
        return texts
