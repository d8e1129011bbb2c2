"""Turning the vocoder's float waveform into 16-bit PCM and writing it without ever leaving a partial file.

upstream: indextts/infer_v2.py — `wav = clamp(32767 * wav, -32767, 32767)`, then int16 (the cast
truncates toward zero), 22.05 kHz. Files are written to a temporary name in the target folder and
renamed into place only when complete, so an interrupted or failed run leaves no output file behind.
Streaming (`StreamingWavWriter`) writes to the final path as segments arrive, so a player can follow the
file while it grows (the WAV header is rewritten after each segment); if the run fails or is
interrupted, the file is removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from runtime.errors import InputError


def to_pcm16(wav: np.ndarray) -> np.ndarray:
    """float waveform in [-1, 1] (any shape) -> int16, as upstream: clamp(32767 * x), truncate."""
    scaled = np.clip(np.asarray(wav, dtype=np.float32) * np.float32(32767.0), -32767.0, 32767.0)
    return np.trunc(scaled).astype(np.int16)


def check_output_path(path: str | Path) -> Path:
    """Fail before any work when `path` cannot be written (missing folder, a directory, read-only)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a .wav file name")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: output folder {folder} is not writable")
    return path


class StreamingWavWriter:
    """16-bit PCM WAV written segment by segment to its final path; removed if not closed cleanly.

    Use as a context manager: leaving the block by an exception deletes the partial file.
    """

    def __init__(self, path: str | Path, sample_rate: int) -> None:
        import soundfile as sf

        self.path = check_output_path(path)
        self.samples = 0
        self._file = sf.SoundFile(str(self.path), mode="w", samplerate=sample_rate, channels=1,
                                  subtype="PCM_16", format="WAV")

    def write(self, pcm: np.ndarray) -> None:
        if pcm.dtype != np.int16:
            raise TypeError(f"StreamingWavWriter expects int16 samples, got {pcm.dtype}")
        self._file.write(pcm.reshape(-1))
        self._file.flush()                 # header sizes updated: the file so far is a valid WAV
        self.samples += pcm.size

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        try:
            self._file.close()
        finally:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingWavWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


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
