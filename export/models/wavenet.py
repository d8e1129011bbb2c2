"""WaveNet post-net of the s2mel DiT: gated dilated convolutions conditioned on a time embedding.

upstream: indextts/s2mel/modules/wavenet.py:WN (convolutions are `SConv1d` from
indextts/s2mel/modules/encodec.py, weight-normed, reflect-padded).

Two facts shape this file:
- `SConv1d` ignores the `padding=` it is given and pads the input itself in **reflect** mode
  (left = total - total // 2, right = total // 2, total = (k - 1) * dilation), so a zero-padded Conv1d
  would differ at the first and last frames.
- Reflection happens at each row's own end: in a batch padded to its longest row (the scheduler's shared
  `dit_step` calls, runtime/scheduler/), a shorter row must see the frames upstream's batch-1 call sees,
  i.e. its own frames mirrored at its last valid frame, not the padding. With `lens` the right padding is
  a gather at per-row indices (`reflect_pad_rows`); a row whose length is the tensor's is padded exactly
  as `F.pad(mode="reflect")` pads it (the same values, copied), so batch-1 outputs are unchanged.
- The checkpoint keys are `<layer>.conv.conv.weight_g/_v` (SConv1d -> NormConv1d -> Conv1d). The small
  holder modules below reproduce that nesting so the state dict loads without renames; weight norm is
  folded to a plain `weight` at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _NormConv1d(nn.Module):
    """Mirrors upstream's NormConv1d: only holds `conv` (so keys read `...conv.conv.weight`)."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv


class ReflectConv1d(nn.Module):
    """Conv1d with stride 1 and symmetric reflect padding (upstream SConv1d, non-causal).

    Needs T > max(pad_left, pad_right) (T >= 3 for k=5): upstream's zero-extension for shorter inputs
    is a data-dependent branch we do not reproduce.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = _NormConv1d(nn.Conv1d(in_ch, out_ch, kernel_size, dilation=dilation))
        total = (kernel_size - 1) * dilation
        self.pad_right = total // 2
        self.pad_left = total - self.pad_right

    def forward(self, x: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T) -> (B, out, T); `lens` (B|1,) int64: reflect at each row's last valid frame."""
        if lens is not None and (self.pad_left or self.pad_right):
            x = reflect_pad_rows(x, lens, self.pad_left, self.pad_right)
        elif self.pad_left or self.pad_right:
            x = F.pad(x, (self.pad_left, self.pad_right), mode="reflect")
        return self.conv.conv(x)


def reflect_pad_rows(x: torch.Tensor, lens: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """x (B, C, T) -> (B, C, left + T + right): frame -p is frame p (reflection at 0) and, in row b, frame
    lens[b] - 1 + q is frame lens[b] - 1 - q (reflection at the row's last valid frame). Frames further
    right than that are don't-cares (any valid index; they only reach outputs past the row's end, which
    the WaveNet masks). For lens[b] = T this is F.pad(x, (left, right), mode="reflect")."""
    batch, channels, frames = x.shape
    pos = torch.arange(-left, frames + right, device=x.device).abs()            # (T',) reflected at 0
    last = (lens.to(torch.int64) - 1)[:, None]                                   # (B|1, 1)
    idx = torch.where(pos[None, :] > last, 2 * last - pos[None, :], pos[None, :])  # (B|1, T')
    idx = idx.clamp(min=0, max=frames - 1)
    return torch.gather(x, 2, idx[:, None, :].expand(batch, channels, -1))


class WaveNet(nn.Module):
    """Non-causal WN stack: `x (B,H,T), x_mask (B|1,1,T) float, g (B,G,1) -> (B,H,T)`.

    Layer i: a = in_layer(x); z = tanh(a[:H] + g_i[:H]) * sigmoid(a[H:] + g_i[H:]); r = res_skip(z);
    all but the last layer: x = (x + r[:H]) * mask, out += r[H:]; last layer: out += r. Result out * mask.
    """

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.n_layers = n_layers
        self.cond_layer = ReflectConv1d(gin_channels, 2 * hidden * n_layers, 1)
        self.in_layers = nn.ModuleList(
            ReflectConv1d(hidden, 2 * hidden, kernel_size, dilation=dilation_rate**i) for i in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            ReflectConv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1) for i in range(n_layers)
        )

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor,
                lens: torch.Tensor | None = None) -> torch.Tensor:
        """`lens` (B|1,) int64, the rows' valid frames (what x_mask marks): the dilated convolutions reflect at
        each row's own end (see the module note); None: at the tensor's end, as upstream's batch-1 call."""
        h = self.hidden
        g = self.cond_layer(g)                                   # (B, 2*H*L, 1)
        out = torch.zeros_like(x)                                # (B, H, T)
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = in_layer(x, lens) + g[:, 2 * h * i: 2 * h * (i + 1)]   # (B, 2H, T)
            z = torch.tanh(a[:, :h]) * torch.sigmoid(a[:, h:])   # (B, H, T)
            r = res_skip(z)                                      # (B, 2H | H, T)
            if i < self.n_layers - 1:
                x = (x + r[:, :h]) * x_mask
                out = out + r[:, h:]
            else:
                out = out + r
        return out * x_mask
