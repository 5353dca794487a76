"""The flow head: log F̃(s_t) for every state of a trajectory, from the policy's hidden states.

Two heads, both FiLM-style MLPs on *detached* hidden states (`learner.flow_head`):

`official` (the default; gfn_trainer.py:25-41 `FlowFunction`, fed as at gfn_trainer.py:300-311):

    a_t          = ReLU(W_in · h_t)                          (B, T, D)   `act`: the dormant-ratio layer
    scale, shift = split(W_film · Σ_{i<|x|-1} h_i)           (B, D) each  the prompt x, summed but its last token
    log F̃(s_t)   = w_out · (scale ⊙ a_t + shift) + b_out     (B, T)      `out`: the layer reactivation resets

every Linear with PyTorch's default init (W_film random, so the prompt modulates from step 0).

`film` (ours before issue 19): LayerNorm on both inputs, the prompt *averaged* over all its tokens, the
FiLM applied before the ReLU as `(1 + scale)` with W_film started at zero, so the head starts as a
plain MLP on h_t:

    a_t          = ReLU(W_in · LN(h_t) ⊙ (1 + scale) + shift),  scale, shift = split(W_film · LN(mean_i h_i))

Why FiLM on the prompt: log F̃(s_0) is the log-partition function log Z(x) of a prompt's target,
which varies a lot from prompt to prompt; h_t sees the prompt only through attention, so the
pooled prompt is given again as an explicit multiplicative modulation.

Why detached: the policy's representation is shaped by log P_F alone; the flow head reads it.
A flow regression target that jumps (reactivation, τ annealing) then cannot disturb the policy's
features through the shared trunk. The head still trains on every FL-DB step because δ_t depends
on log F̃ directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


#: the head kinds and the `teacher_forced` output each reads its prompt from
PROMPT_INPUT = {"official": "prompt_sum", "film": "prompt_hidden"}


class FlowHead(nn.Module):
    """log F̃(s_t) (B, T) from state hidden states (B, T, H) and a pooled prompt hidden (B, H);
    `prompt_input` names the pooled prompt this kind reads from `teacher_forced`'s output."""

    def __init__(self, hidden_size: int, flow_hidden: int = 256, kind: str = "official") -> None:
        super().__init__()
        if kind not in PROMPT_INPUT:
            raise ValueError(f"learner.flow_head must be one of {sorted(PROMPT_INPUT)}, got {kind!r}")
        self.hidden_size, self.flow_hidden, self.kind = hidden_size, flow_hidden, kind
        self.prompt_input = PROMPT_INPUT[kind]
        norm = kind == "film"  # the Linear after each LayerNorm is its affine
        self.state_norm = nn.LayerNorm(hidden_size, elementwise_affine=False) if norm else nn.Identity()
        self.prompt_norm = nn.LayerNorm(hidden_size, elementwise_affine=False) if norm else nn.Identity()
        self.inp = nn.Linear(hidden_size, flow_hidden)
        self.film = nn.Linear(hidden_size, 2 * flow_hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(flow_hidden, 1)
        if kind == "film":
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, state_hidden: Tensor, prompt_hidden: Tensor) -> Tensor:
        if state_hidden.dim() != 3 or state_hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"state_hidden has shape {tuple(state_hidden.shape)}; expected (B, T, {self.hidden_size})")
        if prompt_hidden.shape != (state_hidden.shape[0], self.hidden_size):
            raise ValueError(
                f"prompt_hidden has shape {tuple(prompt_hidden.shape)}; expected (B, H) = "
                f"({state_hidden.shape[0]}, {self.hidden_size})"
            )
        dtype = self.inp.weight.dtype
        h = self.state_norm(state_hidden.detach().to(dtype))  # (B, T, H)
        hx = self.prompt_norm(prompt_hidden.detach().to(dtype))  # (B, H)
        scale, shift = self.film(hx)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        if self.kind == "official":
            return self.out(scale * self.act(self.inp(h)) + shift).squeeze(-1)  # (B, T)
        a = self.act(self.inp(h) * (1 + scale) + shift)  # (B, T, D)
        return self.out(a).squeeze(-1)  # (B, T)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return list(self.out.parameters())

    @torch.no_grad()
    def reinit_last_layer(self, optimizer: Optional[torch.optim.Optimizer] = None, init: str = "normal",
                          generator: Optional[torch.Generator] = None) -> None:
        """Flow reactivation: re-draw `out`, the layer that reads log F̃ off the hidden units.

        `normal` (the official code: `param.data = torch.randn_like(param.data)` on the last layer):
        weight and bias from N(0, 1), the optimiser state kept. With D hidden units this makes log F̃
        jump by O(√D · E|a|), about 25× what the default init does at D = 256: strong enough to
        pull the head out of a collapsed fit. `default`: PyTorch's Linear init (U(±1/√D)), and the
        optimiser's moments of the re-drawn tensors dropped (stale momentum would push the new
        weights with the old layer's history).
        """
        if init == "normal":
            for p in self.last_layer_parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
            return
        if init != "default":
            raise ValueError(f"learner.reactivation_init must be 'normal' or 'default', got {init!r}")
        self.out.reset_parameters()
        if optimizer is not None:
            for p in self.last_layer_parameters():
                optimizer.state.pop(p, None)
