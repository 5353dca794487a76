"""A GPT-2 rewriting policy as an eval method: the SFT reference (`sft`), any training run or checkpoint
(`pag:runs/a`, `tb:runs/b`, `ppo:runs/c`), and Promptist (eval/methods/promptist.py).

Decoding is the paper's protocol (`eval.decode`): `beam` — diverse beam search, `eval.rewrites` groups
× `eval.beams_per_group` beams, Hamming penalty, length penalty, `min_new_tokens`..`max_new_tokens`,
deterministic, best first; `sample` — `eval.rewrites` i.i.d. samples at `eval.temperature` from a
generator seeded by (eval.images.seed, prompt) alone, so a prompt's rewrites do not depend on its batch.
Both forbid EOS before `min_new_tokens`.

Input and rewrite follow the run's own format (common/formats.py: `model.input_format`, `sampler.response`):
a `suffix` run conditions on "{template}{stem(x)}," and its rewrite is "stem(x), continuation".
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from common.config import EvalConfig, ModelConfig
from common.formats import PolicyFormat
from eval.methods.base import Method, MethodOutput, Rewrite

log = logging.getLogger(__name__)

#: prompts decoded together (× rewrites rows each)
PROMPTS_PER_BATCH = 8


def prompt_seed(seed: int, prompt: str) -> int:
    """A sampling seed that depends on the eval seed and the prompt's text only."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def load_tokenizer(policy_dir: Optional[str], model_cfg: ModelConfig):
    """The tokenizer saved beside the weights (checkpoints and SFT dirs save one), else the config's."""
    from common.models import build_tokenizer

    if policy_dir and any((Path(policy_dir) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(policy_dir)
        tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return tok
    return build_tokenizer(model_cfg)


class PolicyMethod(Method):
    """Rewrites from a causal LM at `policy_dir` (a Hugging Face directory). The input and the rewrite text
    come from `fmt` (the run's PolicyFormat); an explicit `template` (Promptist's own) replaces the input
    template and implies full-text responses."""

    def __init__(self, name: str, policy_dir: str, model_cfg: ModelConfig, ev: EvalConfig, *,
                 fmt: Optional[PolicyFormat] = None, template: Optional[str] = None, device: str = "cpu",
                 source: str = "") -> None:
        from common.formats import TEMPLATES
        from common.models import build_policy

        if template is not None and fmt is not None and fmt.response != "full":
            raise ValueError("PolicyMethod: an explicit template is only for full-text responses")
        self.fmt = fmt or PolicyFormat(model_cfg.input_format)
        self.explicit_template = template is not None
        self.template = template if template is not None else TEMPLATES[self.fmt.input_format]
        self.name, self.policy_dir, self.ev = name, str(policy_dir), ev
        self.source = source or str(policy_dir)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(self.policy_dir, model_cfg)
        base = model_cfg.model_copy(update={"sft_checkpoint": None})
        self.model = build_policy(base, self.tokenizer, checkpoint=self.policy_dir).to(self.device).eval()

    def identity(self) -> dict:
        """What the rewrites depend on: the weights (path and file times) and the decoding settings."""
        files = sorted(Path(self.policy_dir).glob("*.safetensors")) + sorted(Path(self.policy_dir).glob("*.bin"))
        ev = self.ev
        decoding = {"decode": ev.decode, "min": ev.min_new_tokens, "max": ev.max_new_tokens}
        if ev.decode == "beam":
            decoding.update(beams=ev.beams_per_group, diversity=ev.diversity_penalty, length=ev.length_penalty)
        else:
            decoding.update(temperature=ev.temperature, seed=ev.images.seed)
        return {"name": self.name, "policy": str(Path(self.policy_dir).resolve()), "template": self.template,
                "response": self.fmt.response,
                "weights": [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files], **decoding}

    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.explicit_template:  # Promptist's own input, full-text responses
            texts = [self.template.format(prompt=p) for p in prompts]
        else:
            texts = [self.fmt.policy_input(p) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def _texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        eos = self.tokenizer.eos_token_id
        out = []
        for row, m in zip(ids, mask):
            tokens = [t for t in row[m.bool()].tolist() if t != eos]
            out.append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def rewrite(self, prompts: Sequence[str], n: int) -> list[MethodOutput]:
        outputs = []
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            part = list(prompts[start:start + PROMPTS_PER_BATCH])
            texts = self._beam(part, n) if self.ev.decode == "beam" else self._sample(part, n)
            outputs += [MethodOutput(p, [Rewrite(t) for t in ts]) for p, ts in zip(part, texts)]
        return outputs

    def _sample(self, prompts: list[str], n: int) -> list[list[str]]:
        """n sampled rewrites of each prompt, its generator seeded by (eval seed, prompt) alone: the same
        prompt gets the same rewrites whichever other prompts share its batch or were cached before."""
        from common.decoding import sample

        out = []
        for prompt in prompts:
            ids, mask = self._encode([prompt] * n)
            gen = torch.Generator(self.device).manual_seed(prompt_seed(self.ev.images.seed, prompt))
            resp, rmask = sample(self.model, ids, mask, self.ev.max_new_tokens, self.ev.min_new_tokens,
                                 self.ev.temperature, self.tokenizer.eos_token_id, generator=gen)
            out.append([self.fmt.rewrite(prompt, t) for t in self._texts(resp, rmask)])
        return out

    def _beam(self, prompts: list[str], n: int) -> list[list[str]]:
        from common.beam_search import diverse_beam_search

        ids, mask = self._encode(prompts)
        ev = self.ev
        out_ids, out_mask, scores = diverse_beam_search(
            self.model, ids, mask, num_groups=n, beams_per_group=ev.beams_per_group,
            diversity_penalty=ev.diversity_penalty, length_penalty=ev.length_penalty,
            min_new_tokens=ev.min_new_tokens, max_new_tokens=ev.max_new_tokens, eos_id=self.tokenizer.eos_token_id)
        B, R = out_ids.shape[:2]
        order = scores.argsort(dim=1, descending=True)  # (B, R): best first, whatever order it returned
        texts = []
        for b in range(B):
            rows = order[b, :n]
            texts.append([self.fmt.rewrite(prompts[b], t) for t in self._texts(out_ids[b, rows], out_mask[b, rows])])
        return texts

    def close(self) -> None:
        del self.model
