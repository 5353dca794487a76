"""`promptist:DIR`: Promptist (Hao et al., 2023), Microsoft's PPO-trained GPT-2 prompt optimiser, from a
local copy of the public checkpoint (`hf download microsoft/Promptist --local-dir DIR`).

Its input is `"{prompt} Rephrase:"` (common/formats.py `TEMPLATES["promptist"]`) — without the newline
PAG's policy uses, as in Promptist's model card. The checkpoint ships no tokenizer: the GPT-2 tokenizer
packaged with this project is used unless DIR holds one. Decoding follows the eval protocol like every other policy.
"""
from __future__ import annotations

from common.config import Config
from common.formats import TEMPLATES
from eval.methods.policy import PolicyMethod
from eval.spec import MethodSpec


def build(spec: MethodSpec, cfg: Config, device: str = "cpu") -> PolicyMethod:
    # kind=pretrained with the packaged GPT-2 tokenizer files: offline, and the vocabulary Promptist was trained with
    from common.models import GPT2_TOKENIZER_DIR

    model_cfg = cfg.model.model_copy(update={"kind": "pretrained", "tokenizer": str(GPT2_TOKENIZER_DIR),
                                             "sft_checkpoint": None})
    return PolicyMethod(spec.label, spec.path, model_cfg, cfg.eval, template=TEMPLATES["promptist"],
                        device=device, source=spec.raw)
