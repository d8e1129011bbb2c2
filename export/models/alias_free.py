"""Anti-aliased SnakeBeta activation of BigVGAN v2: 2x up-sample, SnakeBeta, 2x low-pass down-sample.

upstream: indextts/s2mel/modules/bigvgan/alias_free_activation/torch/{filter.py:kaiser_sinc_filter1d,
LowPassFilter1d; resample.py:UpSample1d, DownSample1d; act.py:Activation1d} and
indextts/s2mel/modules/bigvgan/activations.py:SnakeBeta (the torch path, `use_cuda_kernel=False`, which
is the reference numerics; UPSTREAM §3.5).

Why it is written differently from upstream: upstream up-samples with replicate padding, a grouped
`conv_transpose1d` (stride 2) and a negative-index crop `[..., 15:-15]`. ONNX Runtime's CPU ConvTranspose is
slow for grouped (depthwise) kernels, and negative crops are awkward with a dynamic T. We use the
**polyphase** form instead: the even and odd output samples are each a 6-tap correlation of the input, so
one grouped `conv1d` with 2 output channels per input channel (kernel 7, replicate padding 3 each side)
computes both phases and a reshape interleaves them. The sums are the same terms as upstream's (only the
zero taps differ), so the numbers agree to float32 rounding; tests compare it with the transposed form.

The 12-tap Kaiser-windowed sinc filters are buffers in the checkpoint (`upsample.filter`,
`downsample.lowpass.filter`); the loaded copies are used. `kaiser_sinc_filter` recomputes the same
constant for construction defaults and for writing demo checkpoints. Derived constants (the per-channel
polyphase and low-pass weights, `exp(alpha)`, `1/(exp(beta)+1e-9)`) are non-persistent buffers rebuilt by
`refresh()` after loading, so that forward has no parameter arithmetic and no buffer mutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FILTER_TAPS = 12          # int(6 * ratio // 2) * 2 for ratio 2
FILTER_CUTOFF = 0.25      # 0.5 / ratio
FILTER_HALF_WIDTH = 0.3   # 0.6 / ratio
SNAKE_EPS = 1e-9          # upstream's no_div_by_zero


def kaiser_sinc_filter(cutoff: float = FILTER_CUTOFF, half_width: float = FILTER_HALF_WIDTH,
                       kernel_size: int = FILTER_TAPS) -> torch.Tensor:
    """The Kaiser-windowed sinc low-pass filter, shape (1, 1, kernel_size), normalized to sum 1.

    Kaiser design: transition width `delta_f = 4 * half_width`, attenuation
    `A = 2.285 (half_size - 1) pi delta_f + 7.95`, `beta = 0.1102 (A - 8.7)` for A > 50 (the branch taken
    here, A ~ 51.0), `0.5842 (A - 21)^0.4 + 0.07886 (A - 21)` for 21 <= A <= 50, else 0. Sample times are
    centred between taps for an even kernel. Computed in float32 like upstream.
    """
    if kernel_size % 2 != 0:
        raise ValueError("only even kernel sizes are used by BigVGAN's 2x resamplers")
    half_size = kernel_size // 2
    delta_f = 4 * half_width
    attenuation = 2.285 * (half_size - 1) * math.pi * delta_f + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    time = torch.arange(-half_size, half_size) + 0.5
    filt = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    filt = filt / filt.sum()
    return filt.view(1, 1, kernel_size)


def polyphase_up2_weight(filt: torch.Tensor, channels: int) -> torch.Tensor:
    """Grouped conv1d weight (2*channels, 1, 7) equivalent to upstream's x2 transposed-conv up-sampler.

    Upstream: `z = 2 * conv_transpose1d(pad_rep(x, 5, 5), f, stride 2)[15 : 15 + 2T]`. Working the index
    algebra through: `z[2p] = 2 * sum_j f[2j+1] x[p+2-j]` and `z[2p+1] = 2 * sum_j f[2j] x[p+3-j]`
    (j = 0..5, x clamped at the edges). On `xq = pad_rep(x, 3, 3)` the window `xq[p : p+7]` covers
    x[p-3 .. p+3], so tap t reads offset t-3: the even phase uses taps 0..5 = 2 f[11], 2 f[9], .., 2 f[1]
    and the odd phase taps 1..6 = 2 f[10], 2 f[8], .., 2 f[0].
    """
    f = filt.reshape(-1)
    if f.numel() != FILTER_TAPS:
        raise ValueError(f"polyphase up-sampler expects a {FILTER_TAPS}-tap filter, got {f.numel()}")
    even = torch.zeros(7, dtype=f.dtype)
    odd = torch.zeros(7, dtype=f.dtype)
    even[:6] = 2 * f.flip(0)[0::2]   # f[11], f[9], ..., f[1]
    odd[1:] = 2 * f.flip(0)[1::2]    # f[10], f[8], ..., f[0]
    pair = torch.stack([even, odd]).unsqueeze(1)          # (2, 1, 7): [phase, 1, tap]
    return pair.repeat(channels, 1, 1).contiguous()       # output channel 2c+r = phase r of channel c


class UpSample2x(nn.Module):
    """x2 anti-aliased up-sampling (upstream UpSample1d(ratio=2)), polyphase form. (B,C,T) -> (B,C,2T)."""

    PAD = 3

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("filter", kaiser_sinc_filter())
        self.register_buffer("weight", polyphase_up2_weight(self.filter, channels), persistent=False)

    def refresh(self) -> None:
        """Rebuild the polyphase weight from the (loaded) filter buffer."""
        self.weight = polyphase_up2_weight(self.filter, self.channels).to(self.filter.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        x = F.pad(x, (self.PAD, self.PAD), mode="replicate")
        y = F.conv1d(x, self.weight, groups=self.channels)            # (B, 2C, T): [c0 even, c0 odd, ...]
        return y.reshape(b, c, 2, t).transpose(2, 3).reshape(b, c, 2 * t)


class LowPassFilter1d(nn.Module):
    """Holds the down-sampler's filter under the upstream key name `lowpass.filter`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filter", kaiser_sinc_filter())


class DownSample2x(nn.Module):
    """x2 low-pass down-sampling (upstream DownSample1d(ratio=2)): replicate pad (5, 6), grouped strided
    conv1d with the 12-tap filter. (B,C,2T) -> (B,C,T)."""

    PAD_LEFT = FILTER_TAPS // 2 - 1
    PAD_RIGHT = FILTER_TAPS // 2

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.lowpass = LowPassFilter1d()
        self.register_buffer("weight", self._expanded(), persistent=False)

    def _expanded(self) -> torch.Tensor:
        return self.lowpass.filter.expand(self.channels, -1, -1).contiguous()

    def refresh(self) -> None:
        self.weight = self._expanded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.PAD_LEFT, self.PAD_RIGHT), mode="replicate")
        return F.conv1d(x, self.weight, stride=2, groups=self.channels)


class SnakeBeta(nn.Module):
    """`x + 1/(exp(beta) + 1e-9) * sin(x * exp(alpha))^2`, per channel (log-scale parameters).

    upstream: activations.py:SnakeBeta(alpha_logscale=True). Parameters `alpha`, `beta` (C,) are the
    checkpoint's; `freq` = exp(alpha) and `inv_beta` are precomputed by `refresh()`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("freq", torch.ones(1, channels, 1), persistent=False)
        self.register_buffer("inv_beta", torch.ones(1, channels, 1), persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.freq = torch.exp(self.alpha.detach()).view(1, -1, 1)
        self.inv_beta = (1.0 / (torch.exp(self.beta.detach()) + SNAKE_EPS)).view(1, -1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inv_beta * torch.sin(x * self.freq).pow(2)


class Activation1d(nn.Module):
    """Anti-aliased activation A(x) = Down(SnakeBeta(Up(x))); shape preserving (B,C,T)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = UpSample2x(channels)
        self.downsample = DownSample2x(channels)

    def refresh(self) -> None:
        self.act.refresh()
        self.upsample.refresh()
        self.downsample.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def phase_down2_weight(filt: torch.Tensor, channels: int) -> torch.Tensor:
    """Grouped conv1d weight (channels, 2, 7) of the x2 down-sampler applied to the two phases of an
    up-sampled signal without interleaving them (see PhaseSeparatedActivation1d).

    Down-sampling reads `z_pad[2q + k] = z[clamp(2q + k - 5)]` (k = 0..11). With z[2p] = e[p] and
    z[2p+1] = o[p], odd taps read e[q + (k-5)/2] (offsets -2..3) and even taps read o[q + (k-6)/2]
    (offsets -3..2). On streams padded by 3 each side, window tap j reads offset j - 3: the even stream
    takes f[1], f[3], .., f[11] at taps 1..6 and the odd stream f[0], f[2], .., f[10] at taps 0..5.
    """
    f = filt.reshape(-1)
    if f.numel() != FILTER_TAPS:
        raise ValueError(f"phase down-sampler expects a {FILTER_TAPS}-tap filter, got {f.numel()}")
    from_even = torch.zeros(7, dtype=f.dtype)
    from_odd = torch.zeros(7, dtype=f.dtype)
    from_even[1:] = f[1::2]
    from_odd[:6] = f[0::2]
    return torch.stack([from_even, from_odd]).unsqueeze(0).repeat(channels, 1, 1).contiguous()


class PhaseSnakeBeta(nn.Module):
    """SnakeBeta on a (B, C, 2, T) phase view: the same `x + inv_beta * sin(x * freq)^2` per channel."""

    def __init__(self, snake: SnakeBeta) -> None:
        super().__init__()
        channels = snake.freq.shape[1]
        self.register_buffer("freq", snake.freq.detach().reshape(1, channels, 1, 1).clone(), persistent=False)
        self.register_buffer("inv_beta", snake.inv_beta.detach().reshape(1, channels, 1, 1).clone(),
                             persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        s = torch.sin(y * self.freq)
        return y + self.inv_beta * (s * s)


class PhaseSeparatedActivation1d(nn.Module):
    """Activation1d computed on the two phases of the up-sampled signal, never interleaving them: the
    form exported to ONNX (export/wrappers/audio.py), the same sums as Activation1d's.

    Why: interleaving (a Transpose of every up-sampled tensor), the replicate pad of the 2T-long signal and
    the strided down-sampling conv were ~20 % of BigVGAN's time in ONNX Runtime on CPU (its Transpose is a
    plain strided copy). Here the up-sampler's (B, 2C, T) output is viewed as (B, C, 2, T) (phase even /
    odd per channel), SnakeBeta is elementwise so it applies per phase, and the down-sampler becomes one
    grouped conv over each channel's two phases (phase_down2_weight). Its replicate padding of the
    interleaved signal is reproduced exactly: every position left of the signal takes z[0] = even[0],
    every position right of it z[2T-1] = odd[T-1], in both phase streams.
    The eager model keeps Activation1d (upstream's structure); tests hold the two equal.
    """

    PAD = 3

    def __init__(self, act: Activation1d) -> None:
        super().__init__()
        channels = act.upsample.channels
        self.channels = channels
        self.register_buffer("up_weight", act.upsample.weight.detach().clone(), persistent=False)
        self.register_buffer("down_weight", phase_down2_weight(act.downsample.lowpass.filter.detach(), channels)
                             .to(act.upsample.weight.device), persistent=False)
        # a submodule named `act`, as in Activation1d: exported node names stay `...activations.N.act/...`,
        # which the engines' precision policy keeps in fp32 (engines/policy_default.json)
        self.act = PhaseSnakeBeta(act.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        y = F.conv1d(F.pad(x, (self.PAD, self.PAD), mode="replicate"), self.up_weight, groups=self.channels)
        y = y.reshape(b, c, 2, t)                                     # [:, c, 0] even, [:, c, 1] odd samples
        z = self.act(y)
        left = z[:, :, :1, :1].expand(b, c, 2, self.PAD)              # z[0] = even[0]
        right = z[:, :, 1:, -1:].expand(b, c, 2, self.PAD)            # z[2T-1] = odd[T-1]
        z = torch.cat([left, z, right], dim=3).reshape(b, 2 * c, t + 2 * self.PAD)
        return F.conv1d(z, self.down_weight, groups=self.channels)


def phase_separated(module: nn.Module) -> nn.Module:
    """A copy of `module` with every Activation1d replaced by its PhaseSeparatedActivation1d (the
    original, shared with the eager pipeline, is left untouched)."""
    import copy

    out = copy.deepcopy(module)
    for name, sub in list(out.named_modules()):
        for child_name, child in list(sub.named_children()):
            if isinstance(child, Activation1d):
                setattr(sub, child_name, PhaseSeparatedActivation1d(child))
    return out


def refresh_derived(module: nn.Module) -> None:
    """Recompute every derived constant below `module`; call after loading weights into it."""
    for sub in module.modules():
        if isinstance(sub, Activation1d):
            sub.refresh()
