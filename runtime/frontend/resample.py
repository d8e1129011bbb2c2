"""Band-limited resampling identical to torchaudio's default `sinc_interp_hann`, in numpy.

upstream: torchaudio/functional/functional.py:_get_sinc_resample_kernel / _apply_sinc_resample_kernel
(used through `torchaudio.transforms.Resample(22050, 16000)` in indextts/infer_v2.py).

Why a re-implementation and not scipy/soxr: IndexTTS2 derives its 16 kHz speaker audio (w2v-BERT and
CAMPPlus inputs) with exactly this filter, so any other resampler changes every downstream feature.

The method, after reducing both rates by their gcd (22050 -> 16000 becomes 441 -> 320):
output sample `j*new + k` is the dot product of input samples `j*orig - width ... j*orig + orig + width`
with the k-th polyphase filter, a windowed sinc with cutoff `rolloff * min(orig, new)` and
`lowpass_filter_width` zero crossings each side. The kernel is built in float64 and stored in float32
(as torchaudio does when no dtype is given); the convolution runs in float32 as one
`(frames, taps) @ (taps, new)` matrix product over a strided view of the zero-padded signal.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@lru_cache(maxsize=16)
def sinc_resample_kernel(orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """Polyphase kernel (new, 2*width + orig) float32 and `width`, for gcd-REDUCED rates.

    Mirrors torchaudio's dtype path exactly: the tap positions `idx` are float64, but the phase offsets
    `arange(0, -new, -1) / new` come from an int64 tensor divided by an int, i.e. the float32 default
    dtype, and are only then promoted to float64.
    """
    if lowpass_filter_width <= 0:
        raise ValueError(f"lowpass_filter_width must be positive, got {lowpass_filter_width}")
    base_freq = min(orig_freq, new_freq) * rolloff
    width = math.ceil(lowpass_filter_width * orig_freq / base_freq)
    idx = np.arange(-width, width + orig_freq, dtype=np.float64)[None, :] / orig_freq      # (1, K)
    phase = (np.arange(0, -new_freq, -1, dtype=np.float64) / new_freq).astype(np.float32)  # (new,)
    t = phase.astype(np.float64)[:, None] + idx                                              # (new, K)
    t *= base_freq
    np.clip(t, -lowpass_filter_width, lowpass_filter_width, out=t)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel *= window * (base_freq / orig_freq)
    kernel32 = kernel.astype(np.float32)
    kernel32.setflags(write=False)
    return kernel32, width


def resampled_length(length: int, orig_freq: int, new_freq: int) -> int:
    """torchaudio's output length: `ceil(float32(new * length / orig))` on the gcd-reduced rates.

    The ratio is a Python float64 but `torch.as_tensor` stores it as float32 before the ceil, so for long
    inputs a fraction below float32 resolution is lost (e.g. 239999.002 -> 239999). Reproduced as is.
    """
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    return int(np.ceil(np.float32(new * length / orig)))


def resample_sinc(audio: np.ndarray, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                  rolloff: float = 0.99) -> np.ndarray:
    """Resample `audio` (..., N) from `orig_freq` to `new_freq` Hz along the last axis.

    Returns float32 (..., ceil(new*N/orig)) (see `resampled_length`); equal rates return the input
    unchanged, like torchaudio.
    """
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    if int(orig_freq) == int(new_freq):
        return audio
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    kernel, width = sinc_resample_kernel(orig, new, int(lowpass_filter_width), float(rolloff))
    x = np.asarray(audio, dtype=np.float32)
    lead_shape, length = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, length)                                               # (B, N)
    padded = np.pad(rows, ((0, 0), (width, width + orig)))                    # (B, N + 2w + orig)
    taps = kernel.shape[1]                                                     # K = 2w + orig
    frames = np.ascontiguousarray(sliding_window_view(padded, taps, axis=-1)[:, ::orig, :])  # (B, F, K)
    out = np.matmul(frames, kernel.T)                                          # (B, F, new) float32
    out = out.reshape(rows.shape[0], -1)[:, :resampled_length(length, orig_freq, new_freq)]
    return np.ascontiguousarray(out).reshape(*lead_shape, -1)
