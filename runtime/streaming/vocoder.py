"""The BigVGAN vocoder run in chunks: windows of a segment's mel whose cropped outputs, concatenated, are
the whole-segment output (up to float32 summation order).

upstream: none — indextts/infer_v2.py vocodes each segment's mel whole (`self.bigvgan(mel)`); this module
only decides which mel frames to feed, the vocoder graph is the same `bigvgan` graph (DESIGN.md §3).

**The receptive field, exactly.** BigVGAN (export/models/bigvgan.py, UPSTREAM §3.5) is a stack of local
ops, described by the manifest's `VocoderLayout`. Each op's backward interval map, [o0, o1] of its output
-> the input indices read (inclusive):
- conv (kernel k, dilation d, stride s, left padding p): y[o] reads x[s·o - p + d·t], t = 0..k-1, so
  [o0, o1] -> [s·o0 - p, s·o1 - p + d(k-1)]; 'same' convs have s = 1, p = d(k-1)/2;
- transposed conv (stride u, kernel k, padding P): y[o] = sum of x[i]·w[o + P - u·i] over
  0 <= o + P - u·i < k, so [o0, o1] -> [ceil((o0 + P - k + 1)/u), floor((o1 + P)/u)]; the stage
  up-samplers have P = (k - u)/2 (output exactly u times longer);
- anti-aliased SnakeBeta A = up-sample, snake, down-sample: the x r up-sampler (upstream UpSample1d:
  replicate pad K/r - 1, transposed conv of the K-tap filter at stride r, crop) is a transposed conv of
  stride r, kernel K, padding (K - r)/2 (for r = 2, K = 12: y[2p+q] reads x[p-3+q .. p+2+q]); the snake
  is pointwise; the down-sampler (DownSample1d) a conv of kernel K, stride r, left padding K/2 - 1
  (y[q] reads z[2q-5 .. 2q+6]). The exported graph's PhaseSeparatedActivation1d reads the same elements;
- a residual step x + f(x) reads the union of x and f's cone; the averaged parallel AMPBlock1s the union
  of theirs (every cone contains the output's own position, so unions of intervals are intervals).
At each layer the interval is clamped to that layer's [0, L): an index outside the signal reads padding,
a constant zero (conv_pre, conv_post, the resblock convs) or a replicate of the edge element, which the
clamped interval holds (every cone meets [0, L)). Composed from the output back to the mel, this gives
the exact set of mel frames each output range reads (`backward_frames`); nothing is a guessed constant.

**Why the chunks are exact.** A chunk of frames [a, b) delivers samples [hop·a, hop·b); their cone is
frames [lo, hi], and the window [lo, hi + 1) is vocoded and its output cropped to the chunk. The window
run applies the same ops to the same values as the whole run, except where some layer reads past the
window's ends: padding in the window, real neighbours in the whole run. Every op's cone contains the
output's own position scaled down (s·o - p <= s·o <= s·o - p + d(k-1); ceil((o + P - k + 1)/u) <=
floor(o/u) <= floor((o + P)/u)), so an element at a layer position outside the window's extent there has
a cone reaching outside [lo, hi]; no element of the chunk's cone does. So by induction from the mel up,
every element an output sample of the chunk reads is computed from the same values in both runs, and
the sample equals the whole-segment one. At a window end that is a segment end (lo = 0 or hi = T - 1)
the window's padding IS the segment's: the same zero, or the replicate of the same element (both runs
start, or end, at the same index). What remains is float32 rounding where a kernel's summation order
depends on the length (tests/streaming: max |difference| <= 1e-5).

The network is shift-equivariant by one frame (= hop samples), so inside a segment every chunk needs the
same `context(layout)` (left, right) frames; at the segment's ends the window is clamped. The cone is
tight (with random weights every tap is nonzero, so the output depends on every frame of it: the tests
check that the float64 gradient is nonzero exactly on the cone), but its outer frames reach the chunk
only through products of the anti-alias filters' small outer taps, so in float32 a narrower window
usually gives the same numbers: the context is what exactness needs, not what float32 can see.

Chunk plan (`VocoderChunking`): the first chunk is `first_frames` long (its audio comes early), each next
one twice the previous up to `max_frames` (longer chunks re-compute less context). Consecutive chunks whose
windows are the same run (both clamped to the same stretch of a short segment) are delivered by one run:
a 69-frame segment with 32-frame chunks and 38 frames of context each side is one whole-segment run, not
three. Settings are checked
before any work (`VocoderPlanner`): lengths >= 1, max >= first, and the largest window (max_frames plus
both contexts) within the bigvgan graph's mel_len profile maximum. A manifest without a vocoder layout
(exported before it was recorded) gets whole-segment windows and one warning saying how to record it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtime.errors import ContractError, InputError
from runtime.executors.base import Executor
from runtime.manifest import Manifest, VocoderLayout

log = logging.getLogger(__name__)

NO_LAYOUT_WARNING = ("this export's manifest has no vocoder layout (it was written before chunked vocoding): "
                     "each segment is vocoded whole, so its audio comes only once its whole mel is ready. Re-run "
                     "python -m export.build --checkpoints CKPT --out {root} (with the --precision it was made with) "
                     "to record it: unchanged graphs are reused, only the manifest is rewritten")


# ---------------------------------------------------------------------------------------------------
# Backward interval maps. An interval is inclusive (lo, hi); `n` is the op's input length, None for an
# unbounded signal (no clamping: the interior of a long segment).


def _clamp(lo: int, hi: int, n: int | None) -> tuple[int, int]:
    if n is None:
        return lo, hi
    return min(max(lo, 0), n - 1), max(min(hi, n - 1), 0)


@dataclass(frozen=True)
class _Conv:
    """y[o] reads x[stride·o - pad + dilation·t], t = 0..kernel-1."""

    kernel: int
    dilation: int = 1
    stride: int = 1
    pad: int = 0

    def out_len(self, n: int) -> int:
        return n // self.stride           # 'same' convs keep n; the down-sampler reads a 2x-long signal

    def back(self, lo: int, hi: int, n: int | None) -> tuple[int, int]:
        s = self.stride
        return _clamp(s * lo - self.pad, s * hi - self.pad + self.dilation * (self.kernel - 1), n)


@dataclass(frozen=True)
class _ConvTranspose:
    """y[o] = sum of x[i]·w[o + pad - stride·i] over 0 <= o + pad - stride·i < kernel."""

    stride: int
    kernel: int
    pad: int

    def out_len(self, n: int) -> int:
        return n * self.stride            # pad = (kernel - stride) / 2

    def back(self, lo: int, hi: int, n: int | None) -> tuple[int, int]:
        first = -((self.kernel - 1 - lo - self.pad) // self.stride)       # ceil((lo + pad - kernel + 1) / stride)
        return _clamp(first, (hi + self.pad) // self.stride, n)


@dataclass(frozen=True)
class _Chain:
    ops: tuple

    def out_len(self, n: int) -> int:
        for op in self.ops:
            n = op.out_len(n)
        return n

    def back(self, lo: int, hi: int, n: int | None) -> tuple[int, int]:
        lengths = [n]
        for op in self.ops[:-1]:
            lengths.append(None if n is None else op.out_len(lengths[-1]))
        for op, m in zip(reversed(self.ops), reversed(lengths)):
            lo, hi = op.back(lo, hi, m)
        return lo, hi


@dataclass(frozen=True)
class _Residual:
    """x + body(x): the union of the identity's and the body's cones."""

    body: _Chain

    def out_len(self, n: int) -> int:
        return n

    def back(self, lo: int, hi: int, n: int | None) -> tuple[int, int]:
        a, b = self.body.back(lo, hi, n)
        return min(lo, a), max(hi, b)


@dataclass(frozen=True)
class _Parallel:
    """The average of branches run on the same input: the union of their cones."""

    branches: tuple

    def out_len(self, n: int) -> int:
        return n

    def back(self, lo: int, hi: int, n: int | None) -> tuple[int, int]:
        cones = [b.back(lo, hi, n) for b in self.branches]
        return min(c[0] for c in cones), max(c[1] for c in cones)


@functools.lru_cache(maxsize=8)
def _network(layout: VocoderLayout) -> _Chain:
    """The generator as interval maps, in forward order (export/models/bigvgan.py: BigVGAN.forward)."""
    r, taps = layout.resample_ratio, layout.resample_taps

    def same(kernel: int, dilation: int = 1) -> _Conv:
        return _Conv(kernel, dilation, 1, dilation * (kernel - 1) // 2)

    def activation() -> tuple:        # up x r (transposed conv), snake (pointwise), down / r
        return _ConvTranspose(r, taps, (taps - r) // 2), _Conv(taps, 1, r, taps // 2 - 1)

    def amp_block(kernel: int, dilations: Sequence[int]) -> _Chain:
        return _Chain(tuple(_Residual(_Chain((*activation(), same(kernel, d), *activation(), same(kernel))))
                            for d in dilations))

    ops: list = [same(layout.conv_pre_kernel)]
    for u, k in zip(layout.upsample_rates, layout.upsample_kernel_sizes):
        ops.append(_ConvTranspose(u, k, (k - u) // 2))
        ops.append(_Parallel(tuple(amp_block(kb, ds) for kb, ds in
                                   zip(layout.resblock_kernel_sizes, layout.resblock_dilation_sizes))))
    ops += [*activation(), same(layout.conv_post_kernel)]
    return _Chain(tuple(ops))


def backward_frames(layout: VocoderLayout, s0: int, s1: int, frames: int | None = None) -> tuple[int, int]:
    """The mel frames [lo, hi) that output samples [s0, s1) depend on, in a segment of `frames` frames
    (None: inside an unbounded one, so lo may be negative and hi past any end)."""
    total = None if frames is None else frames * layout.hop_length
    if not 0 <= s0 < s1 or (total is not None and s1 > total):
        raise ValueError(f"samples [{s0}, {s1}) are not a non-empty range of a {total}-sample output")
    lo, hi = _network(layout).back(s0, s1 - 1, frames)
    return lo, hi + 1


def forward_samples(layout: VocoderLayout, j0: int, j1: int, frames: int) -> tuple[int, int]:
    """The output samples [s0, s1) that mel frames [j0, j1) of a `frames`-frame segment influence: those
    whose cone meets [j0, j1). A sample's cone ends move monotonically with it, so two bisections."""
    if not 0 <= j0 < j1 <= frames:
        raise ValueError(f"frames [{j0}, {j1}) are not a non-empty range of a {frames}-frame segment")
    total = frames * layout.hop_length

    def first(pred) -> int:           # smallest s in [0, total] with pred(s) (pred monotone False -> True)
        a, b = 0, total
        while a < b:
            m = (a + b) // 2
            a, b = (a, m) if pred(m) else (m + 1, b)
        return a

    s0 = first(lambda s: s < total and backward_frames(layout, s, s + 1, frames)[1] > j0)
    s1 = first(lambda s: s < total and backward_frames(layout, s, s + 1, frames)[0] >= j1)
    return s0, s1


@dataclass(frozen=True)
class Context:
    """Mel frames a chunk's window needs left and right of the chunk, inside a segment."""

    left: int
    right: int


@functools.lru_cache(maxsize=8)
def context(layout: VocoderLayout) -> Context:
    """The interior context: the cone of one frame's samples in an unbounded segment (the same for every
    frame: the network is shift-equivariant by one frame)."""
    lo, hi = backward_frames(layout, 0, layout.hop_length)
    return Context(-lo, hi - 1)


# ---------------------------------------------------------------------------------------------------
# Chunk plan


@dataclass(frozen=True)
class VocoderChunking:
    """Chunk sizes in mel frames: `first_frames` first (~0.37 s at 22.05 kHz, hop 256, for 32), then each
    chunk twice the previous, up to `max_frames`."""

    first_frames: int = 32
    max_frames: int = 256

    def __post_init__(self) -> None:
        for name in ("first_frames", "max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"vocoder chunking: {name} must be a positive number of mel frames, got {value!r}")
        if self.max_frames < self.first_frames:
            raise InputError(f"vocoder chunking: max_frames {self.max_frames} < first_frames {self.first_frames} "
                             "(chunks grow from first_frames up to max_frames)")

    def sizes(self, frames: int) -> list[int]:
        """Chunk lengths covering `frames` frames (the last one takes what is left)."""
        out, size, done = [], self.first_frames, 0
        while done < frames:
            out.append(min(size, frames - done))
            done += out[-1]
            size = min(2 * size, self.max_frames)
        return out


@dataclass(frozen=True)
class Window:
    """One vocoder run: mel frames [win_start, win_end) in, the samples of frames [start, end) out, which
    are the run's output samples [crop_start, crop_end)."""

    start: int
    end: int
    win_start: int
    win_end: int
    crop_start: int
    crop_end: int

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def window_frames(self) -> int:
        return self.win_end - self.win_start

    @property
    def hop(self) -> int:
        return (self.crop_end - self.crop_start) // self.frames


class VocoderPlanner:
    """The windows of each segment, for one export and one chunking setting.

    `chunking` None: one whole-segment window (what the synthesizer did before chunks). `layout` None (an
    export made before the layout was recorded): whole-segment windows too, with one warning when chunks
    were asked for. Settings are checked here, at construction, before any vocoder run: a chunking whose
    largest window exceeds `max_window` (the bigvgan graph's mel_len maximum) is an InputError.
    """

    def __init__(self, layout: VocoderLayout | None, chunking: VocoderChunking | None, max_window: int,
                 hop_length: int = 256, where: str = "OUT") -> None:
        if layout is None and chunking is not None:
            log.warning(NO_LAYOUT_WARNING.format(root=where))
            chunking = None
        self.layout, self.chunking, self.max_window = layout, chunking, int(max_window)
        self.hop = layout.hop_length if layout is not None else hop_length
        self.context = context(layout) if layout is not None else None
        if chunking is not None:
            assert self.context is not None
            widest = chunking.max_frames + self.context.left + self.context.right
            if widest > self.max_window:
                room = self.max_window - self.context.left - self.context.right
                raise InputError(
                    f"vocoder chunking: a {chunking.max_frames}-frame chunk needs a window of {widest} mel frames "
                    f"({self.context.left} left + {self.context.right} right context), more than the bigvgan graph's "
                    f"mel_len maximum {self.max_window}; use max_frames <= {room}")

    @classmethod
    def from_manifest(cls, manifest: Manifest, chunking: VocoderChunking | None,
                      where: str = "OUT") -> "VocoderPlanner":
        """The planner for an export: its vocoder layout, hop and the bigvgan mel_len profile maximum."""
        limit = manifest.graph("bigvgan").ranges["mel_len"].max
        return cls(manifest.vocoder, chunking, limit, manifest.synthesis.hop_length, where)

    @property
    def chunked(self) -> bool:
        return self.chunking is not None

    def plan(self, frames: int) -> list[Window]:
        """The windows of a `frames`-frame segment, in order; their chunks tile [0, frames)."""
        if frames < 0:
            raise InputError(f"vocoder: a segment of {frames} mel frames")
        if frames == 0:
            return []
        if self.chunking is None or self.layout is None:
            if frames > self.max_window:
                raise InputError(f"vocoder: a segment of {frames} mel frames is longer than the bigvgan graph's "
                                 f"mel_len maximum {self.max_window}; vocode it in chunks (VocoderChunking)")
            return [Window(0, frames, 0, frames, 0, self.hop * frames)]
        windows: list[Window] = []
        start = 0
        for size in self.chunking.sizes(frames):
            end = start + size
            lo, hi = backward_frames(self.layout, self.hop * start, self.hop * end, frames)
            last = windows[-1] if windows else None
            if last is not None and (last.win_start, last.win_end) == (lo, hi):
                # the same vocoder run as the chunk before (a segment not much longer than the context):
                # one run delivers both, at the time the first would have come alone
                windows[-1] = Window(last.start, end, lo, hi, last.crop_start, self.hop * (end - lo))
            else:
                windows.append(Window(start, end, lo, hi, self.hop * (start - lo), self.hop * (end - lo)))
            start = end
        return windows


# ---------------------------------------------------------------------------------------------------
# Running windows


def run_window(executor: Executor, mel: np.ndarray, window: Window) -> np.ndarray:
    """One window through the bigvgan executor: mel (B, mel_bins, T) float32 -> the chunk's samples
    (B, hop·window.frames) float32, a copy (executors may reuse their output buffers)."""
    if mel.ndim != 3 or window.win_end > mel.shape[2]:
        raise ContractError(f"vocoder window [{window.win_start}, {window.win_end}) does not fit a mel of shape "
                            f"{mel.shape} (expected (batch, mel_bins, T >= {window.win_end}))")
    feed = np.ascontiguousarray(mel[:, :, window.win_start:window.win_end], dtype=np.float32)   # (B, bins, W)
    wav = executor.run({"mel": feed})["wav"]                                                      # (B, hop W)
    expected = window.window_frames * window.hop
    if wav.shape[-1] != expected:
        raise ContractError(f"vocoder: {wav.shape[-1]} samples for a {window.window_frames}-frame window, expected "
                            f"{expected} ({window.hop} per frame)")
    return wav[:, window.crop_start:window.crop_end].astype(np.float32, copy=True)               # (B, hop F)
