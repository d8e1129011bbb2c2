"""The 2.5 tokenizer: tiktoken BPE over the checkpoint's `.tiktoken` ranks plus upstream's 1 673 special tokens.

upstream: indextts/utils/tokenizer.py:get_encoding (ranks file `<name>.tiktoken`: one `base64(token) rank` per
line; specials appended after the ranks in this order: endoftext, startoftranscript, the first 99 language tags,
11 audio events, 4 emotions, 6 task tags, SPECIAL_TOKEN_1..30, 20 TTS vocal tags, 1 501 timestamps <|0.00|> ..
<|30.00|>; Whisper's pre-split pattern) and WhisperTokenizer.encode(text, allowed_special='all'). With the real
file: 58 836 ranks + 1 673 specials = 60 509 ids (`number_text_tokens`).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from runtime.errors import CheckpointError, ToolkitError

from .languages import LANGUAGE_CODES, SPECIAL_LANGUAGES

PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
AUDIO_EVENTS = ("ASR", "AED", "SER", "Speech", "/Speech", "BGM", "/BGM", "Laughter", "/Laughter", "Applause",
                "/Applause")
EMOTIONS = ("HAPPY", "SAD", "ANGRY", "NEUTRAL")
TASKS = ("translate", "transcribe", "startoflm", "startofprev", "nospeech", "notimestamps")
VOCAL_TAGS = ("TTS/B", "TTS/O", "TTS/Q", "TTS/A", "TTS/CO", "TTS/CL", "TTS/H",
              *(f"TTS/SP{i:02d}" for i in range(1, 14)))
TIMESTAMPS = 1501
ANNOTATION_TAGS = 30
TIKTOKEN_REQUIREMENT = "tiktoken>=0.7"


def special_tokens() -> list[str]:
    """The 1 673 special tokens in id order (their ids follow the ranks)."""
    return ["<|endoftext|>", "<|startoftranscript|>",
            *(f"<|{code}|>" for code in LANGUAGE_CODES[:SPECIAL_LANGUAGES]),
            *(f"<|{e}|>" for e in AUDIO_EVENTS), *(f"<|{e}|>" for e in EMOTIONS), *(f"<|{t}|>" for t in TASKS),
            *(f"<|SPECIAL_TOKEN_{i}|>" for i in range(1, ANNOTATION_TAGS + 1)), *(f"<|{t}|>" for t in VOCAL_TAGS),
            *(f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS))]


def read_ranks(path: Path) -> dict[bytes, int]:
    """The `.tiktoken` file: `base64(token) rank` lines; a malformed line is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: the IndexTTS-2.5 tokenizer file is missing")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (IndexError, ValueError, binascii.Error):
            raise CheckpointError(f"{path}:{number}: not a tiktoken rank line ('<base64 token> <rank>')") from None
        ranks[token] = rank
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks must be 0..n-1 each once ({len(ranks)} lines)")
    return ranks


class BpeTokenizer:
    """encode(text) -> ids with every special token recognised in the text (upstream's allowed_special='all')."""

    def __init__(self, path: str | Path) -> None:
        try:
            import tiktoken
        except ImportError as err:
            raise ToolkitError(f"IndexTTS-2.5's tokenizer needs tiktoken: pip install '{TIKTOKEN_REQUIREMENT}'") from err
        self.path = Path(path)
        ranks = read_ranks(self.path)
        specials = {token: len(ranks) + i for i, token in enumerate(special_tokens())}
        self.encoding = tiktoken.Encoding(name=self.path.stem, pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=specials, explicit_n_vocab=len(ranks) + len(specials))
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def count(self, text: str) -> int:
        """upstream `_token_len`: the tokens of the whole string (merges across joins count)."""
        return len(self.encode(text))
