"""SentencePiece tokenizer of IndexTTS2 (`checkpoints/bpe.model`), UPSTREAM.md §2.6.

upstream: indextts/utils/front.py:TextTokenizer (tokenize / encode / convert_tokens_to_ids / split_segments).

The text path is: a text whose stripped length is 1 goes to SentencePiece as it is (no normalization,
no CJK splitting: upstream's bypass, kept because it changes the pieces of a lone character); any
other text is normalized (§2.6.1), CJK-split and upper-cased (`tokenize_by_cjk_char`), then encoded
as pieces. Ids are `PieceToId` of those pieces, exactly what upstream feeds the GPT; pieces the model
does not know map to its unk id, which upstream only warns about (so do we). Special ids: upstream
hard-codes bos 0 / eos 1 and reads unk from the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from runtime.errors import CheckpointError, InputError
from runtime.frontend.text.cjk import tokenize_by_cjk_char
from runtime.frontend.text.segments import split_segments

if TYPE_CHECKING:
    from runtime.frontend.text.normalize import TextNormalizer
    from runtime.request import SynthesisRequest

log = logging.getLogger(__name__)

BOS_ID = 0   # = gpt.start_text_token
EOS_ID = 1   # = gpt.stop_text_token


def _load_sentencepiece(path: Path):
    """Read a SentencePiece ModelProto; a missing or unreadable file is a CheckpointError naming it."""
    import sentencepiece as spm

    if not path.is_file():
        raise CheckpointError(f"{path}: SentencePiece model not found (expected the checkpoint's bpe.model)")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable SentencePiece model (truncated or wrong file?): {err}") \
            from err


class TextTokenizer:
    """bpe.model + optional TextNormalizer; `normalizer=None` bypasses normalization (CJK split only)."""

    def __init__(self, bpe_path: str | Path, normalizer: "TextNormalizer | None" = None) -> None:
        self.bpe_path = Path(bpe_path)
        self.sp = _load_sentencepiece(self.bpe_path)
        self.normalizer = normalizer
        if normalizer is not None:
            normalizer.load()

    @property
    def vocab_size(self) -> int:
        return int(self.sp.GetPieceSize())

    @property
    def bos_token_id(self) -> int:
        return BOS_ID

    @property
    def eos_token_id(self) -> int:
        return EOS_ID

    @property
    def unk_token_id(self) -> int:
        return int(self.sp.unk_id())

    def pretokenize(self, text: str) -> str:
        """The exact string upstream hands to `sp.Encode` (raises InputError for empty text)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InputError("text is empty (nothing to synthesize)")
        if len(text.strip()) == 1:
            return text                      # upstream bypass: raw text, not even stripped
        if self.normalizer is not None:
            text = self.normalizer.normalize(text)
        return tokenize_by_cjk_char(text)

    def tokenize(self, text: str) -> list[str]:
        """Text -> SentencePiece pieces (upstream `TextTokenizer.tokenize`)."""
        pieces = [str(p) for p in self.sp.Encode(self.pretokenize(text), out_type=str)]
        if not pieces:
            raise InputError(f"text {text!r} gives no tokens after normalization")
        return pieces

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> list[int]:
        if isinstance(tokens, str):
            tokens = [tokens]
        ids = [int(self.sp.PieceToId(t)) for t in tokens]
        unk = self.unk_token_id
        unknown = sorted({t for t, i in zip(tokens, ids) if i == unk})
        if unknown:
            log.warning("%d piece(s) not in %s map to unk id %d: %s", len(unknown), self.bpe_path.name, unk,
                        unknown)
        return ids

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return str(self.sp.IdToPiece(ids))
        return [str(self.sp.IdToPiece(int(i))) for i in ids]

    def encode(self, text: str) -> list[int]:
        """Text -> ids, as `convert_tokens_to_ids(tokenize(text))`."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def split_segments(self, tokens: Sequence[str], max_text_tokens_per_segment: int = 120,
                       quick_streaming_tokens: int = 0) -> list[list[str]]:
        """Upstream's segmentation (UPSTREAM.md §2.6.2); see `runtime.frontend.text.segments`."""
        return split_segments(tokens, max_text_tokens_per_segment, quick_streaming_tokens)

    def segment_ids(self, text: str, max_text_tokens_per_segment: int = 120,
                    quick_streaming_tokens: int = 0) -> list[list[int]]:
        """Text -> per-segment id lists: what upstream's infer feeds the GPT, one list per segment."""
        segments = self.split_segments(self.tokenize(text), max_text_tokens_per_segment, quick_streaming_tokens)
        return [self.convert_tokens_to_ids(seg) for seg in segments]


def text_segments(tokenizer: TextTokenizer, request: "SynthesisRequest") -> list[list[int]]:
    """A request's text -> per-segment SentencePiece ids (normalize, CJK split, segment; UPSTREAM §2.6)."""
    if not isinstance(request.text, str) or not request.text.strip():
        raise InputError("the text to synthesize is empty")
    segments = tokenizer.segment_ids(request.text, request.max_text_tokens_per_segment,
                                     request.quick_streaming_tokens)
    if not segments:
        raise InputError(f"the text {request.text[:40]!r} gives no tokens to speak")
    return segments
