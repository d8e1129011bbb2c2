"""Reading reference audio exactly as upstream's `librosa.load(path, sr=sr)` does, without librosa.

upstream: indextts/infer_v2.py:IndexTTS2._load_and_cut_audio (`librosa.load(path, sr=sr)`, then the first
`int(max_seconds * sr)` samples); librosa 0.11 core/audio.py:load / to_mono / resample (res_type
"soxr_hq") and util/utils.py:fix_length.

librosa's path, reproduced step by step because every feature downstream depends on the samples:
1. soundfile decodes the file as float32 (integer PCM divided by its full scale);
2. several channels are averaged into one (`np.mean` over the channel axis, in float32);
3. if the file's rate differs from `sr`, python-soxr resamples the float32 signal with quality "HQ"
   (librosa's default res_type "soxr_hq"); soxr keeps float32 in float32 out;
4. the result is cut or zero-padded to `ceil(N * sr / sr_native)` samples and kept float32.
The speaker prompt is loaded at 22050 Hz and the emotion prompt directly at 16 kHz (UPSTREAM.md 2.3, 2.4).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr

from runtime.errors import InputError

log = logging.getLogger(__name__)

SILENCE_PEAK = 1e-4   # below this peak amplitude (-80 dBFS) a reference carries no usable voice


@dataclass(frozen=True)
class AudioBytes:
    """Reference audio held in memory (a server's upload): decoded from the bytes, never written to a file.
    `name` stands for it in messages and logs (e.g. "voice v_1a2b…", "upload 'emo_audio'")."""

    data: bytes = b""
    name: str = "uploaded audio"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"AudioBytes({self.name!r}, {len(self.data)} bytes)"


#: a reference: a file, or bytes in memory
AudioSource = Union[str, Path, AudioBytes]


def _read(source: Path | AudioBytes) -> tuple[np.ndarray, int]:
    target = io.BytesIO(source.data) if isinstance(source, AudioBytes) else str(source)
    try:
        data, native_sr = sf.read(target, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as err:
        formats = ", ".join(sorted(sf.available_formats()))
        raise InputError(f"{source}: cannot decode the audio ({err}); readable formats are those of "
                         f"libsndfile: {formats}") from err
    return data.T, int(native_sr)


def _decode(path: Path | AudioBytes) -> tuple[np.ndarray, int]:
    """soundfile read -> ((C, N) or (N,) float32, native rate), every failure as InputError."""
    if isinstance(path, AudioBytes):
        if not path.data:
            raise InputError(f"{path}: audio is empty (0 bytes)")
        return _read(path)
    if not path.exists():
        raise InputError(f"{path}: audio file not found")
    if not path.is_file():
        raise InputError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: audio file is empty (0 bytes)")
    return _read(path)


def _fix_length(y: np.ndarray, size: int) -> np.ndarray:
    """librosa.util.fix_length: cut to `size` or zero-pad at the end."""
    if y.shape[-1] >= size:
        return y[..., :size]
    return np.pad(y, (0, size - y.shape[-1]))


def load_audio(path: AudioSource, sr: int, max_seconds: float = 15.0) -> np.ndarray:
    """Mono float32 audio (1, N) at `sr` Hz, at most `int(max_seconds * sr)` samples.

    Raises InputError naming the file when it is missing, empty, undecodable, holds no samples or
    holds non-finite samples. Silence is checked separately (`check_not_silent`).
    """
    path = path if isinstance(path, AudioBytes) else Path(path)
    y, native_sr = _decode(path)
    if y.ndim > 1:                                             # (C, N) -> (N,), librosa.to_mono
        y = np.mean(y, axis=tuple(range(y.ndim - 1)))
    if y.shape[-1] == 0:
        raise InputError(f"{path}: the audio holds no samples")
    if not np.all(np.isfinite(y)):
        raise InputError(f"{path}: the audio holds non-finite samples (NaN or inf)")
    if native_sr != sr:
        target = int(math.ceil(y.shape[-1] * (float(sr) / native_sr)))
        log.debug("%s: resampling %d Hz -> %d Hz with soxr HQ", path, native_sr, sr)
        y = _fix_length(soxr.resample(y, native_sr, sr, quality="soxr_hq"), target)
        y = np.asarray(y, dtype=np.float32)
    y = y[: int(max_seconds * sr)]
    return np.ascontiguousarray(y, dtype=np.float32)[None, :]


def check_not_silent(audio: np.ndarray, path: str | Path, threshold: float = SILENCE_PEAK) -> None:
    """Raise InputError if `audio`'s peak amplitude is below `threshold` (all-zero or near-silent).

    A silent reference gives degenerate features (every log-mel bin at its floor, zero-variance
    normalization in the w2v-BERT front-end), so the voice cannot be cloned from it.
    """
    peak = float(np.max(np.abs(audio))) if np.size(audio) else 0.0
    if peak < threshold:
        raise InputError(f"{path}: the audio is silent (peak amplitude {peak:.3g} < {threshold:g}); "
                         f"use a recording that contains speech")
