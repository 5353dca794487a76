"""Conditioning with injected tokens: C = [prefix; H; suffix], and IPGO's conformity term.

H is the frozen text encoder's output for the prompt. Two layouts (`ipgo.layout`):

- `pad77` (default, the diffusers convention): the prompt is padded to 77 − P − S tokens, so C is
  exactly 77 long, the length the UNet saw in training, whatever the prompt.
- `nopad` (the reference notebook): the prompt is not padded, C is L + P + S long.

A prompt longer than 77 − P − S tokens (start and end included) is truncated to that length with a
warning, and counted in `PromptEncoder.truncated` — the notebook skips such prompts silently. The
unconditional branch is the empty prompt's states at the same length as C (for classifier-free guidance
the two halves of the batch must have one length).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)

CLIP_CONTEXT = 77
Layout = Literal["pad77", "nopad"]


@dataclass
class EncodedPrompt:
    """A prompt's frozen text states and the matching unconditional states."""

    prompt: str
    states: torch.Tensor    # (1, L, d): H
    uncond: torch.Tensor    # (1, L + P + S, d)
    truncated: bool


def inject(states: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """(B, L, d) states, (P, d) prefix, (S, d) suffix → (B, P + L + S, d)."""
    batch = states.shape[0]
    prefix = prefix.to(states.dtype).unsqueeze(0).expand(batch, -1, -1)
    suffix = suffix.to(states.dtype).unsqueeze(0).expand(batch, -1, -1)
    return torch.cat([prefix, states, suffix], dim=1)


def conformity(cond: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """c = (1/d)·‖mean_rows(C) − mean_rows(H)‖₁, averaged over the batch: how far the injected tokens
    move the conditioning's mean away from the prompt's own. (B, T, d), (B, L, d) → scalar."""
    dim = cond.shape[-1]
    return ((cond.float().mean(1) - states.float().mean(1)).abs().sum(-1) / dim).mean()


class PromptEncoder:
    """Encodes prompts with a frozen CLIP text encoder for a given number of injected tokens."""

    def __init__(self, tokenizer, text_encoder, layout: Layout = "pad77", prefix: int = 10, suffix: int = 10) -> None:
        if layout not in ("pad77", "nopad"):
            raise ValueError(f"ipgo.layout must be 'pad77' or 'nopad', not {layout!r}")
        self.tokenizer, self.text_encoder, self.layout = tokenizer, text_encoder, layout
        self.prefix, self.suffix = prefix, suffix
        self.truncated = 0
        self._uncond: dict[int, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def _states(self, ids: list[int]) -> torch.Tensor:
        return self.text_encoder(torch.tensor([ids], device=self.device))[0]  # (1, L, d)

    def uncond(self, length: int) -> torch.Tensor:
        """The empty prompt padded to `length` tokens, encoded (cached per length)."""
        if length not in self._uncond:
            ids = self.tokenizer("", padding="max_length", max_length=length, truncation=True).input_ids
            self._uncond[length] = self._states(ids)
        return self._uncond[length]

    def encode(self, prompt: str, injected: bool = True) -> EncodedPrompt:
        """H and the unconditional states; `injected=False`: the plain prompt as SD would encode it
        (no room kept for tokens: 77 long for pad77, L for nopad)."""
        extra = self.prefix + self.suffix if injected else 0
        room = CLIP_CONTEXT - extra
        ids = self.tokenizer(prompt, truncation=False).input_ids
        truncated = len(ids) > room
        if truncated:
            self.truncated += 1
            log.warning("prompt of %d CLIP tokens truncated to %d to leave room for %d injected tokens "
                        "(%d prompt(s) truncated so far): %.60s", len(ids), room, extra, self.truncated, prompt)
            ids = ids[:room - 1] + ids[-1:]  # keep the end-of-text token: SD's pooled position
        if self.layout == "pad77":
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else ids[-1]
            ids = ids + [pad] * (room - len(ids))
        states = self._states(ids)
        return EncodedPrompt(prompt, states, self.uncond(states.shape[1] + extra), truncated)
