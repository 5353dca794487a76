"""What the policy reads and what its tokens mean as a rewrite — one place for sampler, learner, report,
eval and SFT.

Two independent choices (config keys `model.input_format` and `sampler.response`):

input_format  the template around the user's prompt x
    pag        "{x} Rephrase:\\n"   the official PAG code
    promptist  "{x} Rephrase:"     Promptist (microsoft/LMOps), no newline: its checkpoint expects this

response      what the generated tokens y are
    full       y is the whole rewrite: rewrite = decode(y)
    suffix     the policy input ends with a copy of the prompt and a comma, "{template}{stem(x)},", and y
               continues it: rewrite = stem(x) + ", " + decode(y). The policy only writes modifiers, so
               a small policy need not learn to copy the subject (Promptist's and PAG's outputs have
               this shape). Log P_F, teacher forcing and reference log-probs are over y alone: the
               forced "stem(x)," sits in the prompt ids, so every objective sees a shorter response.

stem(x) is x without trailing spaces, periods and commas ("A cat on a sofa." → "A cat on a sofa").

SFT in suffix mode (`sft_target`): the target is the part of the engineered prompt after the plain one —
if the engineered prompt starts with the plain one (ignoring case and trailing punctuation), what follows
it; otherwise its tail after the first separator (`sft.pairs.split_modifiers`); leading separators and
spaces are dropped, and a pair with nothing left is skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

InputFormat = Literal["pag", "promptist"]
ResponseMode = Literal["full", "suffix"]

#: the policy's input templates, defined only here (sampler, learner, SFT, `pag eval`'s Promptist method and
#: the reward's `plain_text` read them)
TEMPLATES: dict[str, str] = {"pag": "{prompt} Rephrase:\n", "promptist": "{prompt} Rephrase:"}
_LEADING_SEPARATORS = re.compile(r"^[\s,;|.\-]+")
_FIRST_SEPARATOR = re.compile(r"\s*(?:,|;|\||--|\.\s)\s*|\s+by\s+", re.IGNORECASE)


def stem(plain: str) -> str:
    """The prompt as the start of its own rewrite: no trailing spaces, periods or commas."""
    return plain.strip().rstrip(" .,;")


@dataclass(frozen=True)
class PolicyFormat:
    """How a plain prompt becomes policy input and how generated text becomes a rewrite."""

    input_format: InputFormat = "pag"
    response: ResponseMode = "full"

    def __post_init__(self) -> None:
        if self.input_format not in TEMPLATES:
            raise ValueError(f"model.input_format = {self.input_format!r}; choose one of {', '.join(TEMPLATES)}")
        if self.response not in ("full", "suffix"):
            raise ValueError(f"sampler.response = {self.response!r}; choose full or suffix")

    @classmethod
    def from_config(cls, cfg) -> "PolicyFormat":
        return cls(cfg.model.input_format, cfg.sampler.response)

    @property
    def is_default(self) -> bool:
        return self == PolicyFormat()

    def policy_input(self, plain: str) -> str:
        """The text the policy conditions on."""
        text = TEMPLATES[self.input_format].format(prompt=plain)
        if self.response == "suffix":
            text += ("" if text[-1].isspace() else " ") + stem(plain) + ","
        return text

    def rewrite(self, plain: str, generated: str) -> str:
        """The rewrite a user (and the renderer) sees, from the decoded generated tokens (EOS excluded)."""
        generated = generated.strip()
        if self.response == "full":
            return generated
        return f"{stem(plain)}, {generated}" if generated else stem(plain)

    def sft_target(self, plain: str, engineered: str) -> Optional[str]:
        """The text the policy must generate for a (plain → engineered) SFT pair; None: skip the pair."""
        if self.response == "full":
            return engineered
        head = stem(plain)
        if engineered.lower().startswith(head.lower()):
            rest = engineered[len(head):]
        else:
            match = _FIRST_SEPARATOR.search(engineered)
            rest = engineered[match.start():] if match else ""
        rest = _LEADING_SEPARATORS.sub("", rest).strip()
        return " " + rest if rest else None  # after "stem," the next token carries its own leading space
