"""Segmentation of a token list into GPT-sized segments, exactly as upstream cuts them (UPSTREAM.md §2.6.2).

upstream: indextts/utils/front.py:TextTokenizer.split_segments / split_segments_by_token.

Upstream re-runs its splitter recursively on a running piece as soon as it holds a break token; the
recursion always ends the piece at that token (hard-cut in two when it reached max+1 tokens), so the
behaviour is written here as one flat pass (pass 1) followed by the greedy merge (pass 2). Quirks that
change the segments and are kept on purpose because the GPT sees these exact ids:

- a sentence token followed by a quote piece (`'` / `▁'`) ends the piece WITH the quote, and the quote
  also starts the next piece (upstream's `i += 1` inside a `for` loop has no effect): the quote is
  duplicated, and a piece can reach max+1 tokens;
- a break token (`,` `▁,` `-`) ends the piece at any length, a sentence token only after > 2 tokens;
- a run without any piece end is hard-cut as max, 1, max, 1, ... (upstream warns);
- the merge compares the running total of ALL emitted tokens (current piece included) with
  `quick_streaming_tokens`, so small values of it only delay merging near the start of the text.
"""

from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)

SENTENCE_TOKENS = frozenset({".", "!", "?", "▁.", "▁?", "▁..."})   # "▁!" is deliberately not one
BREAK_TOKENS = frozenset({",", "▁,", "-"})                          # "▁-" is deliberately not one
QUOTE_TOKENS = frozenset({"'", "▁'"})


def split_pieces(tokens: Sequence[str], max_tokens: int) -> list[list[str]]:
    """Pass 1: cut the token list into pieces at sentence / break tokens and at max+1 tokens."""
    pieces: list[list[str]] = []
    piece: list[str] = []
    n = len(tokens)
    for i, tok in enumerate(tokens):
        piece.append(tok)
        if len(piece) == max_tokens + 1:
            log.warning("a text piece reached %d tokens without a sentence or break token before it; "
                        "hard cut after %d tokens", len(piece), max_tokens)
            log.debug("hard-cut piece: %s", piece)
            pieces.append(piece[:max_tokens])
            pieces.append(piece[max_tokens:])
            piece = []
        elif tok in BREAK_TOKENS:
            pieces.append(piece)
            piece = []
        elif tok in SENTENCE_TOKENS and len(piece) > 2:
            if i + 1 < n and tokens[i + 1] in QUOTE_TOKENS:
                piece.append(tokens[i + 1])   # duplicated: the next iteration appends it again
            pieces.append(piece)
            piece = []
    if piece:
        pieces.append(piece)
    return pieces


def merge_pieces(pieces: Sequence[Sequence[str]], max_tokens: int,
                 quick_streaming_tokens: int = 0) -> list[list[str]]:
    """Pass 2: greedily append each piece to the previous segment while the result stays short enough.

    A piece joins when `L + |p| <= max` and the running total of all pieces so far (this one included)
    exceeds `quick_streaming_tokens`, or, regardless of that total, when `L + |p| <= max / 2`.
    """
    segments: list[list[str]] = []
    total = 0
    for piece in pieces:
        total += len(piece)
        if segments:
            joined = len(segments[-1]) + len(piece)
            if (joined <= max_tokens and total > quick_streaming_tokens) or joined <= max_tokens / 2:
                segments[-1].extend(piece)
                continue
        segments.append(list(piece))
    return segments


def split_segments(tokens: Sequence[str], max_text_tokens_per_segment: int = 120,
                   quick_streaming_tokens: int = 0) -> list[list[str]]:
    """Upstream's segmentation of SentencePiece pieces; an empty list gives no segments."""
    if max_text_tokens_per_segment < 1:
        raise ValueError(f"max_text_tokens_per_segment must be >= 1, got {max_text_tokens_per_segment}")
    if not tokens:
        return []
    pieces = split_pieces(tokens, max_text_tokens_per_segment)
    return merge_pieces(pieces, max_text_tokens_per_segment, quick_streaming_tokens)
