"""IndexTTS2's text normalizer (UPSTREAM.md §2.6.1): language choice, protections, engine, punctuation map.

upstream: indextts/utils/front.py:TextNormalizer (normalize, use_chinese, save_/restore_ pinyin tones,
names, tech terms, pronunciation annotations, glossary).

Order of operations (it changes results, so it is upstream's):
1. `<字|读音>` pronunciation annotations are swapped for letter-only placeholders (restored verbatim at
   the very end, after the punctuation map), so the engines never expand their digits.
2. Language: Chinese if the (protected) text has a CJK ideograph U+4E00-9FFF, or no ASCII letter, or
   is a bare e-mail address, or contains a tone-numbered pinyin syllable; English otherwise.
3. Contractions `(what|where|who|which|how|there|here|it|he|she|that|this)'s` -> `... is` (no word
   boundary, case-insensitive: upstream's pattern), then the optional glossary (`enable_glossary`).
4. Chinese path: right-strip; hyphens inside tech terms (`GPT-5-nano`) become `<H>` (their digits are
   still read); pinyin syllables with tone digits and `汉字·汉字` names become placeholders; the zh engine
   runs; names, pinyin (j/q/x + u/ü respelt with v and upper-cased, as upstream) and hyphens (`\\s*<H>\\s*`
   -> `-`) are restored; the zh punctuation map (`$` -> `.` plus the common map) applies.
   English path: tech-term hyphens protected, the en engine, hyphens restored, the common map.
5. Annotations restored.

The punctuation map is ONE regex alternation in upstream's key order, applied in a single pass; the
order matters (`，` is tried before `，，，`, so `，，，` becomes `,,,` on the English path).

Engines: WeTextProcessing (`runtime.frontend.text.wetext`, optional) as upstream, or the documented subset in
`runtime.frontend.text.fallback`. Where upstream's behaviour depends on Python's set order (which placeholder a
repeated pinyin / name gets when one is a substring of another), placeholders are assigned by position
here: deterministic, and identical to upstream whenever upstream itself is.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from runtime.errors import ToolkitError

log = logging.getLogger(__name__)

# The common punctuation map, in upstream's order (the order decides overlapping keys).
PUNCT_MAP: dict[str, str] = {
    "：": ",", "；": ",", ";": ",", "，": ",", "。": ".", "！": "!", "？": "?", "\n": " ", "·": "-", "、": ",",
    "...": "…", ",,,": "…", "，，，": "…", "……": "…",
    "“": "'", "”": "'", '"': "'", "‘": "'", "’": "'", "（": "'", "）": "'", "(": "'", ")": "'",
    "《": "'", "》": "'", "【": "'", "】": "'", "[": "'", "]": "'",
    "—": "-", "～": "-", "~": "-", "「": "'", "」": "'", ":": ",",
}
ZH_PUNCT_MAP: dict[str, str] = {"$": ".", **PUNCT_MAP}

EMAIL_PATTERN = re.compile(r"^[a-zA-Z0-9]+@[a-zA-Z0-9]+\.[a-zA-Z]+$")
PINYIN_TONE_PATTERN = re.compile(
    r"(?<![a-z])((?:[bpmfdtnlgkhjqxzcsryw]|[zcs]h)?(?:[aeiouüv]|[ae]i|u[aio]|ao|ou|i[aue]|[uüv]e|[uvü]ang?"
    r"|uai|[aeiuv]n|[aeio]ng|ia[no]|i[ao]ng)|ng|er)([1-5])", re.IGNORECASE)
NAME_PATTERN = re.compile(r"[\u4e00-\u9fff]+(?:[-·—][\u4e00-\u9fff]+){1,2}")
TECH_TERM_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)+")
CONTRACTION_PATTERN = re.compile(r"(what|where|who|which|how|t?here|it|s?he|that|this)'s", re.IGNORECASE)
ANNOTATION_PATTERN = re.compile(r"<([^|>\n]+)\|([^>\n]+)>")
_CJK_IDEOGRAPH = re.compile(r"[\u4e00-\u9fff]")
_ASCII_LETTER = re.compile(r"[a-zA-Z]")
_HYPHEN_MARK = "<H>"
_HYPHEN_RESTORE = re.compile(r"\s*<H>\s*")
_JQX_U = re.compile(r"([jqx])[uü](n|e|an)*(\d)", re.IGNORECASE)

Glossary = Mapping[str, "str | Mapping[str, str]"]


def _compile_map(mapping: Mapping[str, str]) -> Callable[[str], str]:
    pattern = re.compile("|".join(re.escape(k) for k in mapping))
    return lambda text: pattern.sub(lambda m: mapping[m.group()], text)


apply_punct_map = _compile_map(PUNCT_MAP)
apply_zh_punct_map = _compile_map(ZH_PUNCT_MAP)


def _letters(index: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa': placeholder tags made of letters only (no digit to expand)."""
    tag = ""
    while True:
        tag = chr(ord("a") + index % 26) + tag
        index = index // 26 - 1
        if index < 0:
            return tag


def _protect(text: str, pattern: re.Pattern, make_key: Callable[[str], str]) -> tuple[str, dict[str, str]]:
    """Replace each match by a placeholder (one per distinct matched string); return the key -> text map."""
    keys: dict[str, str] = {}

    def swap(m: re.Match) -> str:
        found = m.group(0)
        if found not in keys:
            keys[found] = make_key(_letters(len(keys)))
        return keys[found]

    return pattern.sub(swap, text), {key: found for found, key in keys.items()}


def _restore(text: str, placeholders: Mapping[str, str], transform: Callable[[str], str] = str) -> str:
    for key, original in placeholders.items():
        text = text.replace(key, transform(original))
    return text


def correct_pinyin(pinyin: str) -> str:
    """Upstream's respelling of restored pinyin: j/q/x + u/ü -> v and upper case; other syllables as typed."""
    if pinyin[0] not in "jqxJQX":
        return pinyin
    return _JQX_U.sub(r"\g<1>v\g<2>\g<3>", pinyin).upper()


def protect_tech_hyphens(text: str) -> tuple[str, bool]:
    """`GPT-5-nano` -> `GPT<H>5<H>nano` (longest terms first, every occurrence); returns (text, found)."""
    terms = sorted(set(TECH_TERM_PATTERN.findall(text)), key=len, reverse=True)
    for term in terms:
        text = text.replace(term, term.replace("-", _HYPHEN_MARK))
    return text, bool(terms)


def restore_tech_hyphens(text: str, found: bool) -> str:
    return _HYPHEN_RESTORE.sub("-", text) if found else text


def use_chinese(text: str) -> bool:
    """Upstream's language choice (see the module docstring, step 2)."""
    if _CJK_IDEOGRAPH.search(text) or not _ASCII_LETTER.search(text) or EMAIL_PATTERN.match(text):
        return True
    return PINYIN_TONE_PATTERN.search(text) is not None


class TextNormalizer:
    """Upstream's TextNormalizer. `backend`: "wetext" (WeTextProcessing, as upstream), "fallback" (the
    documented subset of `runtime.frontend.text.fallback`) or "auto" (wetext when installed, else fallback)."""

    def __init__(self, enable_glossary: bool = False, backend: str = "auto", cache_dir: str | Path | None = None,
                 glossary: Glossary | None = None) -> None:
        if backend not in ("auto", "wetext", "fallback"):
            raise ToolkitError(f"unknown text-normalization backend {backend!r} (auto, wetext, fallback)")
        self.enable_glossary = enable_glossary
        self.requested_backend = backend
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.glossary: dict[str, Any] = dict(glossary or {})
        self.backend: str | None = None
        self.zh: Any = None
        self.en: Any = None

    # ------------------------------------------------------------------------------------------ loading
    def load(self) -> None:
        """Create the engines once (WeTextProcessing may build its zh grammars on first use)."""
        if self.zh is not None and self.en is not None:
            return
        from runtime.frontend.text.wetext import WETEXT_REQUIREMENT, wetext_available

        backend = self.requested_backend
        if backend == "auto":
            backend = "wetext" if wetext_available() else "fallback"
            if backend == "fallback":
                log.warning("WeTextProcessing is not installed: using the built-in normalization subset "
                            "(numbers, punctuation, contractions; see runtime/frontend/text/fallback.py). Install "
                            "'%s' for upstream's normalization.", WETEXT_REQUIREMENT)
        if backend == "wetext":
            self._load_wetext()
        else:
            from runtime.frontend.text.fallback import FallbackChinese, FallbackEnglish

            self.zh, self.en = FallbackChinese(), FallbackEnglish()
        self.backend = backend

    def _load_wetext(self) -> None:
        from runtime.frontend.text.wetext import (
            WETEXT_REQUIREMENT,
            load_en,
            load_zh,
            wetext_available,
        )

        if not wetext_available():
            raise ToolkitError(f"text-normalization backend 'wetext' needs WeTextProcessing: "
                               f"pip install '{WETEXT_REQUIREMENT}' (it brings pynini)")
        self.zh, self.en = load_zh(self.cache_dir), load_en(self.cache_dir)

    def load_glossary(self, glossary: Glossary) -> None:
        """Add terms: `{"C++": {"en": "C plus plus", "zh": "C 加加"}, "TTS": "T T S"}`."""
        self.glossary.update(glossary)

    def load_glossary_from_yaml(self, path: str | Path) -> bool:
        """Replace the glossary with a YAML mapping (upstream: checkpoints/glossary.yaml); False if absent."""
        path = Path(path)
        if not path.is_file():
            return False
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return False
        self.glossary = dict(data)
        return True

    # ---------------------------------------------------------------------------------------- normalize
    def normalize(self, text: str) -> str:
        self.load()
        text, annotations = _protect(text, ANNOTATION_PATTERN, lambda tag: f"PRONPLACEHOLDER{tag}PRONPLACEHOLDER")
        if use_chinese(text):
            result = self._normalize_zh(text)
        else:
            result = self._normalize_en(text)
        return _restore(result, annotations)

    def _prepare(self, text: str, lang: str) -> str:
        text = CONTRACTION_PATTERN.sub(r"\1 is", text)
        return self.apply_glossary(text, lang) if self.enable_glossary else text

    def _normalize_zh(self, text: str) -> str:
        text = self._prepare(text, "zh")
        text, tech = protect_tech_hyphens(text.rstrip())
        text, pinyin = _protect(text, PINYIN_TONE_PATTERN, lambda tag: f"<pinyin_{tag}>")
        text, names = _protect(text, NAME_PATTERN, lambda tag: f"<n_{tag}>")
        try:
            result = self.zh.normalize(text)
        except Exception:          # upstream logs the traceback and goes on with an empty result
            log.exception("Chinese text normalization failed for %r", text)
            result = ""
        result = _restore(result, names)
        result = _restore(result, pinyin, correct_pinyin)
        result = restore_tech_hyphens(result, tech)
        return apply_zh_punct_map(result)

    def _normalize_en(self, text: str) -> str:
        text = self._prepare(text, "en")
        try:
            protected, tech = protect_tech_hyphens(text)
            result = restore_tech_hyphens(self.en.normalize(protected), tech)
        except Exception:          # upstream logs the traceback and keeps the text as it is
            log.exception("English text normalization failed for %r", text)
            result = text
        return apply_punct_map(result)

    def apply_glossary(self, text: str, lang: str) -> str:
        """Glossary terms, longest first, case-insensitively replaced by their reading for `lang`."""
        for term in sorted(self.glossary, key=len, reverse=True):
            value = self.glossary[term]
            reading = value.get(lang, term) if isinstance(value, Mapping) else value
            text = re.sub(re.escape(term), lambda _m, r=str(reading): r, text, flags=re.IGNORECASE)
        return text
