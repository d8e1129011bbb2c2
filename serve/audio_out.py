"""int16 mono PCM -> the response formats: whole (wav, pcm, flac) or as a stream (wav, pcm)."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}
STREAMED_SIZE = 0xFFFFFFFF          # RIFF/data size of a WAV whose length is not known yet (players read on)


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """The 44-byte header of a 16-bit mono WAV; `data_bytes` None for a stream of unknown length."""
    data = STREAMED_SIZE - 36 if data_bytes is None else data_bytes
    riff = STREAMED_SIZE if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", data))


def pcm_bytes(pcm: np.ndarray) -> bytes:
    return np.ascontiguousarray(pcm, dtype="<i2").tobytes()


def encode(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """The whole audio in `fmt` (wav, pcm: raw little-endian int16, flac)."""
    raw = pcm_bytes(pcm)
    if fmt == "wav":
        return wav_header(sample_rate, len(raw)) + raw
    if fmt == "pcm":
        return raw
    if fmt == "flac":
        out = io.BytesIO()
        sf.write(out, np.asarray(pcm, np.int16), sample_rate, format="FLAC", subtype="PCM_16")
        return out.getvalue()
    raise ValueError(f"unknown response format {fmt!r}")
