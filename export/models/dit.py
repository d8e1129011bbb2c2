"""The s2mel DiT estimator: velocity field of the flow-matching mel decoder.

upstream: indextts/s2mel/modules/diffusion_transformer.py:DiT (with its gpt-fast style Transformer,
TransformerBlock, Attention, FeedForward, AdaptiveLayerNorm, RMSNorm from
indextts/s2mel/modules/gpt_fast/model.py, TimestepEmbedder and FinalLayer) — UPSTREAM.md §3.2.3.

Numerics that the fixtures pin down (each was easy to get subtly wrong):
- time embedding angles are `(1000 * t) * freqs` in float32 in that order, `cat([cos, sin])`;
- AdaLN is `w * RMSNorm(x) + b` (not `1 + w`); the final layer is `LayerNorm(x) * (1 + scale) + shift`
  with a non-affine LayerNorm, eps 1e-6;
- RoPE rotates interleaved pairs with a float32 table (float32 inverse frequencies and angles) over
  16384 positions, precomputed here as a non-persistent constant (not read from the checkpoint);
- UViT skips are LIFO: layer i < depth//2 pushes its output, layer i > depth//2 pops before running;
- the key-padding mask uses a finite additive -1e4 (fp16 safe; exp underflows to exactly 0 in fp32,
  so it matches upstream's boolean mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import CheckpointError

from ..config import S2MelConfig
from .wavenet import WaveNet

ROPE_POSITIONS = 16384     # upstream ModelArgs.block_size (hard-coded; the yaml block_size is ignored)
ROPE_BASE = 10000.0
NORM_EPS = 1e-5
MASK_NEG = -1.0e4          # additive key-padding mask value


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def rope_table(positions: int, head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """(positions, head_dim/2, 2) = [cos, sin] of float32 angles pos * base^(-2i/head_dim).

    Built exactly like upstream's precompute_freqs_cis in float32 (a float64 table differs by ~1e-4
    at T≈4000 with head_dim 64).
    """
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(positions), inv)                  # float32 (positions, hd/2)
    cis = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([cis.real, cis.imag], dim=-1).float().contiguous()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B,T,H,D) by table (T,D/2,2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)                        # (B,T,H,D/2,2)
    rot = table[None, :, None]                                          # (1,T,1,D/2,2)
    out = torch.stack([xs[..., 0] * rot[..., 0] - xs[..., 1] * rot[..., 1],
                       xs[..., 1] * rot[..., 0] + xs[..., 0] * rot[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B,H): sinusoidal features of 1000*t (cos first) -> Linear -> SiLU -> Linear.

    `freqs` is a checkpoint buffer (exp(-ln(10000) i / 128)); we load the stored values like upstream.
    """

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = 1000.0 * t[:, None].float() * self.freqs[None]               # (B, 128)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class AdaptiveNorm(nn.Module):
    """`w * RMSNorm(x) + b` with [w, b] = project_layer(c) (upstream AdaptiveLayerNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.project_layer = nn.Linear(dim, 2 * dim)
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        w, b = torch.split(self.project_layer(c), self.dim, dim=-1)
        return w * self.norm(x) + b


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([self.dim, self.dim, self.dim], dim=-1)
        q = apply_rope(q.view(b, t, self.n_heads, self.head_dim), rope)     # (B,T,h,d)
        k = apply_rope(k.view(b, t, self.n_heads, self.head_dim), rope)
        v = v.view(b, t, self.n_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))                     # (B,h,T,d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # mask (B|1,1,1,T) additive
        return self.wo(y.transpose(1, 2).reshape(b, t, self.dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_hidden: int) -> None:
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, ffn_hidden)
        self.attention_norm = AdaptiveNorm(dim)
        self.ffn_norm = AdaptiveNorm(dim)
        self.skip_in_linear = nn.Linear(2 * dim, dim)   # present on every layer; used by receivers only

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor,
                skip: torch.Tensor | None) -> torch.Tensor:
        if skip is not None:   # static: decided by layer index, not by data
            x = self.skip_in_linear(torch.cat([x, skip], dim=-1))
        h = x + self.attention(self.attention_norm(x, c), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h, c))


class Transformer(nn.Module):
    """Stack with UViT skips (LIFO) and a final AdaLN; the RoPE table is a non-persistent constant."""

    def __init__(self, dim: int, n_heads: int, depth: int, uvit_skips: bool) -> None:
        super().__init__()
        ffn_hidden = find_multiple(int(2 * 4 * dim / 3), 256)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads, ffn_hidden) for _ in range(depth))
        self.norm = AdaptiveNorm(dim)
        self.emit = {i for i in range(depth) if uvit_skips and i < depth // 2}
        self.receive = {i for i in range(depth) if uvit_skips and i > depth // 2}
        self.register_buffer("rope", rope_table(ROPE_POSITIONS, dim // n_heads), persistent=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rope = self.rope[: x.shape[1]]                                       # (T, d/2, 2)
        stack: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x = layer(x, c, rope, mask, stack.pop() if i in self.receive else None)
            if i in self.emit:
                stack.append(x)
        return self.norm(x, c)


class FinalLayer(nn.Module):
    """`linear(LayerNorm(x) * (1 + scale) + shift)`, [shift, scale] = adaLN_modulation(c)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, dim)   # weight-normed upstream; folded at load

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)              # (B, H) each
        y = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
        return self.linear(y * (1 + scale[:, None]) + shift[:, None])


def check_supported(cfg: S2MelConfig) -> None:
    """Refuse the config variants this port does not implement (all off in the shipped config)."""
    d, w = cfg.DiT, cfg.wavenet
    unsupported = [name for name, on in (
        ("DiT.is_causal", d.is_causal), ("DiT.time_as_token", d.time_as_token),
        ("DiT.style_as_token", d.style_as_token), ("DiT.f0_condition", d.f0_condition),
        ("DiT.add_resblock_in_transformer", d.add_resblock_in_transformer),
        ("DiT.final_layer_type != 'wavenet'", d.final_layer_type != "wavenet"),
        ("DiT.long_skip_connection = false", not d.long_skip_connection),
        ("DiT.style_condition = false", not d.style_condition),
    ) if on]
    if unsupported:
        raise CheckpointError(f"s2mel config: unsupported DiT options: {', '.join(unsupported)}")
    if w.hidden_dim != d.hidden_dim:
        raise CheckpointError(f"s2mel config: wavenet.hidden_dim ({w.hidden_dim}) must equal DiT.hidden_dim "
                              f"({d.hidden_dim}) (upstream's FinalLayer is modulated by the DiT-width t1)")
    if d.hidden_dim % d.num_heads:
        raise CheckpointError(f"s2mel config: DiT.hidden_dim {d.hidden_dim} not divisible by num_heads {d.num_heads}")


class DiT(nn.Module):
    """`(x (B,80,T), prompt_x (B,80,T), x_lens (B|1,) int, t (B,), style (B,S), cond (B,T,C)) -> (B,80,T)`."""

    def __init__(self, cfg: S2MelConfig) -> None:
        super().__init__()
        check_supported(cfg)
        d, w = cfg.DiT, cfg.wavenet
        hid, wh, n_in = d.hidden_dim, w.hidden_dim, d.in_channels
        self.t_embedder = TimestepEmbedder(hid)
        self.cond_projection = nn.Linear(d.content_dim, hid)
        self.cond_x_merge_linear = nn.Linear(2 * n_in + hid + cfg.style_encoder.dim, hid)
        self.transformer = Transformer(hid, d.num_heads, d.depth, d.uvit_skip_connection)
        self.skip_linear = nn.Linear(hid + n_in, hid)
        self.conv1 = nn.Linear(hid, wh)
        self.t_embedder2 = TimestepEmbedder(wh)
        self.wavenet = WaveNet(wh, w.kernel_size, w.dilation_rate, w.num_layers, gin_channels=wh)
        self.res_projection = nn.Linear(hid, wh)
        self.final_layer = FinalLayer(wh)
        self.conv2 = nn.Conv1d(wh, n_in, 1)

    def forward(self, x: torch.Tensor, prompt_x: torch.Tensor, x_lens: torch.Tensor, t: torch.Tensor,
                style: torch.Tensor, cond: torch.Tensor, *, rows_alone: bool = False) -> torch.Tensor:
        """`rows_alone`: the WaveNet reflects at each row's own last frame (x_lens), so a row padded into a
        longer batch comes out as its batch-1 call, upstream's only call in inference (the scheduler batches
        requests this way: runtime/scheduler/). Upstream's padded batch reflects at the tensor's end, which
        lets the padding reach a shorter row's last frames; the default keeps that (fixture s2mel_cfm pins
        it). With every row full length (batch 1) the two are the same computation."""
        T = x.shape[2]
        t1 = self.t_embedder(t)                                              # (B, H)
        xt = x.transpose(1, 2)                                               # (B, T, 80)
        style_t = style[:, None, :].expand(-1, T, -1)                        # (B, T, S)
        x_in = torch.cat([xt, prompt_x.transpose(1, 2), self.cond_projection(cond), style_t], dim=-1)
        x_in = self.cond_x_merge_linear(x_in)                                # (B, T, H)
        valid = torch.arange(T, device=x.device)[None, :] < x_lens[:, None]  # (B|1, T) bool
        attn_mask = torch.where(valid, 0.0, MASK_NEG).to(x_in.dtype)[:, None, None, :]  # (B|1,1,1,T)
        h = self.transformer(x_in, t1[:, None, :], attn_mask)                # (B, T, H)
        x_res = self.skip_linear(torch.cat([h, xt], dim=-1))                 # (B, T, H)
        y = self.conv1(x_res).transpose(1, 2)                                # (B, W, T)
        x_mask = valid[:, None, :].to(x.dtype)                               # (B|1, 1, T)
        y = self.wavenet(y, x_mask, self.t_embedder2(t)[:, :, None], x_lens if rows_alone else None)
        y = y.transpose(1, 2) + self.res_projection(x_res)                   # (B, T, W)
        y = self.final_layer(y, t1).transpose(1, 2)                          # (B, W, T)
        return self.conv2(y)                                                 # (B, 80, T)
