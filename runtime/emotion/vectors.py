"""The user's emotion vector and the emotion-vector matrix: validation, alpha truncation, the web UI's
normalization, float32 weights, prototype choice, the weighted mix, and the final merge.

upstream: indextts/infer_v2.py — `IndexTTS2.infer_generator` (alpha truncation, emotion-vector matrix),
`IndexTTS2.normalize_emo_vec`, module-level `find_most_similar_cosine`; indextts/gpt/model_v2.py:
`UnifiedVoice.merge_emovec` (the final combine). UPSTREAM.md §2.5, §2.7 step 1.

Torch-free on purpose: the runtime resolves emotions without PyTorch. The user-facing emotion vector is
a list of Python floats in upstream, so the alpha truncation and `normalize_emo_vec` are done in Python
float64 arithmetic in upstream's exact operation order (other orders differ by 1 ulp, and the fixtures
compare them bit for bit). Everything that upstream does on torch tensors (cosine similarity, weighted
sum, final mix) is float32 here, in the same order of operations.

Vector order everywhere: happy, angry, sad, afraid, disgusted, melancholic, surprised, calm.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from numbers import Real
from typing import Any, Sequence

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
