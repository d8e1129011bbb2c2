"""CAMPPlus speaker-embedding network (3D-Speaker) used by IndexTTS2 as the s2mel style encoder.

upstream: indextts/s2mel/modules/campplus/DTDNN.py:CAMPPlus, FCM (+ classifier.py / layers.py:
BasicResBlock, TDNNLayer, CAMDenseTDNNLayer, CAMDenseTDNNBlock, CAMLayer, TransitLayer, DenseLayer,
StatsPool, get_nonlinear); UPSTREAM §3.4. Input: mean-normalized log fbank (B, T, 80); output the style
vector (B, 192). Eval mode only (BatchNorm uses running statistics, eps 1e-5).

Export choices:
- CAMLayer's segment pooling (avg_pool1d kernel = stride = 100, ceil_mode, last partial window divided
  by its in-bounds count, repeated per frame and cropped to T) is computed from a (T, S) 0/1
  membership matrix built once per forward from aranges (S = ceil(T/100) + 1, see `make_segments`):
  segment sums are one matmul, divided by the true per-segment counts. The two 1x1 convs and the
  sigmoid of the context run on the S segment values (they act per frame, so this equals running them
  on the repeated frames), and only the final (B, out, S) gate is spread back to the T frames with an
  index_select. This exports with a dynamic T >= 3 (torch.export); a pad + reshape formulation made the
  exporter guard on the pad amount. A cumulative-sum formulation was avoided: differences of long
  running sums lose precision, badly so in FP16 engines.
- BatchNorm that directly follows a conv (FCM head convs and shortcuts, the TDNN layer, each dense
  layer's `linear1` -> `nonlinear2`, the final `dense`) is folded into that conv by `fuse_batchnorm()`,
  which the loader calls after the strict load. Pre-activation BatchNorms (BN -> ReLU -> conv, the
  dense layers' `nonlinear1`, transits, `out_nonlinear`) stay eval-mode BatchNorm.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import CheckpointError

from export.checkpoint import as_state_dict, load_into, read_torch_file
from export.config import CAMPPlusConfig

log = logging.getLogger(__name__)

SEG_LEN = 100                               # CAMLayer.seg_pooling seg_len
HEAD_CHANNELS = 32                          # FCM m_channels (hard-coded upstream)
BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))  # (num_layers, kernel, dilation) of the 3 CAM dense blocks
BN_EPS = 1e-5


@torch.no_grad()
def fold_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Return `conv` with eval-mode `bn` folded in (weight * s, bias = (b - mean) * s + beta)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return conv  # already folded
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    else:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.copy_((conv.weight.double() * scale.view(shape)).to(conv.weight.dtype))
    conv.bias.copy_(shift.to(conv.bias.dtype))
    return conv


class BasicResBlock(nn.Module):
    """2-D residual block; stride only on the frequency axis."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False),
                                          nn.BatchNorm2d(planes))

    def fuse(self) -> None:
        self.conv1, self.bn1 = fold_bn(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fold_bn(self.conv2, self.bn2), nn.Identity()
        if len(self.shortcut) == 2:
            self.shortcut[0] = fold_bn(self.shortcut[0], self.shortcut[1])
            self.shortcut[1] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FCM(nn.Module):
    """2-D conv front end: (B, F, T) -> (B, 32 * F/8, T)."""

    def __init__(self, feat_dim: int) -> None:
        super().__init__()
        c = HEAD_CHANNELS
        self.conv1 = nn.Conv2d(1, c, 3, stride=1, padding=1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(BasicResBlock(c, c, 2), BasicResBlock(c, c, 1))
        self.layer2 = nn.Sequential(BasicResBlock(c, c, 2), BasicResBlock(c, c, 1))
        self.conv2 = nn.Conv2d(c, c, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(c)
        self.out_channels = c * (feat_dim // 8)

    def fuse(self) -> None:
        self.conv1, self.bn1 = fold_bn(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fold_bn(self.conv2, self.bn2), nn.Identity()
        for block in (*self.layer1, *self.layer2):
            block.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))
        b, c, f, t = out.shape
        return out.reshape(b, c * f, t)


class Nonlinear(nn.Module):
    """upstream get_nonlinear: 'batchnorm-relu' (BN then ReLU) or 'batchnorm_' (affine-free BN only)."""

    def __init__(self, channels: int, relu: bool = True, affine: bool = True) -> None:
        super().__init__()
        self.batchnorm: nn.Module = nn.BatchNorm1d(channels, eps=BN_EPS, affine=affine)
        self.use_relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.batchnorm(x)
        return F.relu(x) if self.use_relu else x


class TDNNLayer(nn.Module):
    """Conv1d (no bias) -> BN -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        self.nonlinear = Nonlinear(out_ch)

    def fuse(self) -> None:
        self.linear = fold_bn(self.linear, self.nonlinear.batchnorm)
        self.nonlinear.batchnorm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class Segments(NamedTuple):
    """CAMLayer segment bookkeeping for one time length T (shared by all 52 CAM layers of a forward)."""

    onehot: torch.Tensor      # (T, S) 1.0 where frame t lies in segment s
    counts: torch.Tensor      # (S,) in-bounds frames per segment (last real one possibly < 100), >= 1
    frame_seg: torch.Tensor   # (T,) int64 segment index of each frame


def make_segments(t: int, device: torch.device, dtype: torch.dtype) -> Segments:
    """Segment membership of T frames for avg_pool1d(kernel = stride = 100, ceil_mode=True).

    Built from aranges and a comparison only (no pad + reshape, whose pad amount torch.export guards
    on). There are S = ceil(T/100) + 1 columns: the last one is always empty (its count is clamped to 1,
    so its mean is 0, and no frame reads it). The spare column keeps S >= 2 provably, otherwise the
    exporter specializes "S != 1" and refuses T <= 200. Its cost is one extra column in two 1x1 convs.
    """
    frame_seg = torch.div(torch.arange(t, device=device), SEG_LEN, rounding_mode="floor")
    n_cols = (t + SEG_LEN - 1) // SEG_LEN + 1
    onehot = (frame_seg.unsqueeze(1) == torch.arange(n_cols, device=device).unsqueeze(0)).to(dtype)
    return Segments(onehot, torch.clamp(onehot.sum(0), min=1.0), frame_seg)


def segment_context(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """`mean_T(x) + avg_pool1d(x, 100, 100, ceil_mode=True)` per segment: (B,C,T) -> (B,C,S).

    The last segment may be partial; it is divided by its in-bounds frame count, as PyTorch's
    avg_pool1d does with ceil_mode and no padding.
    """
    return x.mean(-1, keepdim=True) + torch.matmul(x, seg.onehot) / seg.counts


class CAMLayer(nn.Module):
    """Context-aware masking: local conv output gated by a sigmoid of global + segment context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        padding = (kernel - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel, padding=padding, dilation=dilation,
                                      bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        y = self.linear_local(x)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(segment_context(x, seg)))))
        return y * gate.index_select(-1, seg.frame_seg)   # each segment's gate repeated on its frames


class CAMDenseTDNNLayer(nn.Module):
    """BN-ReLU -> Conv1x1 (bottleneck) -> BN-ReLU -> CAMLayer."""

    def __init__(self, in_ch: int, out_ch: int, bn_ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = Nonlinear(in_ch)
        self.linear1 = nn.Conv1d(in_ch, bn_ch, 1, bias=False)
        self.nonlinear2 = Nonlinear(bn_ch)
        self.cam_layer = CAMLayer(bn_ch, out_ch, kernel, dilation)

    def fuse(self) -> None:
        self.linear1 = fold_bn(self.linear1, self.nonlinear2.batchnorm)
        self.nonlinear2.batchnorm = nn.Identity()

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))), seg)


class CAMDenseTDNNBlock(nn.Module):
    """Dense block: each layer's output is concatenated to its input on channels. Keys `tdnnd{n}`."""

    def __init__(self, num_layers: int, in_ch: int, growth: int, bn_ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        for i in range(num_layers):
            self.add_module(f"tdnnd{i + 1}",
                            CAMDenseTDNNLayer(in_ch + i * growth, growth, bn_ch, kernel, dilation))

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x, seg)], dim=1)
        return x


class TransitLayer(nn.Module):
    """BN-ReLU -> Conv1x1 (no bias)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.nonlinear = Nonlinear(in_ch)
        self.linear = nn.Conv1d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    """Conv1x1 (no bias) on the pooled vector, then affine-free BatchNorm ('batchnorm_')."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_ch, out_ch, 1, bias=False)
        self.nonlinear = Nonlinear(out_ch, relu=False, affine=False)

    def fuse(self) -> None:
        self.linear = fold_bn(self.linear, self.nonlinear.batchnorm)
        self.nonlinear.batchnorm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


def stats_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean and unbiased standard deviation over time, concatenated: (B, C, T) -> (B, 2C)."""
    return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class XVector(nn.Module):
    """TDNN -> 3 x (CAM dense block, transit) -> BN-ReLU -> stats pooling -> dense embedding."""

    def __init__(self, cfg: CAMPPlusConfig, in_channels: int) -> None:
        super().__init__()
        ch = cfg.init_channels
        self.tdnn = TDNNLayer(in_channels, ch, 5, stride=2)
        bn_ch = cfg.bn_size * cfg.growth_rate
        for i, (num_layers, kernel, dilation) in enumerate(BLOCKS):
            self.add_module(f"block{i + 1}",
                            CAMDenseTDNNBlock(num_layers, ch, cfg.growth_rate, bn_ch, kernel, dilation))
            ch += num_layers * cfg.growth_rate
            self.add_module(f"transit{i + 1}", TransitLayer(ch, ch // 2))
            ch //= 2
        self.out_nonlinear = Nonlinear(ch)
        self.dense = DenseLayer(2 * ch, cfg.embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tdnn(x)
        seg = make_segments(x.shape[-1], x.device, x.dtype)
        for i in range(1, len(BLOCKS) + 1):
            x = getattr(self, f"transit{i}")(getattr(self, f"block{i}")(x, seg))
        x = self.out_nonlinear(x)
        return self.dense(stats_pool(x))


class CAMPPlus(nn.Module):
    """fbank (B, T, feat_dim), mean-normalized over time -> style embedding (B, embedding_size)."""

    def __init__(self, cfg: CAMPPlusConfig = CAMPPlusConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = FCM(cfg.feat_dim)
        self.xvector = XVector(cfg, self.head.out_channels)

    @torch.no_grad()
    def fuse_batchnorm(self) -> "CAMPPlus":
        """Fold every conv -> BN pair into the conv (eval numerics). Idempotent; changes the state dict."""
        self.head.fuse()
        self.xvector.tdnn.fuse()
        for module in self.xvector.modules():
            if isinstance(module, CAMDenseTDNNLayer):
                module.fuse()
        self.xvector.dense.fuse()
        return self

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.xvector(self.head(fbank.transpose(1, 2)))


def load_campplus(path: str | Path, cfg: CAMPPlusConfig = CAMPPlusConfig(), fuse: bool = True) -> CAMPPlus:
    """Read `campplus_cn_common.bin` (a plain state dict, loaded strictly as upstream does), eval mode.

    `fuse=False` keeps the original BatchNorm modules (used by tests to check the folding).
    No keys are ignored (num_batches_tracked is part of the module's state dict).
    """
    state = as_state_dict(read_torch_file(path), path)
    model = CAMPPlus(cfg)
    load_into(model, state, str(path))
    model.eval()
    if fuse:
        model.fuse_batchnorm()
    log.info("loaded CAMPPlus from %s", path)
    return model


@torch.no_grad()
def demo_state_dict(cfg: CAMPPlusConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random weights in the original layout: conv weights N(0, 2/fan_in) (ReLU gain), conv biases
    N(0, 0.1), BN weight 1 + N(0, 0.1), bias N(0, 0.1), running_mean N(0, 0.1), running_var U(0.5, 2),
    num_batches_tracked 0."""
    state = {k: v.clone() for k, v in CAMPPlus(cfg).state_dict().items()}
    for name, value in state.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            value.zero_()
        elif leaf == "running_var":
            value.uniform_(0.5, 2.0, generator=generator)
        elif leaf in ("running_mean", "bias"):  # BatchNorm shifts and the CAM convs' biases
            value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
        elif value.dim() == 1:  # BatchNorm scale
            value.copy_(1.0 + torch.randn(value.shape, generator=generator) * 0.1)
        else:  # conv weights
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return state


def write_demo_campplus(path: str | Path, cfg: CAMPPlusConfig, generator: torch.Generator) -> None:
    """Write a `campplus_cn_common.bin`-layout file (plain state dict) with seeded random weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(demo_state_dict(cfg, generator), path)
    log.info("wrote demo CAMPPlus to %s", path)


def campplus_config_from_state(state: dict[str, torch.Tensor], source: str | Path) -> CAMPPlusConfig:
    """Read the constructor sizes off a CAMPPlus state dict.

    Why: the checkpoint ships no config (infer_v2 relies on the 3D-Speaker defaults), but the demo
    checkpoints use a smaller CAMPPlus. The real `campplus_cn_common.bin` yields `CAMPPlusConfig()`.
    """
    needed = ("xvector.tdnn.linear.weight", "xvector.block1.tdnnd1.cam_layer.linear_local.weight",
              "xvector.block1.tdnnd1.linear1.weight", "xvector.dense.linear.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"{source}: not a CAMPPlus state dict (missing {', '.join(absent)})")
    tdnn = state["xvector.tdnn.linear.weight"]                    # (init_channels, HEAD_CHANNELS * feat/8, 5)
    growth = state["xvector.block1.tdnnd1.cam_layer.linear_local.weight"].shape[0]
    bottleneck = state["xvector.block1.tdnnd1.linear1.weight"].shape[0]
    return CAMPPlusConfig(
        feat_dim=tdnn.shape[1] // HEAD_CHANNELS * 8,
        embedding_size=state["xvector.dense.linear.weight"].shape[0],
        growth_rate=growth,
        bn_size=bottleneck // growth,
        init_channels=tdnn.shape[0],
    )
