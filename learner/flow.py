"""The flow head: log F̃(s_t) for every state of a trajectory, from the policy's hidden states.

Choice (following the paper): a FiLM-style MLP on *detached* hidden states.

    u_t          = W_in · LN(h_t)                           (B, T, D)   the state s_t = (x, y_≤t)
    scale, shift = split(W_film · LN(h_x))                  (B, D) each  the prompt x, pooled
    a_t          = ReLU(u_t ⊙ (1 + scale) + shift)          (B, T, D)   `act`: the dormant-ratio layer
    log F̃(s_t)   = w_out · a_t + b_out                      (B, T)      `out`: the layer reactivation resets

Why FiLM on the prompt: log F̃(s_0) is the log-partition function log Z(x) of a prompt's target,
which varies a lot from prompt to prompt; h_t sees the prompt only through attention, so the
pooled prompt is given again as an explicit multiplicative modulation. W_film starts at zero, so
the head starts as a plain MLP on h_t and learns how much the prompt should modulate it.

Why detached: the policy's representation is shaped by log P_F alone; the flow head reads it.
A flow regression target that jumps (reactivation, τ annealing) then cannot disturb the policy's
features through the shared trunk. The head still trains on every FL-DB step because δ_t depends
on log F̃ directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class FlowHead(nn.Module):
    """log F̃(s_t) (B, T) from state hidden states (B, T, H) and a pooled prompt hidden (B, H)."""

    def __init__(self, hidden_size: int, flow_hidden: int = 256) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.flow_hidden = flow_hidden
        self.state_norm = nn.LayerNorm(hidden_size, elementwise_affine=False)  # the Linear after it is the affine
        self.prompt_norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.inp = nn.Linear(hidden_size, flow_hidden)
        self.film = nn.Linear(hidden_size, 2 * flow_hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(flow_hidden, 1)
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
        scale, shift = self.film(hx).chunk(2, dim=-1)  # (B, D) each
        a = self.act(self.inp(h) * (1 + scale[:, None]) + shift[:, None])  # (B, T, D)
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
