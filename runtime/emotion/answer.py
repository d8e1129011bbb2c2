"""Parsing the emotion LLM's text answer into the 8 emotion scores.

upstream: indextts/infer_v2.py:QwenEmotion (`inference`, `convert`, `clamp_score`); UPSTREAM.md §2.11.
Torch-free, so it is shared with any other LLM backend.
"""

from __future__ import annotations

import json
import logging
import math
import re
from numbers import Real
from typing import Any, Mapping

log = logging.getLogger(__name__)

from runtime.emotion.vectors import EMOTION_LABELS_ZH, EMOTION_NAMES

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
