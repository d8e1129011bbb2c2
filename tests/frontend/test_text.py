"""Text front-end: fixture parity (text_segments), segmentation quirks, tokenizer errors, normalizer paths.

Fixture calls that normalize need WeTextProcessing (upstream's engine); without it they are skipped
with the reason, never passed. Segmentation and the non-normalizing tokenize calls always run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.errors import CheckpointError, InputError, ToolkitError
from runtime.frontend.text.cjk import tokenize_by_cjk_char
from runtime.frontend.text.fallback import en_cardinal, en_ordinal, zh_cardinal
from runtime.frontend.text.normalize import TextNormalizer, use_chinese
from runtime.frontend.text.segments import merge_pieces, split_pieces, split_segments
from runtime.frontend.text.tokenizer import TextTokenizer
from runtime.frontend.text.wetext import (
    WETEXT_REQUIREMENT,
    load_cached,
    wetext_available,
)

FIXTURE = "text_segments"
NO_WETEXT = (f"WeTextProcessing is not installed (pip install '{WETEXT_REQUIREMENT}'): calls that normalize "
             f"need upstream's normalizer; the built-in subset does not reproduce it")


def _calls(fixtures_root: Path, normalizing: bool) -> set[str]:
    manifest = json.loads((fixtures_root / FIXTURE / "manifest.json").read_text(encoding="utf-8"))
    names = set()
    for call in manifest["calls"]:
        needs = call["kind"] == "text_normalize" or (call["kind"] == "text_tokenize"
                                                    and call["scalars"].get("normalize", True))
        if needs == normalizing:
            names.add(call["call"])
    return names


def _run(fixtures_root: Path, calls: set[str]) -> list:
    from export.fixtures.kinds import all_handlers
    from export.fixtures.runner import run_fixture

    return list(run_fixture(fixtures_root / FIXTURE, all_handlers(), only_calls=calls))


def _assert_pass(rows: list) -> None:
    assert rows, "no rows: the fixture ran no call"
    bad = [f"{r.call}/{r.output}: {r.status} {r.detail}" for r in rows if r.status != "pass"]
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def bpe_path(fixtures_root: Path) -> Path:
    return fixtures_root / FIXTURE / "bpe.model"


@pytest.fixture(scope="module")
def fallback() -> TextNormalizer:
    normalizer = TextNormalizer(backend="fallback")
    normalizer.load()
    return normalizer


# ------------------------------------------------------------------------------------------ fixture

def test_fixture_segments_and_raw_tokenize(fixtures_root: Path) -> None:
    calls = _calls(fixtures_root, normalizing=False)
    assert len(calls) == 13 * 6 + 2            # 13 raw tokenize + 13 x 5 splits + s11 q24 / q25
    _assert_pass(_run(fixtures_root, calls))


@pytest.mark.skipif(not wetext_available(), reason=NO_WETEXT)
def test_fixture_normalize_and_tokenize(fixtures_root: Path) -> None:
    calls = _calls(fixtures_root, normalizing=True)
    assert len(calls) == 26
    _assert_pass(_run(fixtures_root, calls))


# ------------------------------------------------------------------------------------------ CJK split

def test_cjk_split_edges() -> None:
    assert tokenize_by_cjk_char(" 他说：“你好。”ok ") == "他 说 ：“ 你 好 。 ”OK"
    assert tokenize_by_cjk_char("ab  cd") == "AB  CD"                  # inner whitespace kept
    assert tokenize_by_cjk_char("x\u3000y") == "X Y"                   # U+3000 split off, then dropped
    assert tokenize_by_cjk_char("a\ufb00b") == "AFFB"                  # U+FB00 not CJK; upper() expands it
    assert tokenize_by_cjk_char("a\u1200b a\u11ffb") == "A\u1200B A \u11ff B"


# ------------------------------------------------------------------------------------------ segments

def test_split_empty_and_invalid() -> None:
    assert split_segments([], 10) == []
    with pytest.raises(ValueError):
        split_segments(["a"], 0)


def test_split_quote_after_sentence_token_is_duplicated() -> None:
    tokens = ["▁A", "B", "C", ".", "'", "▁D", "E", "F", "."]
    assert split_pieces(tokens, 20) == [["▁A", "B", "C", ".", "'"], ["'", "▁D", "E", "F", "."]]


def test_split_break_token_ends_piece_at_any_length_sentence_token_needs_three() -> None:
    assert split_pieces(["▁A", "-", "B"], 20) == [["▁A", "-"], ["B"]]
    assert split_pieces(["▁A", ".", "B", "C"], 20) == [["▁A", ".", "B", "C"]]
    assert split_pieces(["A", "▁!", "B", "C"], 20) == [["A", "▁!", "B", "C"]]     # "▁!" is no terminator


def test_split_hard_cut_gives_max_then_one() -> None:
    pieces = split_pieces([f"t{i}" for i in range(8)], 3)
    assert [len(p) for p in pieces] == [3, 1, 3, 1]


def test_merge_quick_streaming_counts_all_tokens_so_far() -> None:
    pieces = [["a"] * 8, ["b"] * 8, ["c"] * 9]
    assert [len(s) for s in merge_pieces(pieces, 20, 0)] == [16, 9]
    assert [len(s) for s in merge_pieces(pieces, 20, 16)] == [8, 17]    # total 16 is not > 16
    assert [len(s) for s in merge_pieces(pieces, 20, 15)] == [16, 9]
    assert [len(s) for s in merge_pieces([["a"] * 2, ["b"] * 3], 5, 100)] == [2, 3]   # 5 > 5 / 2


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_ids_and_specials(bpe_path: Path) -> None:
    tok = TextTokenizer(bpe_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.vocab_size) == (0, 1, 2, 200)
    tokens = tok.tokenize("Hello world.")
    assert tokens[:2] == ["▁H", "E"] and tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(tokens)) == tokens
    assert tok.segment_ids("Hello world. This is a tiny test!", 6)[0] == [28, 48, 25, 51, 18, 40]


def test_tokenizer_one_character_bypasses_normalizer(bpe_path: Path, fallback: TextNormalizer) -> None:
    tok = TextTokenizer(bpe_path, fallback)
    assert tok.pretokenize(" 5 ") == " 5 "                 # not "five", not stripped, not upper-cased
    assert tok.pretokenize("a") == "a"
    assert tok.pretokenize("55") == "五 十 五"              # no ASCII letter: the Chinese path
    assert tok.pretokenize("a 5") == "A FIVE"


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_tokenizer_empty_text_is_input_error(bpe_path: Path, text: str) -> None:
    with pytest.raises(InputError, match="empty"):
        TextTokenizer(bpe_path).tokenize(text)


def test_tokenizer_bad_model_files(tmp_path: Path, bpe_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        TextTokenizer(tmp_path / "bpe.model")
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(bpe_path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.model"):
        TextTokenizer(truncated)


def test_tokenizer_on_demo_bpe(tmp_path: Path, fallback: TextNormalizer) -> None:
    from export.demo import train_bpe

    path = tmp_path / "bpe.model"
    train_bpe(path, 400)
    tok = TextTokenizer(path, fallback)
    segments = tok.segment_ids("今天天气很好。We have 3 apples, really!", 12)
    flat = [i for seg in segments for i in seg]
    assert segments and all(0 <= i < 400 for i in flat) and all(len(s) <= 13 for s in segments)


# ------------------------------------------------------------------------------------------ normalizer

def test_language_choice() -> None:
    assert use_chinese("你好 world") and use_chinese("123, 456") and use_chinese("user1@mail.com")
    assert use_chinese("ni3 hao3") and not use_chinese("beta1 voice2") and not use_chinese("Hello world")


@pytest.mark.parametrize("text,want", [
    ("It's here. What's that?", "It is here. What is that?"),
    ('He said "hi" (ok) [x] ～ a—b: c; d', "He said 'hi' 'ok' 'x' - a-b, c, d"),
    ("Wait... then，，，", "Wait… then,,,"),                    # '，' is tried before '，，，' in the map
    ("Use GPT-5-nano on day 3.", "Use GPT-five-nano on day three."),
])
def test_fallback_english_path(fallback: TextNormalizer, text: str, want: str) -> None:
    assert fallback.normalize(text) == want


@pytest.mark.parametrize("text,want", [
    ("我有10005个苹果，，，", "我有一万零五个苹果…"),              # full-to-half first, then ',,,' -> '…'
    ("用GPT-5-nano读hao3和ju4。", "用GPT-五-nano读hao3和JV4."),  # only j/q/x syllables are respelt
    ("克里斯托弗·诺兰说：“好”", "克里斯托弗-诺兰说,'好'"),
    ("<行|xing2>业 50%", "<行|xing2>业 百分之五十"),              # annotation restored verbatim
    ("价格$5", "价格.五"),                                        # zh map: '$' -> '.'
])
def test_fallback_chinese_path(fallback: TextNormalizer, text: str, want: str) -> None:
    assert fallback.normalize(text) == want


def test_glossary_only_when_enabled() -> None:
    glossary = {"C++": {"en": "C plus plus", "zh": "C 加加"}, "TTS": "T T S"}
    on = TextNormalizer(enable_glossary=True, backend="fallback", glossary=glossary)
    off = TextNormalizer(enable_glossary=False, backend="fallback", glossary=glossary)
    assert on.normalize("I like c++ and TTS") == "I like C plus plus and T T S"
    assert on.normalize("我喜欢C++") == "我喜欢C 加加"
    assert off.normalize("I like TTS") == "I like TTS"


def test_unknown_backend() -> None:
    with pytest.raises(ToolkitError, match="backend"):
        TextNormalizer(backend="nope")


@pytest.mark.skipif(not wetext_available(), reason=NO_WETEXT)
def test_wetext_protections() -> None:
    normalizer = TextNormalizer(backend="wetext")
    assert normalizer.normalize("用GPT-5-nano读xuan4，<行|xing2>业") == "用GPT-五-nano读XVAN4,<行|xing2>业"
    assert normalizer.normalize("It's 12.5 dollars") == "It is twelve point five dollars"


def test_fallback_numbers() -> None:
    assert en_cardinal("0") == "zero" and en_cardinal("1234") == "one thousand two hundred and thirty four"
    assert en_cardinal("1000001") == "one million one"
    assert en_ordinal("22") == "twenty second" and en_ordinal("40") == "fortieth" and en_ordinal("12") == "twelfth"
    assert [zh_cardinal(s) for s in ("10", "110", "1005", "100000", "100000001", "0123")] == \
        ["十", "一百一十", "一千零五", "十万", "一亿零一", "零一二三"]


# ------------------------------------------------------------------------------------------ grammar cache

def _fake_factory(calls: list[str]):
    def build(directory: str) -> str:
        calls.append(directory)
        for part in ("tagger", "verbalizer"):
            path = Path(directory) / f"zz_{part}.fst"
            if not path.exists():
                path.write_text("fst")
        return directory
    return build


def test_grammar_cache_builds_once_then_reads(tmp_path: Path) -> None:
    calls: list[str] = []
    load_cached(_fake_factory(calls), "zz", "key", tmp_path)
    assert (tmp_path / "key" / "zz_tagger.fst").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["key"]           # scratch moved into place, nothing left
    load_cached(_fake_factory(calls), "zz", "key", tmp_path)
    assert calls[1] == str(tmp_path / "key") and calls[0] != calls[1]


def test_grammar_cache_unwritable_root_builds_in_temp(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    calls: list[str] = []
    load_cached(_fake_factory(calls), "zz", "key", blocker / "cache")
    assert not Path(calls[0]).exists()                                # temporary build removed
