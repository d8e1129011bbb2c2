"""The host steps of a request that the runtime and the eager reference share, so the two pipelines
differ only in what runs the models: text -> segments, the emotion plan, the final emotion vector
(merge + emotion-vector mix), a segment's GPT codes (generate, cut at the stop token, warn when cut by
the cap), per-stage timing and the progress line.

upstream: indextts/infer_v2.py:infer_generator (UPSTREAM.md §2.2 emotion source order, §2.6 text, §2.7
step 1 emovec, steps 2-3: generation, then `codes[:, :first index of stop_mel_token]`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from typing import TYPE_CHECKING

from .emotion import EmotionMatrices, EmotionPlan, TextToEmotion, merge_emovec, mix_emovec, resolve_emotion_source
from .errors import InputError
from .generate import GenerationConfig, GenerationResult, generate
from .gpt_steps import GptSteps
from .request import SynthesisRequest
from .sampling import DrawSource

if TYPE_CHECKING:
    from .text.tokenizer import TextTokenizer

log = logging.getLogger("runtime.host_steps")


def text_segments(tokenizer: "TextTokenizer", request: SynthesisRequest) -> list[list[int]]:
    """Text -> per-segment SentencePiece ids (normalize, CJK split, segment; UPSTREAM §2.6)."""
    if not isinstance(request.text, str) or not request.text.strip():
        raise InputError("the text to synthesize is empty")
    segments = tokenizer.segment_ids(request.text, request.max_text_tokens_per_segment,
                                     request.quick_streaming_tokens)
    if not segments:
        raise InputError(f"the text {request.text[:40]!r} gives no tokens to speak")
    return segments


def emotion_plan(request: SynthesisRequest, text_to_emotion: TextToEmotion | None) -> EmotionPlan:
    """Upstream's emotion-source order for this request (the LLM is only called in text mode)."""
    return resolve_emotion_source(request.text, request.speaker, request.emo_audio, request.emo_alpha,
                                  request.emo_vector, request.use_emo_text, request.emo_text,
                                  text_to_emotion if request.use_emo_text else None)


def final_emovec(matrices: EmotionMatrices, plan: EmotionPlan, base: np.ndarray, target: np.ndarray,
                 style: np.ndarray, use_random: bool, choice: np.random.Generator) -> np.ndarray:
    """merge_emovec(base, target, alpha), then the emotion-vector mix when the plan has a vector. -> (1, D)."""
    emovec = merge_emovec(base, target, plan.merge_alpha)                        # (1, D)
    if plan.emo_vector is not None:
        emovec = mix_emovec(matrices, plan.emo_vector, style, emovec, use_random, choice).emovec
    return np.ascontiguousarray(emovec, np.float32)


class Laps:
    """Wall time per stage: `lap(name)` closes the stage that began at the previous lap (or at start)."""

    def __init__(self) -> None:
        self.start = self._clock = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = now - self._clock
        self._clock = now

    def total(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class SegmentCodes:
    text_ids: np.ndarray        # (L,) int64, as tokenized
    codes: np.ndarray           # (N,) int64, stop token removed
    result: GenerationResult


def segment_codes(steps: GptSteps, spk_latent: np.ndarray, emovec: np.ndarray, text_ids: list[int],
                  generation: GenerationConfig, draws: DrawSource, index: int) -> SegmentCodes:
    """Generate one segment's codes and cut them at the first stop token."""
    ids = np.asarray(text_ids, np.int64)                                         # (L,)
    result = generate(steps, spk_latent, emovec, ids, generation, draws=draws)
    hits = np.flatnonzero(result.codes == steps.geometry.stop_mel_token)
    codes = result.codes[: hits[0]] if hits.size else result.codes               # (N,)
    if not result.stopped:
        log.warning("segment %d: no stop token within max_mel_tokens=%d; the audio is cut there",
                    index + 1, generation.max_mel_tokens)
    if codes.size == 0:
        log.warning("segment %d: the GPT stopped at once; the segment is silent", index + 1)
    return SegmentCodes(ids, codes, result)


def log_segment(index: int, count: int, seg: SegmentCodes, samples: int, sample_rate: int, laps: Laps) -> None:
    log.info("segment %d/%d: %d text tokens -> %d codes%s -> %.2f s of audio in %.2f s (%s)", index + 1, count,
             seg.text_ids.size, seg.codes.size, "" if seg.result.stopped else " (max)", samples / sample_rate,
             laps.total(), ", ".join(f"{k} {v:.2f} s" for k, v in laps.timings.items()))
