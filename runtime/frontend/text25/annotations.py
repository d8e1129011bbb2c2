"""Pronunciation annotations `<word|pronunciation>` -> tagged pronunciations the GPT was trained on.

upstream: indextts/infer_v2_5.py:39-73 (PRONUNCIATION_ANNOTATION_PATTERN, is_kana,
apply_pronunciation_annotations): the pronunciation is upper-cased; a kana-only pronunciation replaces the word
padded with spaces; otherwise it is wrapped in <|SPECIAL_TOKEN_2|> when the word has a CJK ideograph
(U+4E00-9FFF), else in <|SPECIAL_TOKEN_1|> (fixtures-2.5 text25/annotations).
"""

from __future__ import annotations

import re

ANNOTATION = re.compile(r"<([^|>\n]+)\|([^>\n]+)>")
_HIRAGANA = re.compile(r"[\u3040-\u309F]+")
_KATAKANA = re.compile(r"[\u30A0-\u30FF]+")
_IDEOGRAPH = re.compile(r"[\u4e00-\u9fff]")


def _is_kana(text: str) -> bool:
    return bool(_HIRAGANA.fullmatch(text) or _KATAKANA.fullmatch(text))


def _tagged(match: re.Match) -> str:
    word, reading = match.group(1), match.group(2).upper()
    if _is_kana(reading):
        return f" {reading} "
    tag = "SPECIAL_TOKEN_2" if _IDEOGRAPH.search(word) else "SPECIAL_TOKEN_1"
    return f"<|{tag}|>{reading}<|{tag}|>"


def apply_annotations(text: str) -> str:
    return ANNOTATION.sub(_tagged, text)
