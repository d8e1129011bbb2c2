"""The 2.5 front-end's rules beyond the fixtures: language table, tokenizer file errors, the splitter's budget."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from runtime.errors import CheckpointError
from runtime.frontend.text25.bpe import BpeTokenizer, special_tokens
from runtime.frontend.text25.languages import LANGUAGE_CODES, is_known, lang_id, lang_prefix
from runtime.frontend.text25.splitter import split_by_tokens


def test_language_table() -> None:
    assert len(LANGUAGE_CODES) == 106 and lang_id("common") == 105          # lang_embedding has 107 rows
    assert (lang_id("EN"), lang_id("zh"), lang_id("es"), lang_id("ja"), lang_id("ar")) == (0, 1, 3, 7, 13)
    assert lang_id("klingon") == lang_id("zhen") == 105 and not is_known("zhen")
    assert lang_prefix("ZH") == "<|zh|> "


def test_special_tokens_count_and_order() -> None:
    specials = special_tokens()
    assert len(specials) == 1673 and len(set(specials)) == 1673
    assert specials[:3] == ["<|endoftext|>", "<|startoftranscript|>", "<|en|>"]
    assert specials[-1] == "<|30.00|>" and specials.index("<|SPECIAL_TOKEN_1|>") == 122


def test_tokenizer_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer file is missing"):
        BpeTokenizer(tmp_path / "absent.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not-base64!! 0\n")
    with pytest.raises(CheckpointError, match=r"bad\.tiktoken:1: not a tiktoken rank line"):
        BpeTokenizer(bad)
    gap = tmp_path / "gap.tiktoken"
    gap.write_text(f"{base64.b64encode(b'a').decode()} 0\n{base64.b64encode(b'b').decode()} 2\n")
    with pytest.raises(CheckpointError, match="ranks must be 0..n-1"):
        BpeTokenizer(gap)


def test_splitter_keeps_segments_within_budget_and_protected_spans_whole() -> None:
    count = len                       # one "token" per character: the rules are the same
    text = "abc, defgh. <|SPECIAL_TOKEN_1|>XYZ<|SPECIAL_TOKEN_1|>ij"
    segments = split_by_tokens(text, count, max_tokens=8, max_text_tokens=600, prefix="")
    assert "".join(segments) == text
    assert "<|SPECIAL_TOKEN_1|>XYZ<|SPECIAL_TOKEN_1|>" in segments          # atomic, over budget, alone
    assert all(len(s) <= 8 for s in segments if "SPECIAL" not in s)
    # the prefix's tokens come out of the budget; the GPT's text capacity caps max_tokens
    assert split_by_tokens("abcdef", count, max_tokens=120, max_text_tokens=5, prefix="xx") == ["abc", "def"]
