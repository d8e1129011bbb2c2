"""The 2.5 segmenter: text cut into segments whose token count (with the language prefix) fits the budget.

upstream: indextts/infer_v2_5.py:411-464 (split_text_by_tokens, _split_atomic_pieces, _token_len):
- budget = max(1, min(max_tokens, max_text_tokens) - tokens(prefix)), max_text_tokens being the GPT's text
  position table minus 2; a text within budget is one segment;
- `<|SPECIAL_TOKEN_n|>...<|SPECIAL_TOKEN_n|>` spans are atomic (an atomic span over budget stays one segment);
- other text is cut after each of `，。！？、；：,.!?;:` and newline; a part over budget is cut per character
  (greedily, counting the tokens of the accumulated string);
- pieces are merged greedily while the token count of their concatenation stays within budget.
Counts are of concatenated strings: merges across a join count (fixtures-2.5 text25/*_split*).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

PROTECTED = re.compile(r"<\|SPECIAL_TOKEN_\d+\|>.*?<\|SPECIAL_TOKEN_\d+\|>")
_BREAK_AFTER = re.compile(r"(?<=[，。！？、；：,\.!\?;:\n])")


def _pieces(text: str) -> list[tuple[str, bool]]:
    """(piece, atomic) in order: protected spans and the text between them."""
    out, pos = [], 0
    for m in PROTECTED.finditer(text):
        if m.start() > pos:
            out.append((text[pos:m.start()], False))
        out.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


def _pack(pieces: Iterable[str], count: Callable[[str], int], budget: int) -> list[str]:
    """Greedy: each piece joins the current string while the joined string's token count stays within budget."""
    out, current = [], ""
    for piece in pieces:
        if current and count(current + piece) > budget:
            out.append(current)
            current = piece
        else:
            current += piece
    if current:
        out.append(current)
    return out


def split_by_tokens(text: str, count: Callable[[str], int], max_tokens: int, max_text_tokens: int,
                    prefix: str = "") -> list[str]:
    budget = max(1, min(max_tokens, max_text_tokens) - count(prefix))
    if count(text) <= budget:
        return [text]
    chunks: list[str] = []
    for piece, atomic in _pieces(text):
        if atomic:
            chunks.append(piece)
            continue
        for part in _BREAK_AFTER.split(piece):
            if not part:
                continue
            if count(part) <= budget:
                chunks.append(part)
                continue
            chunks.extend(_pack(part, count, budget))            # per character
    segments = _pack(chunks, count, budget)
    return segments or [text]
