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

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from common.config import EvalConfig, ModelConfig
from common.formats import PolicyFormat
from common.rewriting import Decoding, PromptRewriter
from eval.methods.base import Method, MethodOutput, Rewrite

log = logging.getLogger(__name__)

#: prompts decoded together (× rewrites rows each)
PROMPTS_PER_BATCH = 8


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
        self.template = template if template is not None else TEMPLATES[self.fmt.input_format]
        self.name, self.policy_dir, self.ev = name, str(policy_dir), ev
        self.source = source or str(policy_dir)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(self.policy_dir, model_cfg)
        base = model_cfg.model_copy(update={"sft_checkpoint": None})
        self.model = build_policy(base, self.tokenizer, checkpoint=self.policy_dir).to(self.device).eval()
        self.rewriter = PromptRewriter(self.model, self.tokenizer, self.fmt, template, self.device)

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

    @torch.no_grad()
    def rewrite(self, prompts: Sequence[str], n: int) -> list[MethodOutput]:
        decoding = Decoding.from_eval(self.ev)
        outputs = []
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            part = list(prompts[start:start + PROMPTS_PER_BATCH])
            texts = self.rewriter.rewrite(part, n, decoding)
            outputs += [MethodOutput(p, [Rewrite(t) for t in ts]) for p, ts in zip(part, texts)]
        return outputs

    def close(self) -> None:
        del self.model
