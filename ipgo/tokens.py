"""IPGO's injected tokens: p_i = R_i(E z_i + b).

- E (d × r): orthonormal columns, kept exactly by `torch.nn.utils.parametrizations.orthogonal` (a hard
  parametrisation: every optimiser step lands on the Stiefel manifold, no re-normalisation pass).
- b (d,): one bias shared by the tokens of a module.
- z_i (r,): coefficients in [−1, 1]^r. `bound="tanh"` (default) stores an unconstrained u_i and uses
  z_i = tanh(u_i): the gradient is never exactly zero, so a coefficient that reaches the boundary can come
  back. `bound="clamp"` is the published form, z_i = clamp(u_i, −1, 1): once Adam pushes u_i past ±1 its
  gradient is zero and the coefficient is frozen there for the rest of the run.
- R_i: a product of Givens rotations. Angle θ_ik rotates every coordinate pair (a, b) =
  ((2j + k + i) mod d, (2j + 1 + k + i) mod d), j = 0 … d/2 − 1, by θ_ik — d/2 disjoint planes, so one
  angle is one block-diagonal rotation, and the K angles of a token are applied in order. This is what the
  reference notebook's `design_embedding_2d` intends; there it receives an empty (1, 0) slice of the angle
  tensor, so R is the identity and θ gets no gradient. Angles live in [−π, π] (wrapped: R is periodic).

With d = 768, r = 300, 10 tokens and 2 angles a module has 230 400 + 768 + 3 000 + 20 = 234 188
parameters; prefix and suffix together 0.47 M, the paper's count.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import orthogonal

Bound = Literal["tanh", "clamp"]


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Map angles to [−π, π) (gradient 1 almost everywhere)."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def givens_pairs(dim: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The disjoint coordinate pairs ((2j + shift) mod d, (2j + 1 + shift) mod d), j < d/2."""
    if dim % 2:
        raise ValueError(f"Givens rotations pair coordinates: the text dimension must be even, got {dim}")
    base = torch.arange(0, dim, 2)
    return (base + shift) % dim, (base + 1 + shift) % dim


def rotate(x: torch.Tensor, theta: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Apply R = G(θ_{K−1}) ⋯ G(θ_0) to x.

    x (..., d); theta (..., K) with the same leading shape (one set of angles per row). G(θ_k) rotates
    the pairs of `givens_pairs(d, k + offset)` by θ_k. Norm-preserving; differentiable in x and θ.
    """
    dim = x.shape[-1]
    for k in range(theta.shape[-1]):
        a_idx, b_idx = givens_pairs(dim, k + offset)
        a_idx, b_idx = a_idx.to(x.device), b_idx.to(x.device)
        cos, sin = torch.cos(theta[..., k:k + 1]), torch.sin(theta[..., k:k + 1])  # (..., 1)
        a, b = x[..., a_idx], x[..., b_idx]
        inverse = torch.argsort(torch.cat([a_idx, b_idx]))
        x = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)[..., inverse]
    return x


class InjectedTokens(nn.Module):
    """`num_tokens` tokens of width `dim`: forward() → (num_tokens, dim), p_i = R_i(E z_i + b)."""

    def __init__(self, num_tokens: int, dim: int, rank: int = 300, angles: int = 2, bound: Bound = "tanh",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank > dim:
            raise ValueError(f"ipgo.rank ({rank}) must be at most the text encoder's width ({dim}): "
                             "E has orthonormal columns")
        if bound not in ("tanh", "clamp"):
            raise ValueError(f"ipgo.bound must be 'tanh' or 'clamp', not {bound!r}")
        self.num_tokens, self.dim, self.rank, self.bound = num_tokens, dim, rank, bound
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        basis = nn.Linear(rank, dim)  # weight (dim, rank) = E, bias (dim,) = b
        with torch.no_grad():
            basis.weight.copy_(torch.randn(dim, rank, generator=gen))
            basis.bias.uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank), generator=gen)
        self.basis = orthogonal(basis)
        z0 = torch.rand(num_tokens, rank, generator=gen) * 2 - 1  # the notebook's U(−1, 1) start
        if bound == "tanh":
            z0 = torch.atanh(z0.clamp(-0.99, 0.99))
        self.raw_z = nn.Parameter(z0)
        self.theta = nn.Parameter((torch.rand(num_tokens, angles, generator=gen) * 2 - 1) * math.pi)

    @property
    def E(self) -> torch.Tensor:  # noqa: N802 — the paper's name
        return self.basis.weight

    @property
    def b(self) -> torch.Tensor:
        return self.basis.bias

    def z(self) -> torch.Tensor:
        """(num_tokens, rank) coefficients, each in [−1, 1]."""
        return torch.tanh(self.raw_z) if self.bound == "tanh" else self.raw_z.clamp(-1.0, 1.0)

    def angles(self) -> torch.Tensor:
        """(num_tokens, K) angles in [−π, π)."""
        return wrap_angle(self.theta)

    def forward(self) -> torch.Tensor:
        flat = self.basis(self.z())  # (T, d) = E z_i + b
        if self.theta.shape[-1] == 0 or self.num_tokens == 0:
            return flat
        # token i's pairs start at coordinate i (the notebook's start_dim), so tokens rotate different planes
        return torch.stack([rotate(flat[i], self.angles()[i], offset=i) for i in range(self.num_tokens)])

    @torch.no_grad()
    def wrap_(self) -> None:
        """Keep the stored angles in [−π, π) after an optimiser step (R is unchanged)."""
        self.theta.copy_(wrap_angle(self.theta))


class PromptTokens(nn.Module):
    """Prefix and suffix modules together (what one IPGO run learns)."""

    def __init__(self, dim: int, prefix: int = 10, suffix: int = 10, rank: int = 300, angles: int = 2,
                 bound: Bound = "tanh", seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # the orthogonal parametrisation completes E to a square basis with the *global* CPU RNG: seed it too,
        # so the same seed gives the same tokens (resume, prompt-wise jobs on different workers), and restore it
        # after (only the CPU generator: torch.manual_seed would also reseed, and leave reseeded, every GPU's)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            self.prefix = InjectedTokens(prefix, dim, rank, angles, bound, gen)
            self.suffix = InjectedTokens(suffix, dim, rank, angles, bound, gen)

    @classmethod
    def from_config(cls, cfg, dim: int) -> "PromptTokens":
        """From an `IpgoConfig` and the text encoder's width."""
        return cls(dim, cfg.prefix_tokens, cfg.suffix_tokens, cfg.rank, cfg.rotation_angles, cfg.bound, cfg.seed)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prefix(), self.suffix()

    @torch.no_grad()
    def wrap_(self) -> None:
        self.prefix.wrap_()
        self.suffix.wrap_()

    def export(self) -> dict[str, torch.Tensor]:
        """The learned tokens themselves, float32 on the CPU (what a user injects later, no module needed)."""
        prefix, suffix = self()
        return {"prefix": prefix.detach().float().cpu().contiguous(), "suffix": suffix.detach().float().cpu().contiguous()}
