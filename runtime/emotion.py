"""Emotion control on the host: emotion-source resolution, the 8-dim emotion vector, and its mixing.

upstream: indextts/infer_v2.py — `IndexTTS2.infer_generator` (emotion-source order, alpha truncation,
emotion-vector matrix), `IndexTTS2.normalize_emo_vec`, module-level `find_most_similar_cosine`,
`QwenEmotion.inference`/`convert` (the response parsing half; the LLM itself is in
runtime/emotion_llm.py); indextts/gpt/model_v2.py:`UnifiedVoice.merge_emovec` (the final combine).
UPSTREAM.md §2.2, §2.5, §2.7 step 1, §2.11.

Torch-free on purpose: the runtime resolves emotions without PyTorch. The user-facing emotion vector is
a list of Python floats in upstream, so the alpha truncation and `normalize_emo_vec` are done in Python
float64 arithmetic in upstream's exact operation order (other orders differ by 1 ulp, and the fixtures
compare them bit for bit). Everything that upstream does on torch tensors (cosine similarity, weighted
sum, final mix) is float32 here, in the same order of operations.

Vector order everywhere: happy, angry, sad, afraid, disgusted, melancholic, surprised, calm.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from runtime.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

EMOTION_NAMES: tuple[str, ...] = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised",
                                  "calm")
# The emotion LLM's labels, in the same order as EMOTION_NAMES.
EMOTION_LABELS_ZH: tuple[str, ...] = ("高兴", "愤怒", "悲伤", "恐惧", "反感", "低落", "惊讶", "自然")
NUM_EMOTIONS = len(EMOTION_NAMES)
DEFAULT_EMO_NUM: tuple[int, ...] = (3, 17, 2, 8, 4, 5, 10, 24)  # prototypes per category (config emo_num)

# normalize_emo_vec's per-category bias (web UI helper).
EMO_BIAS: tuple[float, ...] = (0.9375, 0.875, 1.0, 1.0, 0.9375, 0.9375, 0.6875, 0.5625)
EMO_SUM_LIMIT = 0.8

# QwenEmotion post-processing constants.
SCORE_MIN, SCORE_MAX = 0.0, 1.2
# Words in the emotion text that make the sad score count as melancholic (the LLM cannot tell them apart).
MELANCHOLIC_WORDS: tuple[str, ...] = ("低落", "melancholy", "melancholic", "depression", "depressed", "gloomy")
# English keys accepted in the LLM response besides the Chinese labels. The eight vector names come from
# the facts; the noun forms and "neutral" are our choice (upstream's own comments call calm "neutral").
ENGLISH_ALIASES: dict[str, str] = {
    **dict(zip(EMOTION_NAMES, EMOTION_LABELS_ZH)),
    "happiness": "高兴", "anger": "愤怒", "sadness": "悲伤", "fear": "恐惧", "disgust": "反感",
    "melancholy": "低落", "surprise": "惊讶", "neutral": "自然",
}


# ----------------------------------------------------------------------------------------------------
# The user's emotion vector (Python floats)
# ----------------------------------------------------------------------------------------------------

def validate_emo_vector(vec: Any) -> list[float]:
    """Check a user emotion vector and return it as 8 Python floats.

    Upstream accepts anything and fails late (or silently produces garbage); here a wrong length, a
    non-numeric entry (strings, None, bools), a NaN / infinite or a negative weight is an InputError
    naming the offending entry, before any model runs.
    """
    if isinstance(vec, (str, bytes)) or not hasattr(vec, "__len__"):
        raise InputError(f"emotion vector: expected a list of {NUM_EMOTIONS} numbers "
                         f"({', '.join(EMOTION_NAMES)}), got {type(vec).__name__}")
    if isinstance(vec, np.ndarray) and vec.ndim != 1:
        raise InputError(f"emotion vector: expected a flat list of {NUM_EMOTIONS} numbers, got shape {vec.shape}")
    values = list(vec)
    if len(values) != NUM_EMOTIONS:
        raise InputError(f"emotion vector: expected {NUM_EMOTIONS} weights ({', '.join(EMOTION_NAMES)}), "
                         f"got {len(values)}")
    out: list[float] = []
    for name, value in zip(EMOTION_NAMES, values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
            raise InputError(f"emotion vector: weight '{name}' is not a number: {value!r}")
        x = float(value)
        if not math.isfinite(x):
            raise InputError(f"emotion vector: weight '{name}' is {x} (must be a finite number)")
        if x < 0.0:
            raise InputError(f"emotion vector: weight '{name}' is negative ({x}); weights must be >= 0")
        out.append(x)
    return out


def truncate_emo_vector(vec: Sequence[float], alpha: float) -> list[float]:
    """Scale an emotion vector by alpha clamped to [0, 1], truncating toward zero to 4 decimals.

    Exactly upstream's Python-float expression `int(x * s * 10000) / 10000` (left-to-right products,
    so e.g. 0.95 * 0.6 * 10000 = 5699.999999999999 -> 0.5699); with s == 1 the vector is returned
    unchanged (no truncation at all).
    """
    scale = max(0.0, min(1.0, float(alpha)))
    if scale == 1.0:
        return [float(x) for x in vec]
    return [int(float(x) * scale * 10000) / 10000 for x in vec]


def normalize_emo_vec(vec: Sequence[float], apply_bias: bool = True) -> list[float]:
    """The web UI's emotion-vector normalization (upstream `IndexTTS2.normalize_emo_vec`; infer does not call it).

    Order matters at the ulp level: multiply by the bias, sum with Python's left-to-right `sum`, and only
    if the sum exceeds 0.8 (strictly) multiply every entry by k = 0.8 / sum.
    """
    values = [float(x) for x in vec]
    if apply_bias:
        values = [x * b for x, b in zip(values, EMO_BIAS)]
    total = sum(values)
    if total > EMO_SUM_LIMIT:
        k = EMO_SUM_LIMIT / total
        values = [x * k for x in values]
    return values


def weight_vector(vec: Sequence[float]) -> np.ndarray:
    """`torch.tensor(emo_vector)`: the Python floats rounded to float32, shape (8,)."""
    return np.asarray([float(x) for x in vec], dtype=np.float64).astype(np.float32)


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
    Our additions: vectors are validated (InputError), and a non-finite alpha is an InputError
    (upstream would silently turn a NaN alpha into 1.0 for vectors and NaN embeddings for audio).
    """
    alpha = float(emo_alpha)
    if not math.isfinite(alpha):
        raise InputError(f"emo_alpha must be a finite number, got {emo_alpha!r}")
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


# ----------------------------------------------------------------------------------------------------
# Emotion-vector matrix (§2.5) and merge (§2.7 step 1)
# ----------------------------------------------------------------------------------------------------

def cosine_similarity(query: np.ndarray, matrix: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """`F.cosine_similarity(query (1, C), matrix (N, C), dim=1)` in float32 -> (N,).

    PyTorch (>= 1.12) divides each side by its own L2 norm clamped to at least eps, then sums the
    product: `sum((x / max(|x|, eps)) * (y / max(|y|, eps)))` — not `x.y / max(|x||y|, eps)`.
    """
    x = np.asarray(query, dtype=np.float32).reshape(1, -1)
    y = np.asarray(matrix, dtype=np.float32)
    eps32 = np.float32(eps)
    x_norm = np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), eps32)
    y_norm = np.maximum(np.sqrt(np.sum(y * y, axis=1, keepdims=True)), eps32)
    return np.sum((x / x_norm) * (y / y_norm), axis=1, dtype=np.float32)


def _split_rows(array: np.ndarray, emo_num: Sequence[int], name: str) -> tuple[np.ndarray, ...]:
    if array.ndim != 2:
        raise CheckpointError(f"{name}: expected a 2-D matrix, got shape {tuple(array.shape)}")
    if array.shape[0] != sum(emo_num):
        raise CheckpointError(f"{name}: has {array.shape[0]} rows, but emo_num {list(emo_num)} sums to "
                              f"{sum(emo_num)} (is config.yaml for another checkpoint?)")
    bounds = np.cumsum([0, *emo_num])
    return tuple(array[a:b] for a, b in zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class EmotionMix:
    """The emotion-vector mode's intermediate and final tensors (names as in upstream)."""

    indices: np.ndarray        # (8,) int64: the chosen prototype within each category
    emo_matrix: np.ndarray     # (8, D) float32: the chosen emotion rows
    emovec_mat: np.ndarray     # (1, D) float32: sum_i w_i * emo_matrix[i]
    emovec: np.ndarray         # (1, D) float32: emovec_mat + (1 - sum(w)) * merged emovec


@dataclass(frozen=True)
class EmotionMatrices:
    """feat1 (speaker-space prototypes) and feat2 (GPT-space emotion vectors), split per category by emo_num."""

    spk: tuple[np.ndarray, ...]   # 8 chunks (emo_num[i], style_dim) float32
    emo: tuple[np.ndarray, ...]   # 8 chunks (emo_num[i], model_dim) float32
    emo_num: tuple[int, ...]

    @classmethod
    def from_arrays(cls, feat1: np.ndarray, feat2: np.ndarray, emo_num: Sequence[int] = DEFAULT_EMO_NUM,
                    source: str = "feat1/feat2") -> "EmotionMatrices":
        """Split (sum(emo_num), C) matrices into categories; wrong shapes are a CheckpointError."""
        emo_num = tuple(int(n) for n in emo_num)
        if len(emo_num) != NUM_EMOTIONS or any(n <= 0 for n in emo_num):
            raise CheckpointError(f"{source}: emo_num must be {NUM_EMOTIONS} positive counts, got {list(emo_num)}")
        spk = _split_rows(np.ascontiguousarray(feat1, dtype=np.float32), emo_num, f"{source} (feat1, spk_matrix)")
        emo = _split_rows(np.ascontiguousarray(feat2, dtype=np.float32), emo_num, f"{source} (feat2, emo_matrix)")
        return cls(spk=spk, emo=emo, emo_num=emo_num)

    @property
    def style_dim(self) -> int:
        return int(self.spk[0].shape[1])

    @property
    def model_dim(self) -> int:
        return int(self.emo[0].shape[1])

    def similarities(self, style: np.ndarray) -> tuple[np.ndarray, ...]:
        """Cosine similarity of the style vector to every prototype, per category (float32)."""
        style = np.asarray(style, dtype=np.float32).reshape(-1)
        if style.shape[0] != self.style_dim:
            raise InputError(f"speaker style vector has {style.shape[0]} values, the emotion prototypes "
                             f"(feat1) have {self.style_dim}")
        return tuple(cosine_similarity(style, chunk) for chunk in self.spk)

    def select_prototypes(self, style: np.ndarray, use_random: bool = False,
                          rng: random.Random | np.random.Generator | None = None) -> np.ndarray:
        """Per category, the prototype most similar to the speaker style (first one on ties), or a random one.

        The random path draws `randint(0, n - 1)` per category like upstream (Python's `random` module
        when `rng` is None or a `random.Random`; a numpy Generator draws `integers(0, n)` instead).
        """
        if use_random:
            if isinstance(rng, np.random.Generator):
                picks = [int(rng.integers(0, n)) for n in self.emo_num]
            else:
                draw = rng if rng is not None else random
                picks = [draw.randint(0, n - 1) for n in self.emo_num]
            return np.asarray(picks, dtype=np.int64)
        return np.asarray([int(np.argmax(s)) for s in self.similarities(style)], dtype=np.int64)

    def mix(self, weights: np.ndarray, indices: np.ndarray, emovec: np.ndarray) -> EmotionMix:
        """Weighted sum of the chosen emotion rows, then `emovec_mat + (1 - sum(w)) * emovec` (float32)."""
        w = np.asarray(weights, dtype=np.float32).reshape(-1)
        if w.shape[0] != NUM_EMOTIONS:
            raise InputError(f"emotion weights: expected {NUM_EMOTIONS}, got {w.shape[0]}")
        emo_matrix = np.stack([chunk[int(k)] for chunk, k in zip(self.emo, indices)]).astype(np.float32)
        weighted = w[:, None] * emo_matrix
        emovec_mat = np.sum(weighted, axis=0, dtype=np.float32)[None, :]
        rest = np.float32(1.0) - np.sum(w, dtype=np.float32)
        out = emovec_mat + rest * np.asarray(emovec, dtype=np.float32)
        return EmotionMix(np.asarray(indices, dtype=np.int64), emo_matrix, emovec_mat, out.astype(np.float32))


def mix_emovec(matrices: EmotionMatrices, emo_vector: Sequence[float], style: np.ndarray, emovec: np.ndarray,
               use_random: bool = False, rng: random.Random | np.random.Generator | None = None) -> EmotionMix:
    """The whole emotion-vector mode: float32 weights, prototype choice, weighted sum, final mix (§2.5)."""
    indices = matrices.select_prototypes(style, use_random, rng)
    return matrices.mix(weight_vector(emo_vector), indices, emovec)


def merge_emovec(base: np.ndarray, emo: np.ndarray, alpha: float) -> np.ndarray:
    """`base + alpha * (emo - base)` in float32: speaker emovec moved toward the emotion audio's emovec."""
    base = np.asarray(base, dtype=np.float32)
    emo = np.asarray(emo, dtype=np.float32)
    return (base + np.float32(alpha) * (emo - base)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Parsing the emotion LLM's answer (§2.11)
# ----------------------------------------------------------------------------------------------------

# `key: number` pairs in a non-JSON answer: the key is a run without spaces, quotes, brackets, colons,
# commas or dots (so "1. 高兴: 0.5" yields 高兴), an optional closing quote, an ASCII or full-width colon.
_PAIR = re.compile(r"""([^\s"'{}\[\]:：,，.。]+)["']?\s*[:：]\s*["']?([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)""")


def _score(value: Any) -> float | None:
    """A response value as a float; None (treated as missing) for non-numbers, bools and NaN."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, Real):
        return None
    x = float(value)
    return None if math.isnan(x) else x


def parse_emotion_response(content: str) -> dict[str, float]:
    """The LLM's answer as {Chinese label: score}: JSON first, `key: number` pairs as the fallback.

    English keys (case-insensitive, see ENGLISH_ALIASES) map to the Chinese labels; a Chinese key wins
    over an alias of the same category; unknown keys and non-numeric values are dropped.
    """
    raw: Any
    try:
        raw = json.loads(content)
    except ValueError:
        raw = None
    if not isinstance(raw, dict):  # invalid JSON, or JSON that is not an object: scan for pairs
        raw = {m.group(1): m.group(2) for m in _PAIR.finditer(content)}
    scores: dict[str, float] = {}
    aliased: dict[str, float] = {}
    for key, value in raw.items():
        x = _score(value)
        name = str(key).strip()
        if x is None:
            continue
        if name in EMOTION_LABELS_ZH:
            scores[name] = x
        elif name.lower() in ENGLISH_ALIASES:
            aliased[ENGLISH_ALIASES[name.lower()]] = x
    return {**aliased, **scores}


def apply_melancholic_swap(scores: Mapping[str, float], text: str) -> dict[str, float]:
    """Swap the sad and melancholic scores when the emotion text names melancholy (case-insensitive)."""
    out = dict(scores)
    lowered = text.lower()
    if any(word in lowered for word in MELANCHOLIC_WORDS):
        out["悲伤"], out["低落"] = scores.get("低落", 0.0), scores.get("悲伤", 0.0)
    return out


def scores_to_emotions(scores: Mapping[str, float]) -> dict[str, float]:
    """{English name: score} in vector order: clamp to [0, 1.2], missing = 0, all <= 0 -> calm = 1.0."""
    out = {name: max(SCORE_MIN, min(SCORE_MAX, float(scores.get(label, 0.0))))
           for name, label in zip(EMOTION_NAMES, EMOTION_LABELS_ZH)}
    if all(v <= 0.0 for v in out.values()):
        log.info("emotion text: no emotion detected; using a calm voice")
        out["calm"] = 1.0
    return out


def emotions_from_response(content: str, text: str) -> dict[str, float]:
    """The emotion LLM's decoded answer for `text` -> {happy, ..., calm} (QwenEmotion's post-processing)."""
    return scores_to_emotions(apply_melancholic_swap(parse_emotion_response(content), text))
