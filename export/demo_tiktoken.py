"""A small `.tiktoken` ranks file for IndexTTS-2.5 demo checkpoints, trained here on the demo corpus.

The real file (`multilingual_zh_ja_yue_char_del.tiktoken`) has 58 836 ranks; a demo needs the same FORMAT and
rules, not its size: one `base64(token) rank` line per rank, the 256 single bytes first in GPT-2's byte order
(rank 0 = `!`, rank 1 = `"`, which makes a standalone `!` the id the GPT prefill drops, as with the real file),
then byte-pair merges learned greedily (most frequent adjacent pair within the pre-split pieces, ties to the
smallest pair) over the demo corpus. The runtime reads it through the same loader as the real file.
"""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

from runtime.frontend.text25.bpe import PAT_STR


def gpt2_byte_order() -> list[int]:
    """GPT-2's byte order: the printable Latin-1 ranges first (`!`..`~`, `¡`..`¬`, `®`..`ÿ`), then the rest."""
    first = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return first + [b for b in range(256) if b not in set(first)]


def train_ranks(lines: list[str], merges: int) -> list[bytes]:
    """The 256 byte tokens in GPT-2 order, then `merges` learned merges, in rank order."""
    import regex

    ranks = [bytes([b]) for b in gpt2_byte_order()]
    words = Counter(tuple(bytes([b]) for b in piece.encode("utf-8"))
                    for line in lines for piece in regex.findall(PAT_STR, line))
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        ranks.append(merged)
        updated: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            updated[tuple(out)] += n
        words = updated
    return ranks


def write_tiktoken(path: Path, merges: int = 200) -> None:
    from .demo_corpus import CORPUS_EN, CORPUS_ZH

    # the 2.5 front-end lower-cases zh / en text and keeps CJK characters as they are
    lines = [line.lower() for line in (CORPUS_EN + CORPUS_ZH).splitlines() if line.strip()]
    ranks = train_ranks(lines, merges)
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {i}\n" for i, tok in enumerate(ranks)), encoding="ascii")
