"""GPT-2 transformer core with an explicit KV cache (no embeddings, no position table inside).

upstream: transformers GPT2Model as used by indextts/gpt/model_v2.py:UnifiedVoice (wpe replaced by a
zero function, wte deleted; inputs_embeds only) and GPT2InferenceModel's KV-cached steps —
UPSTREAM.md §3.1.2, §3.1.6.

Pre-LN blocks `x += c_proj(attn(ln_1 x))`, `x += mlp(ln_2 x)`, final `ln_f`; HF Conv1D weights are
stored `[in, out]` (y = x·W + b) and kept in that layout so checkpoint keys and shapes load unchanged;
MLP activation gelu_new (tanh approximation); attention scale 1/√head_dim; LayerNorm eps 1e-5.

Two entry points, both graph-friendly:
- `forward(x, bias)`: self-attention over the whole sequence with an additive bias (causal and/or key
  padding), returning every layer's K/V stacked as (layers, 2, B, H, T, hd) — the prefill and the
  teacher-forced latent pass.
- `step(x, cache, cache_bias)`: one new token per row attends to S cached rows (additive bias per row,
  0 = attend, large negative = skip) plus itself. The cache is only read: scores against the cache and
  against the token's own key are computed separately and joined after the product, so no K/V
  concatenation (a full-cache copy) happens; the new K/V rows are returned for the caller to store.
Masked scores use a finite negative (see `MASK_NEG`) so FP16 engines do not overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5
#: Additive bias for a masked key. exp(-1e4 + O(10)) is exactly 0 in float32 and float16, so results equal
#: upstream's finfo.min masking wherever a row has a valid key.
MASK_NEG = -1e4


class Conv1D(nn.Module):
    """HF's Conv1D: a linear layer with weight stored [in, out]."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = self.c_attn(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]                                       # (B,H,T,hd) each

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = out.shape
        return self.c_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,T,D), bias broadcastable to (B,H,T,T) -> (out (B,T,D), kv (2,B,H,T,hd))."""
        q, k, v = self._qkv(x)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self._merge(out), torch.stack([k, v])

    def step(self, x: torch.Tensor, cache: torch.Tensor, cache_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,1,D), cache (2,B,H,S,hd), cache_bias (B,1,1,S) -> (out (B,1,D), kv_new (2,B,H,1,hd))."""
        # The cache is never indexed (cache[0] / cache[1] export as a Split that copies the whole cache,
        # every layer, every step: 63 MB a row at 256 positions, 0.5 GB at 2048, 12 % of a 4-row CPU step).
        # Both products run over K and V together instead and the unwanted half of each small result is
        # dropped: twice the attention arithmetic (0.03 GFLOP a row at 256 positions, against 0.9 GFLOP for
        # the weights), no copy. Each element is the same dot product as before.
        q, k, v = self._qkv(x)
        past = torch.matmul(q.unsqueeze(0), cache.transpose(-2, -1))[0] * self.scale + cache_bias  # (B,H,1,S)
        own = (q * k).sum(dim=-1, keepdim=True) * self.scale                                        # (B,H,1,1)
        weights = torch.softmax(torch.cat([past, own], dim=-1), dim=-1)
        n_past = cache.shape[3]
        out = torch.matmul(weights[..., :n_past].unsqueeze(0), cache)[1] + weights[..., n_past:] * v
        return self._merge(out), torch.stack([k, v])


class MLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(dim, inner)
        self.c_proj = Conv1D(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))   # gelu_new


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, kv = self.attn(self.ln_1(x), bias)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv

    def step(self, x: torch.Tensor, cache: torch.Tensor, cache_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, kv = self.attn.step(self.ln_1(x), cache, cache_bias)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT2Core(nn.Module):
    """`h.{i}` blocks + `ln_f` (checkpoint prefix `gpt.`). Outputs are after ln_f."""

    def __init__(self, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.h = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,T,D), additive bias broadcastable to (B,H,T,T) -> (h (B,T,D), kv (layers,2,B,H,T,hd))."""
        kvs = []
        for block in self.h:
            x, kv = block(x, bias)
            kvs.append(kv)
        return self.ln_f(x), torch.stack(kvs)

    def step(self, x: torch.Tensor, cache: list[torch.Tensor], kv_mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,1,D), cache[i] (2,B,H,S,hd), kv_mask (B,S) float (1 = attend)
        -> (h (B,1,D), kv_new (layers,2,B,H,1,hd))."""
        cache_bias = ((1.0 - kv_mask) * MASK_NEG)[:, None, None, :].to(x.dtype)
        kvs = []
        for block, layer_cache in zip(self.h, cache):
            x, kv = block.step(x, layer_cache, cache_bias)
            kvs.append(kv)
        return self.ln_f(x), torch.stack(kvs)


def causal_bias(length: int | torch.SymInt, key_valid: torch.Tensor | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """Additive attention bias: 0 where key j <= query i (and key j is valid), MASK_NEG elsewhere.

    key_valid (B,T) bool gives key padding (rows left-padded by upstream's prepare_gpt_inputs); the
    result is (1,1,T,T) without it and (B,1,T,T) with it.
    """
    pos = torch.arange(length, device=device)
    allowed = (pos[None, :] <= pos[:, None])[None, None]
    if key_valid is None:
        return torch.where(allowed, 0.0, MASK_NEG)
    allowed = allowed & key_valid[:, None, None, :]
    bias = torch.where(allowed, 0.0, MASK_NEG)
    # A padding query row sees no key. Upstream (HF GPT-2, sdpa on CPU) adds float32's minimum to every masked
    # score, which swamps the scores: such a row averages ALL values uniformly. Only the padding rows' own
    # outputs depend on it (nothing attends to them); the fixtures record them (gpt25 prefill_logits).
    unseen = ~allowed.any(dim=-1, keepdim=True)
    return torch.where(unseen, torch.finfo(torch.float32).min, bias)
