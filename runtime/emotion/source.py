"""Which emotion a request uses: upstream's emotion-source order as pure logic, and the final emotion
vector of a request (merge with the emotion reference, then the emotion-vector mix).

upstream: indextts/infer_v2.py:infer_generator — UPSTREAM.md §2.2 (source order), §2.7 step 1 (emovec).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np

from runtime.errors import InputError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from runtime.request import SynthesisRequest

from runtime.emotion.vectors import (
    EmotionMatrices,
    merge_emovec,
    mix_emovec,
    truncate_emo_vector,
    validate_emo_vector,
)

# ----------------------------------------------------------------------------------------------------
# Emotion-source resolution (§2.2)
# ----------------------------------------------------------------------------------------------------

EmotionSourceKind = Literal["text", "vector", "audio", "speaker"]


@dataclass(frozen=True)
class EmotionPlan:
    """Which emotion source a synthesis call uses, after upstream's resolution order.

    `emo_audio` is the audio whose emotion embedding is merged with the speaker's (`merge_emovec` with
    `merge_alpha`); it is the speaker prompt whenever no separate emotion audio is used, and then
    `merge_alpha` is 1.0. `emo_vector` (already alpha-truncated, Python floats) is set in the "text" and
    "vector" modes and drives the emotion-vector matrix (§2.5).
    """

    source: EmotionSourceKind
    emo_audio: Any
    merge_alpha: float
    emo_vector: tuple[float, ...] | None = None
    emo_text: str | None = None


TextToEmotion = Callable[[str], "Mapping[str, float] | Sequence[float]"]


def resolve_emotion_source(
    text: str,
    spk_audio_prompt: Any,
    emo_audio_prompt: Any = None,
    emo_alpha: float = 1.0,
    emo_vector: Sequence[float] | None = None,
    use_emo_text: bool = False,
    emo_text: str | None = None,
    text_to_emotion: TextToEmotion | None = None,
) -> EmotionPlan:
    """Apply upstream's emotion-source order (UPSTREAM §2.2), as pure logic.

    1. text mode or an explicit vector discards the emotion audio;
    2. text mode: `emo_text or text` goes through `text_to_emotion` (the emotion LLM; a mapping in
       vector order or 8 floats); 3. a vector is alpha-truncated; 4. without emotion audio the speaker
       prompt is used, with merge alpha 1.0 (so alpha only acts through the truncation in 2–3).
    In audio mode `emo_alpha` goes to merge_emovec as given (upstream does not clamp it there).
    Our additions: vectors are validated (InputError), an alpha outside [0, 1] (upstream's UI range) and a
    non-finite alpha are InputErrors
    (upstream would silently turn a NaN alpha into 1.0 for vectors and NaN embeddings for audio).
    """
    alpha = float(emo_alpha)
    if not math.isfinite(alpha):
        raise InputError(f"emo_alpha must be a finite number, got {emo_alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        # upstream's API takes any float, its web UI offers 0..1: past 1 the emotion embedding is
        # extrapolated beyond the reference (audio) or the vector scaled past its own weights
        raise InputError(f"emo_alpha must be between 0 and 1 (the emotion strength: 0 none, 1 the full "
                         f"reference or vector), got {emo_alpha!r}")
    if use_emo_text or emo_vector is not None:
        emo_audio_prompt = None
    source: EmotionSourceKind
    used_text = None
    if use_emo_text:
        used_text = emo_text or text
        if text_to_emotion is None:
            raise InputError("emotion from text was requested, but no emotion LLM is available "
                             "(the checkpoint's qwen0.6bemo4-merge/ model is needed)")
        scores = text_to_emotion(used_text)
        emo_vector = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
        source = "text"
    elif emo_vector is not None:
        source = "vector"
    else:
        source = "audio" if emo_audio_prompt is not None else "speaker"
    vector = None
    if emo_vector is not None:
        vector = tuple(truncate_emo_vector(validate_emo_vector(emo_vector), alpha))
    if emo_audio_prompt is None:
        return EmotionPlan(source, spk_audio_prompt, 1.0, vector, used_text)
    return EmotionPlan(source, emo_audio_prompt, alpha, vector, used_text)


def emotion_plan(request: "SynthesisRequest", text_to_emotion: TextToEmotion | None) -> EmotionPlan:
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
