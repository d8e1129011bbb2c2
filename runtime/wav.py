"""Turning the vocoder's float waveform into 16-bit PCM and writing it without ever leaving a partial file.

upstream: indextts/infer_v2.py — `wav = clamp(32767 * wav, -32767, 32767)`, then int16 (the cast
truncates toward zero), 22.05 kHz. Files are written to a temporary name in the target folder and
renamed into place only when complete, so an interrupted or failed run leaves no output file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError


def to_pcm16(wav: np.ndarray) -> np.ndarray:
    """float waveform in [-1, 1] (any shape) -> int16, as upstream: clamp(32767 * x), truncate."""
    scaled = np.clip(np.asarray(wav, dtype=np.float32) * np.float32(32767.0), -32767.0, 32767.0)
    return np.trunc(scaled).astype(np.int16)


def write_wav_atomic(path: str | Path, pcm: np.ndarray, sample_rate: int) -> Path:
    """Write int16 samples (N,) as a 16-bit PCM WAV at `path`, atomically."""
    import soundfile as sf

    path = Path(path)
    if pcm.dtype != np.int16:
        raise TypeError(f"write_wav_atomic expects int16 samples, got {pcm.dtype}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    os.close(fd)
    try:
        sf.write(tmp, pcm.reshape(-1), sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
