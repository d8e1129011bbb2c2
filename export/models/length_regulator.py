"""Length regulator: semantic features at 50 Hz -> DiT content condition at the mel frame rate.

upstream: indextts/s2mel/modules/length_regulator.py:InterpolateRegulator (continuous input,
`sampling_ratios` [1,1,1,1], no f0, no VQ) — UPSTREAM.md §3.2.2.

`x (B,T_in,C_in) -> content_in_proj -> nearest resample to T_out = max(ylens) -> 4 x [Conv1d k3 ->
GroupNorm(1) -> Mish] -> Conv1d 1x1 -> * sequence_mask(ylens)`.

The resampling is written out instead of calling `F.interpolate`: PyTorch's legacy nearest reads
source frame `min(floor(float32(dst) * (float32(T_in) / float32(T_out))), T_in - 1)` in float32,
which differs from exact integer arithmetic for ~10% of lengths (e.g. 26 -> 44 frames, dst 22 reads
12, not 13), and an ONNX Resize is not guaranteed to round the same way. An explicit float32 index and
a gather export as plain Range/Mul/Floor/Gather.
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.errors import CheckpointError

from ..config import LengthRegulatorConfig


def nearest_source_index(t_in: int | torch.SymInt, t_out: torch.Tensor) -> torch.Tensor:
    """Source frame of every output frame, as PyTorch's float32 nearest computes it. -> (T_out,) int64.

    `t_out` is a 0-dim int64 tensor (data: max(ylens)); the arange over it is the one data-dependent
    size in this module.
    """
    dst = torch.arange(t_out, device=t_out.device).to(torch.float32)          # (T_out,)
    scale = torch.full((), t_in, dtype=torch.float32) / t_out.to(torch.float32)
    src = torch.floor(dst * scale).to(torch.int64)
    return torch.clamp(src, max=t_in - 1)


class LengthRegulator(nn.Module):
    """`(x (B,T_in,C_in), ylens (B,) int64) -> (out (B,max(ylens),C), olens (B,))`."""

    def __init__(self, cfg: LengthRegulatorConfig) -> None:
        super().__init__()
        if cfg.is_discrete or cfg.vector_quantize or cfg.f0_condition or not cfg.sampling_ratios:
            raise CheckpointError("s2mel config: length_regulator supports only the shipped variant "
                                  "(continuous input, interpolation, no VQ, no f0)")
        ch = cfg.channels
        self.content_in_proj = nn.Linear(cfg.in_channels, ch)
        layers: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            layers += [nn.Conv1d(ch, ch, 3, padding=1), nn.GroupNorm(1, ch), nn.Mish()]
        layers.append(nn.Conv1d(ch, ch, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, ylens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_out = ylens.max()                                                    # 0-dim int64
        h = self.content_in_proj(x)                                            # (B, T_in, C)
        src = nearest_source_index(x.shape[1], t_out)                          # (T_out,)
        h = torch.index_select(h, 1, src).transpose(1, 2)                      # (B, C, T_out)
        out = self.model(h).transpose(1, 2)                                    # (B, T_out, C)
        mask = torch.arange(t_out, device=x.device)[None, :] < ylens[:, None]  # (B, T_out)
        return out * mask[:, :, None].to(out.dtype), ylens

