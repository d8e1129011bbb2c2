"""Upstream's `tokenize_by_CJK_char` (indextts/utils/common.py), as UPSTREAM.md §2.6 states it.

Every "CJK" character becomes its own space-separated element, the text between them is kept as one
element; elements are stripped, empty ones dropped, each upper-cased, joined by one space. The code
point ranges are exactly upstream's (they include CJK punctuation, kana, Hangul, halfwidth forms and a
few non-CJK blocks inside U+A840-D7AF; they exclude fullwidth ASCII forms U+FF01-FF64).
"""

from __future__ import annotations

import re

_CJK_RANGES = (
    "\u1100-\u11ff"
    "\u2e80-\ua4cf"
    "\ua840-\ud7af"
    "\uf900-\ufaff"
    "\ufe30-\ufe4f"
    "\uff65-\uffdc"
    "\U00020000-\U0002ffff"
)
_CJK_SPLIT = re.compile(f"([{_CJK_RANGES}])")


def tokenize_by_cjk_char(line: str) -> str:
    """Split CJK characters apart and upper-case everything: `'你好 world'` → `'你 好 WORLD'`."""
    parts = _CJK_SPLIT.split(line.strip())
    return " ".join(p.strip().upper() for p in parts if p.strip())
