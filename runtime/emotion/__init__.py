"""Emotion control on the host, torch-free except the optional emotion LLM.

- `vectors`: the user's 8-dim emotion vector (validation, alpha truncation, normalization), the
  emotion-vector matrix (prototype choice, weighted mix) and the final merge (UPSTREAM.md §2.5, §2.7);
- `source`: upstream's emotion-source order and a request's final emovec (§2.2);
- `answer`: the emotion LLM's text answer -> 8 scores (§2.11);
- `llm`: the checkpoint's Qwen3 emotion classifier (transformers; loaded only when used).

The names below are the package's API; `llm` is not imported here (it is the heavy, optional part).
"""

from runtime.emotion.answer import (
                                    LABEL_ALIAS_KEYS,
                                    MELANCHOLIC_WORDS,
                                    SCORE_MAX,
                                    SCORE_MIN,
                                    apply_melancholic_swap,
                                    decode_answer,
                                    emotions_from_response,
                                    label_key,
                                    normalize_labels,
                                    scores_to_emotions,
)
from runtime.emotion.source import (
                                    EmotionPlan,
                                    EmotionSourceKind,
                                    TextToEmotion,
                                    emotion_plan,
                                    final_emovec,
                                    resolve_emotion_source,
)
from runtime.emotion.vectors import (
                                    DEFAULT_EMO_NUM,
                                    EMO_BIAS,
                                    EMO_SUM_LIMIT,
                                    EMOTION_LABELS_ZH,
                                    EMOTION_NAMES,
                                    NUM_EMOTIONS,
                                    EmotionMatrices,
                                    EmotionMix,
                                    cosine_similarity,
                                    merge_emovec,
                                    mix_emovec,
                                    normalize_emo_vec,
                                    truncate_emo_vector,
                                    validate_emo_vector,
                                    weight_vector,
)

__all__ = [
    "DEFAULT_EMO_NUM", "EMO_BIAS", "EMO_SUM_LIMIT", "EMOTION_LABELS_ZH", "EMOTION_NAMES", "LABEL_ALIAS_KEYS",
    "MELANCHOLIC_WORDS", "NUM_EMOTIONS", "SCORE_MAX", "SCORE_MIN", "EmotionMatrices", "EmotionMix",
    "EmotionPlan", "EmotionSourceKind", "TextToEmotion", "apply_melancholic_swap", "cosine_similarity",
    "decode_answer", "emotion_plan", "emotions_from_response", "final_emovec", "label_key", "merge_emovec",
    "mix_emovec", "normalize_emo_vec", "normalize_labels", "resolve_emotion_source", "scores_to_emotions", "truncate_emo_vector",
    "validate_emo_vector", "weight_vector",
]
