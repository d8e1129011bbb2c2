"""Kaldi-style filter-bank front-ends at 16 kHz, in numpy: CAMPPlus fbank and w2v-BERT input features.

upstream:
- torchaudio/compliance/kaldi.py:fbank (+ `feat - feat.mean(0)`), the CAMPPlus input built in
  indextts/infer_v2.py (`torchaudio.compliance.kaldi.fbank(audio_16k, num_mel_bins=80, dither=0,
  sample_frequency=16000)`);
- transformers/models/seamless_m4t/feature_extraction_seamless_m4t.py:SeamlessM4TFeatureExtractor.__call__
  (transformers 4.52.1) with the w2v-bert-2.0 preprocessor values, the w2v-BERT input.

Both are the same Kaldi recipe -- 400-sample frames every 160 samples (snip edges), per-frame DC removal,
pre-emphasis 0.97 with the first sample scaled by 0.03, Povey window, 512-point power spectrum, 80
triangular bins on the Kaldi mel scale `1127 ln(1 + f/700)`, `log(max(x, float32 eps))` -- but the two
originals compute it differently, and each is reproduced as it is:
- torchaudio runs everything in float32, with the mel banks themselves built in float32, on the raw
  waveform (no 32768 scaling) and bins from 20 Hz to Nyquist;
- the SeamlessM4T extractor scales by 2^15, computes in float64 (the FFT result stored as complex64),
  builds its filters in float64 with `linspace` mel points (20 Hz - 8 kHz), then normalizes each mel
  bin over the frames in float32 (ddof=1), pads to an even frame count with `padding_value` and stacks
  frame pairs (UPSTREAM.md section 2.3 item 3 states the odd-count rule).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from runtime.errors import InputError

FRAME_LENGTH = 400          # 25 ms at 16 kHz
FRAME_SHIFT = 160           # 10 ms at 16 kHz
FFT_SIZE = 512              # frame length rounded up to a power of two
PREEMPHASIS = 0.97
FLOAT32_EPS = float(np.finfo(np.float32).eps)   # 1.1920929e-07, the log floor of both originals


def _mono_16k(wave: np.ndarray, what: str) -> np.ndarray:
    """(N,) or (1, N) -> (N,) float32; a clear error for anything else."""
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"{what} expects mono audio of shape (N,) or (1, N), got {x.shape}")
    return x


def _frames(x: np.ndarray) -> np.ndarray:
    """(N,) -> (1 + (N - 400) // 160, 400) snip-edges frames (a copy, same dtype)."""
    return np.array(sliding_window_view(x, FRAME_LENGTH)[::FRAME_SHIFT])


# --- torchaudio.compliance.kaldi.fbank (float32 throughout) -------------------------------------------

@lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int, sample_frequency: float, low_freq: float, high_freq: float) -> np.ndarray:
    """(num_bins, 257) float32 Kaldi mel banks, built in float32 like torchaudio's get_mel_banks.

    Bin edges are `mel(low) + i * delta` (delta from Python floats, the per-bin products in float32), the
    FFT bin centres are mapped through the mel scale in float32, and the Nyquist column is zero.
    """
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel range: low {low_freq} Hz, high {high_freq} Hz, Nyquist {nyquist} Hz")
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = np.float32((mel_high - mel_low) / (num_bins + 1))
    low = np.float32(mel_low)
    b = np.arange(num_bins, dtype=np.float32)[:, None]                                   # (M, 1)
    left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
    freqs = np.float32(sample_frequency / FFT_SIZE) * np.arange(FFT_SIZE // 2, dtype=np.float32)
    # float32 argument, log rounded from float64: within 1 ulp of torch's float32 log on any CPU, where
    # numpy's own float32 log may take a machine-dependent SIMD path.
    ratio = np.float32(1.0) + freqs / np.float32(700.0)
    mel = (np.float32(1127.0) * np.log(ratio.astype(np.float64)).astype(np.float32))[None, :]  # (1, 256)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(np.float32(0.0), np.minimum(up, down))                           # (M, 256)
    banks = np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)                           # (M, 257)
    banks.setflags(write=False)
    return banks


@lru_cache(maxsize=2)
def _povey_window_f32() -> np.ndarray:
    """torch.hann_window(400, periodic=False).pow(0.85) in float32."""
    n = np.arange(FRAME_LENGTH, dtype=np.float32)
    hann = np.float32(0.5) - np.float32(0.5) * np.cos(n * np.float32(2 * math.pi / (FRAME_LENGTH - 1)))
    w = np.power(hann, np.float32(0.85)).astype(np.float32)
    w.setflags(write=False)
    return w


def kaldi_fbank(wave_16k: np.ndarray, num_mel_bins: int = 80, sample_frequency: float = 16000.0,
                low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
    """torchaudio.compliance.kaldi.fbank(wave, num_mel_bins, dither=0, sample_frequency) -> (frames, M).

    float32; the waveform is used as given (NOT scaled by 32768). Fewer than 400 samples give (0, M),
    like torchaudio.
    """
    if float(sample_frequency) != 16000.0:
        raise ValueError(f"kaldi_fbank is fixed to 16 kHz framing (25 ms / 10 ms), got {sample_frequency}")
    x = _mono_16k(wave_16k, "kaldi_fbank")
    if x.shape[0] < FRAME_LENGTH:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    frames = _frames(x)                                                        # (F, 400) f32
    frames = frames - frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)             # replicate-pad shift
    frames = frames - np.float32(PREEMPHASIS) * prev
    frames = frames * _povey_window_f32()
    spec = np.fft.rfft(frames, n=FFT_SIZE, axis=1)                             # (F, 257) c64
    power = np.abs(spec) ** 2                                                  # (F, 257) f32
    banks = kaldi_mel_banks(int(num_mel_bins), float(sample_frequency), float(low_freq), float(high_freq))
    mel = power @ banks.T                                                      # (F, M) f32
    return np.log(np.maximum(mel, np.float32(FLOAT32_EPS))).astype(np.float32)


def campplus_features(wave_16k: np.ndarray) -> np.ndarray:
    """CAMPPlus input: 80-bin Kaldi fbank minus its mean over frames -> (frames, 80) float32."""
    fbank = kaldi_fbank(wave_16k, num_mel_bins=80)
    if fbank.shape[0] == 0:
        raise InputError(f"audio of {np.asarray(wave_16k).shape[-1]} samples at 16 kHz is too short for the "
                         f"speaker embedding (needs at least {FRAME_LENGTH} samples, 25 ms)")
    return fbank - fbank.mean(axis=0, keepdims=True)


# --- SeamlessM4TFeatureExtractor (float64 spectrum, float32 normalization) ---------------------------

@lru_cache(maxsize=4)
def seamless_mel_filters(num_mel_bins: int = 80, sampling_rate: int = 16000) -> np.ndarray:
    """(257, M) float64 filters of the extractor: triangles in Kaldi-mel space between `linspace` points
    from 20 Hz to sampling_rate // 2, evaluated at the mel value of each of the 257 FFT bins, no norm."""
    def to_mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    points = np.linspace(to_mel(20.0), to_mel(sampling_rate // 2), num_mel_bins + 2)       # (M+2,)
    bin_mel = to_mel(sampling_rate / FFT_SIZE * np.arange(FFT_SIZE // 2 + 1))               # (257,)
    gaps = np.diff(points)
    slopes = points[None, :] - bin_mel[:, None]                                              # (257, M+2)
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    filters = np.maximum(np.zeros(1), np.minimum(down, up))
    filters.setflags(write=False)
    return filters


@lru_cache(maxsize=2)
def _povey_window_f64() -> np.ndarray:
    w = np.power(np.hanning(FRAME_LENGTH), 0.85)
    w.setflags(write=False)
    return w


def seamless_log_mel(wave_16k: np.ndarray, num_mel_bins: int = 80) -> np.ndarray:
    """(frames, M) float32 log-mel of the extractor, before normalization (a transposed (M, frames) array,
    the memory layout the original's float32 statistics are computed on)."""
    x = _mono_16k(wave_16k, "seamless_features") * np.float32(2 ** 15)       # Kaldi int16 range, f32
    frames = _frames(x.astype(np.float64))                                   # (F, 400) f64
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= PREEMPHASIS * frames[:, :-1].copy()
    frames[:, 0] *= 1 - PREEMPHASIS
    frames *= _povey_window_f64()
    spec = np.fft.rfft(frames, n=FFT_SIZE, axis=1).astype(np.complex64)      # (F, 257) stored c64
    power = np.abs(spec, dtype=np.float64) ** 2.0                            # (F, 257) f64
    mel = np.maximum(1.192092955078125e-07, np.dot(seamless_mel_filters(num_mel_bins).T, power.T))  # (M, F)
    return np.asarray(np.log(mel), dtype=np.float32).T                       # (F, M) view


def seamless_features(wave_16k: np.ndarray, num_mel_bins: int = 80, padding_value: float = 1.0,
                      stride: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """SeamlessM4TFeatureExtractor(...)(wave, sampling_rate=16000) for one clip.

    Returns `input_features` (1, ceil(n/stride), M*stride) float32 and `attention_mask`
    (1, ceil(n/stride)) int32, n = 1 + (N - 400) // 160 frames. Per-bin normalization uses the n real
    frames only; an incomplete last group is filled with `padding_value` frames whose mask is 0, and the
    stacked mask keeps the mask of each group's SECOND frame (`i % stride == 1`), so for stride 2 an odd
    n ends in 0 and the last real frame is masked out with its pad (as upstream).
    """
    x = _mono_16k(wave_16k, "seamless_features")
    if x.shape[0] < FRAME_LENGTH + FRAME_SHIFT:
        raise InputError(f"audio of {x.shape[0]} samples at 16 kHz is too short for the semantic features "
                         f"(needs at least {FRAME_LENGTH + FRAME_SHIFT} samples, two 25 ms frames)")
    feats = seamless_log_mel(x, num_mel_bins)                                 # (n, M) f32
    mean = np.expand_dims(feats.mean(0), 0)
    std = np.sqrt(np.expand_dims(feats.var(0, ddof=1), 0) + 1e-7)
    feats = (feats - mean) / std                                              # (n, M) f32
    n = feats.shape[0]
    pad = (-n) % stride
    feats = np.pad(feats, ((0, pad), (0, 0)), "constant", constant_values=padding_value)
    mask = np.pad(np.ones(n, dtype=np.int32), (0, pad), "constant", constant_values=0)
    rows = (n + pad) // stride
    input_features = feats.reshape(1, rows, num_mel_bins * stride).astype(np.float32)
    attention_mask = mask[1::stride][None, :].astype(np.int32)                # (1, rows): i % stride == 1
    return input_features, attention_mask
