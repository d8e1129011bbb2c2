"""Perceiver resampler that turns conformer frames into a fixed number of latents.

upstream: indextts/gpt/perceiver.py:PerceiverResampler (Attention with cross_attn_include_queries,
FeedForward with GEGLU, RMSNorm) as built by indextts/gpt/model_v2.py:UnifiedVoice.__init__ —
UPSTREAM.md §3.1.4.

Speaker path "A": dim = gpt model_dim, 32 latents; emotion path "B": dim = 1024 (a literal upstream),
1 latent. Both: depth 2, dim_head 64, heads from the conformer config, feed-forward inner width
`int(dim * mult * 2 / 3)` with `mult` a float (0.25 in small configs). The mask over the context is
prefixed with n_latents Trues (upstream's ConstantPad1d in UnifiedVoice), since the latents attend to
themselves too. Masked scores get a finite large negative (upstream: -finfo(float32).max) so an FP16
engine cannot overflow; the latent columns are always valid, so the softmax is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM_HEAD = 64
DEPTH = 2
#: Finite stand-in for upstream's -finfo(dtype).max on masked context frames.
MASK_NEG = -1e4
#: `F.normalize`'s epsilon in upstream's RMSNorm.
NORM_EPS = 1e-12


def ff_inner_dim(dim: int, mult: float) -> int:
    """Upstream's `int(dim * mult * 2 / 3)`: float product, truncated."""
    return int(dim * mult * 2 / 3)


class GEGLU(nn.Module):
    """`x, gate = chunk(2)`; `x * gelu(gate)` with the exact (erf) GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


class CrossAttention(nn.Module):
    """Latents attend to [latents; context] (bias-free projections, scale dim_head^-0.5)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * DIM_HEAD
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, DIM_HEAD).transpose(1, 2)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """latents (B,n,dim); context (B,T,dim); key_mask (B,1,1,n+T) bool."""
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([latents, context], dim=1)).chunk(2, dim=-1)
        sim = torch.matmul(q, self._heads(k).transpose(-2, -1)) * DIM_HEAD**-0.5
        attn = torch.softmax(sim.masked_fill(~key_mask, MASK_NEG), dim=-1)
        out = torch.matmul(attn, self._heads(v)).transpose(1, 2)
        return self.to_out(out.reshape(out.shape[0], out.shape[1], -1))


class RMSNorm(nn.Module):
    """`F.normalize(x) * sqrt(dim) * gamma` (upstream's perceiver RMSNorm, not the mean-square form)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, eps=NORM_EPS) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """(context (B,T,dim_context), mask (B,T) bool) -> latents (B,n_latents,dim)."""

    def __init__(self, dim: int, dim_context: int, heads: int, ff_mult: float, num_latents: int) -> None:
        super().__init__()
        self.num_latents = num_latents
        self.proj_context = nn.Linear(dim_context, dim) if dim_context != dim else nn.Identity()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        fi = ff_inner_dim(dim, ff_mult)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                CrossAttention(dim, heads),
                nn.Sequential(nn.Linear(dim, 2 * fi), GEGLU(), nn.Linear(fi, dim)),
            ])
            for _ in range(DEPTH)
        )
        self.norm = RMSNorm(dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        context = self.proj_context(context)
        b = context.shape[0]
        latents = self.latents[None].expand(b, -1, -1)
        prefix = torch.ones(b, self.num_latents, dtype=torch.bool, device=mask.device)
        key_mask = torch.cat([prefix, mask], dim=1)[:, None, None]
        for attn, ff in self.layers:
            latents = attn(latents, context, key_mask) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
