"""The s2mel log-mel spectrogram (22.05 kHz, 80 slaney bands), in numpy float32.

upstream: indextts/s2mel/modules/audio.py:mel_spectrogram (HiFi-GAN style), called by infer_v2 as
`mel_fn(audio_22k)` for the reference mel `ref_mel`; its mel basis is librosa.filters.mel(htk=False,
norm='slaney').

The reference mel is the prompt the DiT continues, so it has to be the exact upstream feature: reflect
padding of (n_fft - hop)/2 on both sides, `center=False` STFT with a periodic Hann window, magnitude
`sqrt(re^2 + im^2 + 1e-9)` (the 1e-9 keeps the floor away from zero), slaney mel basis, natural log of
`max(x, 1e-5)`. Every step runs in float32 like the torch original, so the float rounding matches it
more closely than a float64 computation would (numpy >= 2 runs float32 FFTs natively; numpy 1.x
computes them in float64, which stays within the fixture tolerance too).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from runtime.errors import InputError

_F_SP = 200.0 / 3           # Hz per mel in the linear region of the slaney scale
_MIN_LOG_HZ = 1000.0        # the slaney scale turns logarithmic at 1 kHz ...
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0   # ... with this step in ln(Hz) per mel


def hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney (Auditory Toolbox) mel scale: linear below 1 kHz, logarithmic above. float64."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_region = hz >= _MIN_LOG_HZ
    return np.where(log_region, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    """Inverse of `hz_to_mel_slaney`. float64."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


@lru_cache(maxsize=8)
def slaney_mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                     fmax: float | None = None) -> np.ndarray:
    """(n_mels, n_fft//2 + 1) float32 triangular filters, area-normalized (librosa norm='slaney').

    Filter i rises from mel point i to i+1 and falls to i+2 (points equally spaced in slaney mel from
    fmin to fmax, mapped back to Hz), evaluated at the FFT bin frequencies, then scaled by
    2 / (f[i+2] - f[i]). As in librosa the triangles are stored in float32 first and the scaling is
    applied to the float32 values (two roundings), which this reproduces.
    """
    fmax = sr / 2.0 if fmax is None else float(fmax)
    fft_freqs = np.arange(n_fft // 2 + 1) * (1.0 / (n_fft * (1.0 / sr)))               # (F,)
    mel_pts = np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    hz_pts = mel_to_hz_slaney(mel_pts)                                                  # (M+2,)
    widths = np.diff(hz_pts)                                                            # (M+1,)
    ramps = hz_pts[:, None] - fft_freqs[None, :]                                        # (M+2, F)
    lower = -ramps[:n_mels] / widths[:n_mels, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)              # (M, F)
    enorm = 2.0 / (hz_pts[2:n_mels + 2] - hz_pts[:n_mels])
    weights = (weights.astype(np.float64) * enorm[:, None]).astype(np.float32)
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=4)
def _periodic_hann(n: int) -> np.ndarray:
    """torch.hann_window(n) (periodic): 0.5 - 0.5 cos(2 pi k / n), k < n. float32."""
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)
    w.setflags(write=False)
    return w


def s2mel_mel(audio_22k: np.ndarray, n_fft: int = 1024, hop: int = 256, win: int = 1024, n_mels: int = 80,
              sr: int = 22050, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Log-mel of (1, N) float32 audio -> (1, n_mels, N // hop) float32 (for n_fft - hop even)."""
    x = np.asarray(audio_22k, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"s2mel_mel expects audio of shape (B, N), got {x.shape}")
    pad = (n_fft - hop) // 2
    if x.shape[-1] <= pad:
        raise InputError(f"audio of {x.shape[-1]} samples is too short for the reference mel "
                         f"(needs more than {pad} samples at {sr} Hz)")
    if win != n_fft:
        raise ValueError(f"s2mel_mel supports win == n_fft only (got win {win}, n_fft {n_fft})")
    padded = np.pad(x, ((0, 0), (pad, pad)), mode="reflect")                        # (B, N + 2p)
    frames = sliding_window_view(padded, n_fft, axis=-1)[:, ::hop, :]                # (B, T, n_fft)
    spec = np.fft.rfft(frames * _periodic_hann(win), axis=-1)                        # (B, T, F) c64
    power = spec.real * spec.real + spec.imag * spec.imag                            # (B, T, F) f32
    mag = np.sqrt(power + np.float32(1e-9))
    basis = slaney_mel_basis(int(sr), int(n_fft), int(n_mels), float(fmin), fmax)   # (M, F)
    mel = np.matmul(basis, mag.transpose(0, 2, 1))                                   # (B, M, T)
    return np.log(np.maximum(mel, np.float32(1e-5))).astype(np.float32)
