"""WeNet-style Conformer encoder of the IndexTTS2 conditioning paths (speaker "A" and emotion "B").

upstream: indextts/gpt/conformer_encoder.py:ConformerEncoder (with Conv2dSubsampling2 from
indextts/gpt/conformer/subsampling.py, RelPositionalEncoding from .../embedding.py and
RelPositionMultiHeadedAttention from .../attention.py) — UPSTREAM.md §3.1.3.

Configuration as IndexTTS2 uses it: `input_layer conv2d2`, `pos_enc rel_pos`, `normalize_before`, no
macaron FFN, a convolution module (kernel 15, SiLU, LayerNorm), dropout 0. Two upstream behaviours are
reproduced on purpose:
- the relative-position attention has NO rel_shift: the positional term is `(q + v_b) · pᵀ` with p
  indexed by the KEY position (an absolute term);
- the convolution module zeroes padded frames at exactly two points (its input and its output), so a
  padded batch row differs from the same item run alone (UPSTREAM §3.1.3, fixture get_conditioning_b2).

Export notes: masks are built from the length tensor by comparison; masked attention scores use a finite
large negative (`MASK_NEG`) instead of -inf (FP16-safe; a row always has at least one valid key unless
its length is < 3, so exp() of the masked entries is exactly 0 as with -inf), and the attention weights
of masked keys are re-zeroed after the softmax as upstream does. `pe` is a persistent buffer loaded from
the checkpoint (the stored copy may be rounded) and only sliced in forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Finite stand-in for upstream's -inf on masked attention scores (representable in FP16).
MASK_NEG = -1e4
#: Rows of the stored sinusoid table `embed.pos_enc.pe` (WeNet's max_len default).
PE_MAX_LEN = 5000
CONV_KERNEL = 15
LN_EPS = 1e-5


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """WeNet's `pe` buffer (1, max_len, dim): sin on even dims, cos on odd, div = exp(-ln(1e4)·2i/dim)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe[None]


class Conv2dSubsampling2(nn.Module):
    """(B,T,F) -> (B,(T-1)//2,D): Conv2d(1→D, k3, s2) + ReLU over (time, feature), flatten
    channel-major (index c·F'+f), Linear; then the rel-pos encoding (x·√D, pe[:T'])."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, out_dim, 3, 2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(out_dim * ((in_dim - 1) // 2), out_dim))
        self.pos_enc = RelPositionalEncoding(out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x[:, None])                       # (B, D, T', F')
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return self.pos_enc(x)


class RelPositionalEncoding(nn.Module):
    """Scales x by √D and returns the first T rows of the stored sinusoid table as `pos_emb`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.xscale = math.sqrt(dim)
        self.register_buffer("pe", sinusoid_table(PE_MAX_LEN, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.xscale, self.pe[:, : x.shape[1]]


class RelPositionAttention(nn.Module):
    """Multi-head attention with the (rel_shift-free) positional term and bias vectors u, v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.d_k)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B,T,D); pos_emb (1,T,D); key_mask (B,1,1,T) bool, True = valid key."""
        q = self._split(self.linear_q(x))                                   # (B,T,h,d)
        k = self._split(self.linear_k(x)).transpose(1, 2)                   # (B,h,T,d)
        v = self._split(self.linear_v(x)).transpose(1, 2)
        p = self._split(self.linear_pos(pos_emb)).transpose(1, 2)           # (1,h,T,d)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        scores = (ac + bd) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~key_mask, MASK_NEG)
        attn = torch.softmax(scores, dim=-1).masked_fill(~key_mask, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2)                         # (B,T,h,d)
        return self.linear_out(out.reshape(out.shape[0], out.shape[1], -1))


class ConvolutionModule(nn.Module):
    """mask → pointwise (C→2C) → GLU → depthwise k15 → LayerNorm → SiLU → pointwise → mask.

    Padded frames are zeroed ONLY at the input and the output (upstream's two `masked_fill_`): between
    them a padded frame carries GLU(bias) into the depthwise conv of the neighbouring valid frames.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise_conv = nn.Conv1d(dim, dim, CONV_KERNEL, padding=CONV_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pointwise_conv2 = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """x (B,T,C); frame_mask (B,1,T) bool."""
        x = x.transpose(1, 2).masked_fill(~frame_mask, 0.0)
        x = F.glu(self.pointwise_conv1(x), dim=1)
        x = self.depthwise_conv(x)
        x = F.silu(self.norm(x.transpose(1, 2))).transpose(1, 2)
        x = self.pointwise_conv2(x).masked_fill(~frame_mask, 0.0)
        return x.transpose(1, 2)


class FeedForward(nn.Module):
    """`w_2(SiLU(w_1(x)))`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-LN block: x += MHA(LN x); x += Conv(LN x); x += FFN(LN x); x = LN(x)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(dim, heads)
        self.feed_forward = FeedForward(dim, ffn)
        self.conv_module = ConvolutionModule(dim)
        self.norm_ff = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_mha = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_conv = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_final = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_emb, frame_mask[:, None])
        x = x + self.conv_module(self.norm_conv(x), frame_mask)
        x = x + self.feed_forward(self.norm_ff(x))
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    """(features (B,T,F), lengths (B,)) -> (encoded (B,T',D), mask (B,T') bool), T' = (T-1)//2."""

    def __init__(self, in_dim: int, dim: int, heads: int, ffn: int, blocks: int) -> None:
        super().__init__()
        self.embed = Conv2dSubsampling2(in_dim, dim)
        self.encoders = nn.ModuleList(ConformerBlock(dim, heads, ffn) for _ in range(blocks))
        self.after_norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = torch.arange(x.shape[1], device=x.device)
        mask = (frames[None] < lengths[:, None])[:, None]       # (B,1,T)
        x, pos_emb = self.embed(x)
        mask = mask[:, :, 2::2]                                 # subsampled frame mask (B,1,T')
        for block in self.encoders:
            x = block(x, pos_emb, mask)
        return self.after_norm(x), mask[:, 0]
