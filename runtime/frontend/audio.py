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

import logging
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from runtime.errors import InputError

log = logging.getLogger(__name__)

SILENCE_PEAK = 1e-4   # below this peak amplitude (-80 dBFS) a reference carries no usable voice


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """soundfile read -> ((C, N) or (N,) float32, native rate), every failure as InputError."""
    if not path.exists():
        raise InputError(f"{path}: audio file not found")
    if not path.is_file():
        raise InputError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: audio file is empty (0 bytes)")
    try:
        data, native_sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as err:
        formats = ", ".join(sorted(sf.available_formats()))
        raise InputError(f"{path}: cannot decode the audio ({err}); readable formats are those of "
                         f"libsndfile: {formats}") from err
    return data.T, int(native_sr)


def _fix_length(y: np.ndarray, size: int) -> np.ndarray:
    """librosa.util.fix_length: cut to `size` or zero-pad at the end."""
    if y.shape[-1] >= size:
        return y[..., :size]
    return np.pad(y, (0, size - y.shape[-1]))


def load_audio(path: str | Path, sr: int, max_seconds: float = 15.0) -> np.ndarray:
    """Mono float32 audio (1, N) at `sr` Hz, at most `int(max_seconds * sr)` samples.

    Raises InputError naming the file when it is missing, empty, undecodable, holds no samples or
    holds non-finite samples. Silence is checked separately (`check_not_silent`).
    """
    path = Path(path)
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
