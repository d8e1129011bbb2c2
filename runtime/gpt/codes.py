"""A segment's speech codes: the decode loop's output cut at the first stop token.

upstream: indextts/infer_v2.py:infer_generator, per-segment steps 2-3: generation, then
`codes[:, :first index of stop_mel_token]` (UPSTREAM.md §2.7). The cut lives here, next to the loop,
because every pipeline (the runtime, the eager reference, the scheduler) must cut the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from runtime.gpt.generate import GenerationConfig, GenerationResult, GptCondition, generate
from runtime.gpt.sampling import DrawSource
from runtime.gpt.steps import GptSteps

log = logging.getLogger(__name__)


@dataclass
class SegmentCodes:
    text_ids: np.ndarray        # (L,) int64, as tokenized
    codes: np.ndarray           # (N,) int64, stop token removed
    result: GenerationResult


def cut_at_stop(codes: np.ndarray, stop_mel_token: int) -> np.ndarray:
    """`codes[: first index of the stop token]` (all of them when there is none). (N_gen,) -> (N,)"""
    hits = np.flatnonzero(codes == stop_mel_token)
    return codes[: hits[0]] if hits.size else codes


def segment_codes(steps: GptSteps, condition: GptCondition, emovec: np.ndarray, text_ids: list[int],
                  generation: GenerationConfig, draws: DrawSource, index: int) -> SegmentCodes:
    """Generate one segment's codes and cut them at the first stop token."""
    ids = np.asarray(text_ids, np.int64)                                         # (L,)
    result = generate(steps, condition, emovec, ids, generation, draws=draws)
    return finish_codes(result, ids, steps.geometry.stop_mel_token, index, generation)


def finish_codes(result: GenerationResult, text_ids: np.ndarray, stop_mel_token: int, index: int,
                 generation: GenerationConfig) -> SegmentCodes:
    """A generation's codes cut at the first stop token, with upstream's warnings (whoever ran the loop)."""
    codes = cut_at_stop(result.codes, stop_mel_token)                           # (N,)
    if not result.stopped:
        log.warning("segment %d: no stop token within max_mel_tokens=%d; the audio is cut there",
                    index + 1, generation.max_mel_tokens)
    if codes.size == 0:
        log.warning("segment %d: the GPT stopped at once; the segment is silent", index + 1)
    return SegmentCodes(np.asarray(text_ids, np.int64), codes, result)
