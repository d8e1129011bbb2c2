"""Reading the emotion LLM's text answer as the 8 emotion scores, exactly as upstream does.

upstream: indextts/infer_v2.py:QwenEmotion (`inference` l.864–891, `normalize_content`, `convert`,
`clamp_score`, at HEAD ee40fa7, after commits 8887408 "Normalize label-style Qwen emotion outputs" and
843972e "non-numeric scores"); the rules step by step: UPSTREAM.md §2.11. Torch-free, so the runtime and
the eager pipeline (export/) share this one parser through `runtime.emotion.llm.QwenEmotion`.

The steps, each a function below:
1. `decode_answer`: `json.loads` (any JSON value); on invalid JSON, the `key: number` pairs that upstream's
   regex finds (ASCII colon only; the number is `[\\d.]+`, converted with `float`);
2. `apply_melancholic_swap`: when the emotion text names melancholy, the sad and melancholic scores swap;
3. `normalize_labels`: label-style answers ("高兴", {"emotion": "happy"}, {"高兴": "悲伤"}) become one-hot
   scores; English emotion names count only as label VALUES, never as keys;
4. `scores_to_emotions`: the 8 Chinese keys in vector order, `float()` of each value clamped to [0, 1.2]
   (missing = 0); a value `float()` rejects is an `EmotionAnswerError`;
5. every score <= 0: calm = 1.0.

Where upstream crashes, our choices (each keeps what the rules mean):
- a melancholic word in the text and an answer that is JSON but not an object. Upstream indexes the
  value as a dict and raises TypeError/AttributeError. Here a bare label string is first read as its
  one-hot score (what step 3 does with it), and the swap then applies to those scores ("悲伤" becomes
  melancholic, "高兴" stays happy); any other non-object (number, list, null) contributes no score, as in
  step 3, so the swap leaves the voice calm. (Upstream's own order for objects is kept: for
  {"emotion": "悲伤"} the swap inserts 悲伤 = 低落 = 0.0 before the labels are read, which disables the
  one-hot, so that answer gives calm with a melancholic text, as upstream.)
- a regex match whose number `float()` rejects ("高兴: 0.7." captures "0.7."): upstream raises a bare
  ValueError from its dict comprehension; here it is the same `EmotionAnswerError` as a non-numeric score.
Python's own semantics are kept where upstream relies on them: `json.loads` accepts NaN and Infinity,
`float()` accepts numeric strings (" 0.5 ", "1e-1") and JSON booleans (true = 1.0), and the clamp
`max(0, min(1.2, x))` maps NaN to 1.2 and +Infinity to 1.2, -Infinity to 0.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Mapping

from runtime.emotion.vectors import EMOTION_LABELS_ZH, EMOTION_NAMES
from runtime.errors import EmotionAnswerError

log = logging.getLogger(__name__)

# QwenEmotion's clamp range.
SCORE_MIN, SCORE_MAX = 0.0, 1.2
# Words in the emotion text that make the sad score count as melancholic (the LLM cannot tell them apart).
MELANCHOLIC_WORDS: tuple[str, ...] = ("低落", "melancholy", "melancholic", "depression", "depressed", "gloomy")
# Keys whose (label) value names the answer's one emotion, in the order upstream looks them up.
LABEL_ALIAS_KEYS: tuple[str, ...] = ("emotion", "emotion_label", "label", "情感", "情绪")
# English emotion name -> Chinese key; accepted only as a label value.
_ZH_BY_NAME: dict[str, str] = dict(zip(EMOTION_NAMES, EMOTION_LABELS_ZH))
# upstream's fallback pattern for answers that are not JSON: a key without spaces, quotes, colons, dots or
# commas (shortest first), an optional closing quote, an ASCII colon, a run of digits and dots.
_PAIR = re.compile(r'([^\s":.,]+?)"?\s*:\s*([\d.]+)')


def _unusable(answer: str, value: Any) -> EmotionAnswerError:
    return EmotionAnswerError(
        f"the emotion model's answer is unusable: score {value!r} is not a number (answer: {answer!r}). "
        "Retry the request (the model may answer differently), or give the emotion as --emo-vector "
        "(emo_vector) instead of emotion text.", answer=answer)


def decode_answer(answer: str) -> Any:
    """Step 1: the answer as JSON (object, string, number, list, ...), else {key: float} from its
    `key: number` pairs (later pairs win, as in a dict comprehension)."""
    try:
        return json.loads(answer)
    except json.JSONDecodeError:
        pass
    pairs: dict[str, float] = {}
    for match in _PAIR.finditer(answer):
        try:
            pairs[match.group(1)] = float(match.group(2))
        except ValueError:
            raise _unusable(answer, match.group(2)) from None
    return pairs


def label_key(value: Any) -> str | None:
    """The Chinese key a label value names: one of the 8 Chinese keys (surrounding spaces ignored) or one of
    the 8 English names (case-insensitive); None for anything else, including non-strings."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if value in EMOTION_LABELS_ZH:
        return value
    return _ZH_BY_NAME.get(value.lower())


def apply_melancholic_swap(content: Any, text: str) -> Any:
    """Step 2: when the lower-cased emotion text contains a melancholic word, the sad and melancholic
    scores swap (a missing one counts as 0.0, so both keys exist afterwards). See the module docstring for
    answers that are not JSON objects."""
    if not any(word in text.lower() for word in MELANCHOLIC_WORDS):
        return content
    if isinstance(content, str):
        content = normalize_labels(content)            # a bare label: its one-hot scores, then the swap
    elif not isinstance(content, dict):
        content = {}                                   # a number, list or null carries no score
    swapped = dict(content)
    swapped["悲伤"], swapped["低落"] = content.get("低落", 0.0), content.get("悲伤", 0.0)
    return swapped


def normalize_labels(content: Any) -> dict[str, Any]:
    """Step 3: label-style answers as one-hot scores.

    - a bare label string, or else the first label found under LABEL_ALIAS_KEYS, sets its emotion to 1.0
      when no Chinese key is present;
    - then, in vector order, a Chinese key whose value is itself a label becomes 1.0 if it names itself and
      0.0 otherwise, and the named emotion becomes 1.0 (later keys see the earlier keys' new values).
    Anything that is not a JSON object yields {} (hence calm, unless a bare label was detected).
    """
    normalized: dict[str, Any] = dict(content) if isinstance(content, dict) else {}
    detected = label_key(content) if isinstance(content, str) else None
    if detected is None:
        for alias in LABEL_ALIAS_KEYS:
            detected = label_key(normalized.get(alias))
            if detected is not None:
                break
    if detected is not None and not any(key in normalized for key in EMOTION_LABELS_ZH):
        normalized[detected] = 1.0
    for key in EMOTION_LABELS_ZH:
        named = label_key(normalized.get(key))
        if named is not None:
            normalized[key] = 1.0 if named == key else 0.0
            if named != key:
                normalized[named] = 1.0
    return normalized


def scores_to_emotions(scores: Mapping[str, Any], answer: str = "") -> dict[str, float]:
    """Steps 4–5: {English name: score} in vector order; `float(value)` clamped to [0, 1.2], missing = 0;
    a value `float()` rejects raises EmotionAnswerError (quoting `answer`); all <= 0 -> calm = 1.0."""
    out: dict[str, float] = {}
    for name, key in zip(EMOTION_NAMES, EMOTION_LABELS_ZH):
        value = scores.get(key, 0.0)
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise _unusable(answer, value) from None
        out[name] = max(SCORE_MIN, min(SCORE_MAX, x))
    if all(v <= 0.0 for v in out.values()):
        log.info("emotion text: no emotion detected; using a calm voice")
        out["calm"] = 1.0
    return out


def emotions_from_response(answer: str, text: str) -> dict[str, float]:
    """The emotion LLM's decoded answer for the emotion text `text` -> {happy, ..., calm} in vector order.

    This is the function the pipelines use (through QwenEmotion.inference). Raises EmotionAnswerError
    when a score is not a number."""
    content = apply_melancholic_swap(decode_answer(answer), text)
    return scores_to_emotions(normalize_labels(content), answer)
