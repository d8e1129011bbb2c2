"""The 2.5 front-end, stage by stage: text + language -> segments of token ids and the language id.

upstream: indextts/infer_v2_5.py:700-727, in this order:
1. the clean map (2.0's common punctuation map, applied BEFORE normalization too: `：` -> `,`, `"` -> `'`, ...);
2. normalization (if asked): zh / zhen / en by the 2.0 normalizer (runtime/frontend/text/normalize.py); ja / es by
   NeMo, which returns the text unchanged when nemo_text_processing is absent — a standard upstream install, and
   what this runtime does; other languages (ar, fr, ...) are not normalized;
3. case: lower for ja / zh / zhen / en, upper for es, unchanged otherwise;
4. pronunciation annotations (annotations.py);
5. ja: fugashi word split (japanese.py);
6. every `<|...|>` tag upper-cased (a typed `<|en|>` becomes `<|EN|>`, not a special token: quirk 5);
7. the token-budget splitter (splitter.py), then each segment encoded as `prefix + segment` and id 1 appended
   (which the GPT prefill drops again with id 0: a standalone `!` — id 0 — is lost, quirk 3).
`TextStages` keeps every stage (the fixtures compare each).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from runtime.frontend.text.normalize import TextNormalizer, apply_punct_map

from .annotations import apply_annotations
from .bpe import BpeTokenizer
from .japanese import JapaneseWords
from .languages import LOWER_CASED, NEMO_NORMALIZED, NORMALIZED, UPPER_CASED, is_known, lang_id, lang_prefix
from .splitter import split_by_tokens

log = logging.getLogger(__name__)

#: infer_v2_5's default max_text_tokens_per_segment.
DEFAULT_SEGMENT_TOKENS = 120
#: The id infer_v2_5 appends to every segment (the stop text token; the prefill drops it).
SEGMENT_END_ID = 1
_TAG = re.compile(r"<\|([^|]+)\|>")


@dataclass(frozen=True)
class TextStages:
    cleaned: str
    normalized: str
    cased: str
    annotated: str
    g2p: str
    final: str
    lang_prefix: str
    segments: list[str]
    segment_ids: list[list[int]]
    lang_id: int


class TextFrontend25:
    """`stages(text, lang)` -> TextStages; `segments(...)` -> the id lists the GPT reads."""

    def __init__(self, tokenizer: BpeTokenizer, normalizer: TextNormalizer | None, max_text_tokens: int,
                 japanese: JapaneseWords | None = None) -> None:
        self.tokenizer, self.normalizer, self.max_text_tokens = tokenizer, normalizer, max_text_tokens
        self.japanese = japanese if japanese is not None else JapaneseWords()

    def split(self, text: str, prefix: str, max_tokens: int = DEFAULT_SEGMENT_TOKENS) -> list[str]:
        return split_by_tokens(text, self.tokenizer.count, max_tokens, self.max_text_tokens, prefix)

    def encode_segment(self, segment: str, prefix: str) -> list[int]:
        return self.tokenizer.encode(prefix + segment) + [SEGMENT_END_ID]

    def stages(self, text: str, lang: str, normalize: bool = True,
               max_tokens: int = DEFAULT_SEGMENT_TOKENS) -> TextStages:
        code = lang.lower()
        prefix = lang_prefix(lang)
        cleaned = apply_punct_map(text)
        normalized = cleaned
        if normalize and code in NORMALIZED:
            if self.normalizer is None:
                raise ValueError("normalization asked of a front-end built without a normalizer")
            normalized = self.normalizer.normalize(cleaned)
        elif normalize and code in NEMO_NORMALIZED:
            normalized = cleaned                    # NeMo absent upstream: the text unchanged
        cased = normalized.lower() if code in LOWER_CASED else normalized.upper() if code in UPPER_CASED else normalized
        annotated = apply_annotations(cased)
        g2p = self.japanese.split(annotated) if code == "ja" else annotated
        final = _TAG.sub(lambda m: f"<|{m.group(1).upper()}|>", g2p)
        segments = self.split(final, prefix, max_tokens)
        return TextStages(cleaned, normalized, cased, annotated, g2p, final, prefix, segments,
                          [self.encode_segment(s, prefix) for s in segments], lang_id(lang))


_IDEOGRAPH = re.compile(r"[\u4e00-\u9fff]")


def request_language(text: str, lang: str | None) -> str:
    """The request's language: as given, or (none given; upstream requires one) zh when the text has a CJK
    ideograph, else en — the 2.0 normalizer's own language rule."""
    if lang:
        return lang
    return "zh" if _IDEOGRAPH.search(text) else "en"


def request_segments(frontend: TextFrontend25, text: str, lang: str | None, max_tokens: int,
                     quick_tokens: int = 0) -> tuple[list[list[int]], int]:
    """A request's text -> (per-segment ids, lang_id).

    `quick_tokens` > 0 (a short first segment for streaming; upstream 2.5 accepts quick_streaming_tokens and
    ignores it): the first segment is cut from the front by the same splitter at a budget of
    min(quick_tokens, max_tokens // 2) — what 2.0's rule does to the first segment — and the rest is segmented
    as usual; 0 gives upstream's segments exactly.
    """
    code = request_language(text, lang)
    if not is_known(code) and code.lower() != "zhen":
        log.warning("lang %r is not in IndexTTS-2.5's language table: its 'common' embedding is used", code)
    stages = frontend.stages(text, code, True, max_tokens)
    segments = stages.segments
    quick = min(quick_tokens, max(1, max_tokens // 2))
    if quick_tokens > 0 and segments and frontend.tokenizer.count(segments[0]) > quick:
        first = frontend.split(stages.final, stages.lang_prefix, quick + frontend.tokenizer.count(stages.lang_prefix))[0]
        segments = [first, *frontend.split(stages.final[len(first):], stages.lang_prefix, max_tokens)]
    ids = [frontend.encode_segment(s, stages.lang_prefix) for s in segments if s]
    return ids, stages.lang_id
