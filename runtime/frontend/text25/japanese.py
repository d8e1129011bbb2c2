"""Japanese word splitting for the 2.5 front-end: fugashi (MeCab with unidic-lite) words joined by spaces.

upstream: indextts/utils/ja_g2p.py:JapaneseG2PProcessor(g2p_ratio=0).process_ja_text, as infer_v2_5 uses it:
the text is cut at runs of spaces (kept as they are), each other part becomes its words joined by single
spaces. With g2p_ratio 0 no kanji is replaced by its reading, but upstream still draws `random.random()` once per
part that has a kanji word (ja_g2p.py:78, quirk 8 of UPSTREAM-2.5): reproduced, so a caller that seeds Python's
`random` sees the same sequence afterwards as with upstream.
"""

from __future__ import annotations

import random
import re
from typing import Any

from runtime.errors import ToolkitError

JAPANESE_REQUIREMENT = "fugashi>=1.3 unidic-lite>=1.0.8"
_SPACES = re.compile(r"( +)")


def _has_kanji(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


class JapaneseWords:
    """`split(text)`: fugashi words joined by spaces, original spaces kept. The tagger loads on first use."""

    def __init__(self) -> None:
        self._tagger: Any = None

    def _words(self, text: str) -> list[str]:
        if self._tagger is None:
            try:
                import fugashi
            except ImportError as err:
                raise ToolkitError("Japanese text (lang ja) needs fugashi and a dictionary: "
                                   f"pip install {JAPANESE_REQUIREMENT}") from err
            try:
                self._tagger = fugashi.Tagger()
            except RuntimeError as err:
                raise ToolkitError(f"fugashi found no MeCab dictionary ({err}): pip install unidic-lite") from err
        return [word.surface for word in self._tagger(text)]

    def _part(self, text: str) -> str:
        words = self._words(text)
        if any(_has_kanji(w) for w in words):
            random.random()          # upstream's draw at g2p_ratio 0 (see the module docstring)
        return " ".join(words)

    def split(self, text: str) -> str:
        return "".join(self._part(p) if p.strip() else p for p in _SPACES.split(text))
