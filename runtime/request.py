"""What one synthesis call takes and gives, shared by the engine runtime and the eager reference.

upstream: indextts/infer_v2.py:IndexTTS2.infer argument names and defaults (UPSTREAM.md §2.1), the
s2mel solve settings (§3.2.4) and the output form (§2.8: int16, 22.05 kHz, 200 ms of silence between
segments and none after the last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.emotion import EmotionPlan
from runtime.errors import InputError
from runtime.frontend.audio import AudioBytes


#: IndexTTS-2.5's duration factor bounds: upstream's UI range (its `infer` does not check); the 2.5 contracts'
#: DiT axis is sized for the upper bound (runtime/contracts.py MAX_DURATION_FACTOR_25).
MIN_DURATION_FACTOR, MAX_DURATION_FACTOR = 0.5, 2.0


@dataclass(frozen=True)
class SynthesisRequest:
    """One `infer` call's inputs (upstream argument names and defaults, UPSTREAM §2.1)."""

    text: str
    speaker: Path | AudioBytes                 # a file, or bytes in memory (a server's upload)
    emo_audio: Path | AudioBytes | None = None
    emo_alpha: float = 1.0
    emo_vector: tuple[float, ...] | None = None
    use_emo_text: bool = False
    emo_text: str | None = None
    use_random: bool = False
    interval_silence_ms: int = 200
    max_text_tokens_per_segment: int = 120
    quick_streaming_tokens: int = 0
    # IndexTTS-2.5 only (an error on a 2.0 export): the text's language (zh, en, ja, es, ar, ... ; None: zh when
    # the text has a CJK ideograph, else en) and the duration factor on the target mel length (0.5-2.0)
    lang: str | None = None
    duration_factor: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.duration_factor, (int, float)) or not np.isfinite(self.duration_factor) or \
                not MIN_DURATION_FACTOR <= self.duration_factor <= MAX_DURATION_FACTOR:
            raise InputError(f"duration_factor must be a number in [{MIN_DURATION_FACTOR}, {MAX_DURATION_FACTOR}], "
                             f"got {self.duration_factor!r}")
        if self.lang is not None and (not isinstance(self.lang, str) or not self.lang.strip()
                                      or any(c in self.lang for c in "|<> \n")):
            raise InputError(f"lang must be a language code such as zh, en, ja, es, got {self.lang!r}")
        if self.interval_silence_ms < 0:
            raise InputError(f"interval_silence_ms must be >= 0, got {self.interval_silence_ms}")
        if self.max_text_tokens_per_segment < 1:
            raise InputError(f"max_text_tokens_per_segment must be >= 1, got {self.max_text_tokens_per_segment}")
        if self.quick_streaming_tokens < 0:
            raise InputError(f"quick_streaming_tokens must be >= 0, got {self.quick_streaming_tokens}")


@dataclass(frozen=True)
class DecoderSettings:
    """The s2mel Euler solve: upstream's 25 steps, CFG rate 0.7, noise temperature 1.0."""

    steps: int = 25
    cfg_rate: float = 0.7
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InputError(f"the Euler solve needs at least 1 step, got {self.steps}")
        if not np.isfinite(self.cfg_rate) or self.cfg_rate < 0:
            raise InputError(f"cfg_rate must be a finite number >= 0, got {self.cfg_rate}")


@dataclass
class SegmentResult:
    index: int
    text_ids: np.ndarray        # (L,) int64, as tokenized (ids 0/1 included if the text produced them)
    codes: np.ndarray           # (N,) int64, stop token removed
    stopped: bool               # the GPT emitted the stop token (else max_mel_tokens was hit)
    mel: np.ndarray             # (1, 80, T_gen) float32
    pcm: np.ndarray             # (S,) int16, 22.05 kHz
    timings: dict[str, float] = field(default_factory=dict)   # wall seconds per stage
    count: int = 1              # how many segments the request has


@dataclass
class SynthesisResult:
    pcm: np.ndarray             # (N,) int16, segments joined with silence
    sample_rate: int
    segments: list[SegmentResult]
    emotion: EmotionPlan


def silence(sample_rate: int, milliseconds: int) -> np.ndarray:
    """The int16 gap upstream puts between segments."""
    return np.zeros(int(sample_rate * milliseconds / 1000), np.int16)


def join_segments(segments: Sequence[SegmentResult], sample_rate: int, interval_silence_ms: int) -> np.ndarray:
    """All segments' samples with `interval_silence_ms` of silence between them (not after the last)."""
    gap = silence(sample_rate, interval_silence_ms)
    parts: list[np.ndarray] = []
    for seg in segments:
        if parts:
            parts.append(gap)
        parts.append(seg.pcm)
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)
