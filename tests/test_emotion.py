"""Emotion control: fixture parity, input validation, source resolution, matrices, and the emotion LLM."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.emotion import (
    EMOTION_NAMES,
    EmotionMatrices,
    cosine_similarity,
    emotions_from_response,
    merge_emovec,
    mix_emovec,
    normalize_emo_vec,
    resolve_emotion_source,
    truncate_emo_vector,
    validate_emo_vector,
)
from runtime.errors import CheckpointError, InputError
from tests.conftest import assert_rows_pass, run_fixture_calls

EMO_NUM = (3, 17, 2, 8, 4, 5, 10, 24)


def test_fixture_calls(fixtures_root: Path) -> None:
    assert_rows_pass(run_fixture_calls(fixtures_root, "emotion_vector"))


# ---- the user's vector ---------------------------------------------------------------------------

@pytest.mark.parametrize("vec, words", [
    ([0.1] * 7, "expected 8"),
    ([0.1] * 9, "expected 8"),
    ([0.1, -0.2, 0, 0, 0, 0, 0, 0], "'angry' is negative"),
    ([0.1, 0, float("nan"), 0, 0, 0, 0, 0], "'sad'"),
    ([0.1, 0, 0, float("inf"), 0, 0, 0, 0], "'afraid'"),
    ([0.1, 0, 0, 0, "0.5", 0, 0, 0], "not a number"),
    ([0.1, 0, 0, 0, 0, None, 0, 0], "not a number"),
    ([True, 0, 0, 0, 0, 0, 0, 0], "not a number"),
    ("happy", "got str"),
    (0.5, "got float"),
    (np.zeros((1, 8)), "flat list"),
])
def test_validate_rejects(vec, words) -> None:
    with pytest.raises(InputError, match=words):
        validate_emo_vector(vec)


def test_validate_accepts_numbers() -> None:
    got = validate_emo_vector(np.array([0, 1, 0.5, 0, 0, 0, 0, 0], dtype=np.float32))
    assert got == [0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0] and all(type(x) is float for x in got)
    assert validate_emo_vector([1, 0, 0, 0, 0, 0, 0, 2]) == [1.0, 0, 0, 0, 0, 0, 0, 2.0]


def test_truncate_rules() -> None:
    vec = [0.95, 0.0, 0.57, 0.12345, 0.29, 0.0, 0.3, 0.05]
    assert truncate_emo_vector(vec, 0.6)[:5] == [0.5699, 0.0, 0.3419, 0.074, 0.1739]  # int() truncates
    assert truncate_emo_vector(vec, 1.0) == vec
    assert truncate_emo_vector(vec, 3.0) == vec                 # clamped to 1: untouched
    assert truncate_emo_vector(vec, -1.0) == [0.0] * 8          # clamped to 0


def test_normalize_rules() -> None:
    small = [0.1, 0, 0, 0, 0, 0, 0, 0.1]
    assert normalize_emo_vec(small) == [0.1 * 0.9375, 0, 0, 0, 0, 0, 0, 0.1 * 0.5625]
    assert normalize_emo_vec(small, apply_bias=False) == small
    big = [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    biased = [x * b for x, b in zip(big, (0.9375, 0.875, 1, 1, 0.9375, 0.9375, 0.6875, 0.5625))]
    k = 0.8 / sum(biased)
    assert normalize_emo_vec(big) == [x * k for x in biased]
    assert math.isclose(sum(normalize_emo_vec(big)), 0.8)


# ---- source resolution ------------------------------------------------------------------------------

def test_resolve_audio_and_speaker() -> None:
    plan = resolve_emotion_source("hi", "spk.wav", emo_audio_prompt="emo.wav", emo_alpha=0.7)
    assert (plan.source, plan.emo_audio, plan.merge_alpha, plan.emo_vector) == ("audio", "emo.wav", 0.7, None)
    plan = resolve_emotion_source("hi", "spk.wav", emo_alpha=0.3)
    assert (plan.source, plan.emo_audio, plan.merge_alpha) == ("speaker", "spk.wav", 1.0)


def test_resolve_vector_discards_audio() -> None:
    plan = resolve_emotion_source("hi", "spk.wav", emo_audio_prompt="emo.wav", emo_alpha=0.6,
                                  emo_vector=[0.95, 0, 0, 0, 0, 0, 0, 0])
    assert (plan.source, plan.emo_audio, plan.merge_alpha) == ("vector", "spk.wav", 1.0)
    assert plan.emo_vector == (0.5699, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_resolve_text_mode() -> None:
    seen = []

    def llm(text: str) -> dict[str, float]:
        seen.append(text)
        return dict(zip(EMOTION_NAMES, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.57, 0.0]))

    plan = resolve_emotion_source("the text", "spk.wav", emo_audio_prompt="emo.wav", emo_alpha=0.6,
                                  emo_vector=[1.0] * 8, use_emo_text=True, text_to_emotion=llm)
    assert seen == ["the text"] and plan.source == "text" and plan.emo_text == "the text"
    assert plan.emo_vector == (0, 0, 0, 0, 0, 0, 0.3419, 0) and plan.emo_audio == "spk.wav"
    resolve_emotion_source("the text", "spk.wav", use_emo_text=True, emo_text="sad words", text_to_emotion=llm)
    assert seen[-1] == "sad words"
    with pytest.raises(InputError, match="emotion LLM"):
        resolve_emotion_source("the text", "spk.wav", use_emo_text=True)


def test_resolve_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="expected 8"):
        resolve_emotion_source("hi", "spk.wav", emo_vector=[0.5] * 3)
    with pytest.raises(InputError, match="emo_alpha"):
        resolve_emotion_source("hi", "spk.wav", emo_alpha=float("nan"))
    for alpha in (1e9, 1.01, -0.1):                   # upstream's UI range is 0..1; past it, extrapolation
        with pytest.raises(InputError, match="between 0 and 1"):
            resolve_emotion_source("hi", "spk.wav", emo_alpha=alpha)
    assert resolve_emotion_source("hi", "spk.wav", emo_audio_prompt="emo.wav", emo_alpha=0.0).merge_alpha == 0.0


# ---- matrices, cosine, mixing ------------------------------------------------------------------------

def _matrices(dim: int = 16, seed: int = 0) -> EmotionMatrices:
    rng = np.random.default_rng(seed)
    return EmotionMatrices.from_arrays(rng.standard_normal((73, 192)).astype(np.float32),
                                       rng.standard_normal((73, dim)).astype(np.float32), EMO_NUM)


def test_cosine_matches_torch_eps_semantics() -> None:
    query = np.array([[1e-9, 0.0, 0.0]], dtype=np.float32)
    matrix = np.array([[1.0, 0.0, 0.0], [1e-9, 1e-9, 0.0], [0.0, 0.0, 0.0], [3.0, -4.0, 1.0]], dtype=np.float32)
    want = F.cosine_similarity(torch.from_numpy(query), torch.from_numpy(matrix), dim=1).numpy()
    np.testing.assert_allclose(cosine_similarity(query, matrix), want, rtol=1e-6, atol=1e-7)
    rng = np.random.default_rng(3)
    q, m = rng.standard_normal((1, 192)).astype(np.float32), rng.standard_normal((24, 192)).astype(np.float32)
    want = F.cosine_similarity(torch.from_numpy(q), torch.from_numpy(m), dim=1).numpy()
    np.testing.assert_allclose(cosine_similarity(q, m), want, rtol=1e-5, atol=1e-7)


def test_select_prototypes_random_draws_like_python() -> None:
    mats = _matrices()
    style = np.ones(192, dtype=np.float32)
    got = mats.select_prototypes(style, use_random=True, rng=random.Random(7))
    ref = random.Random(7)
    assert got.tolist() == [ref.randint(0, n - 1) for n in EMO_NUM]
    got = mats.select_prototypes(style, use_random=True, rng=np.random.default_rng(1))
    assert all(0 <= k < n for k, n in zip(got, EMO_NUM)) and got.dtype == np.int64


def test_mix_and_merge() -> None:
    mats = _matrices(dim=4)
    style = np.random.default_rng(5).standard_normal((1, 192)).astype(np.float32)
    emovec = np.arange(4, dtype=np.float32)[None]
    vec = [0.5, 0, 0, 0, 0, 0, 0, 0.25]
    mix = mix_emovec(mats, vec, style, emovec)
    rows = [mats.emo[0][mix.indices[0]], mats.emo[7][mix.indices[7]]]
    np.testing.assert_allclose(mix.emovec_mat[0], 0.5 * rows[0] + 0.25 * rows[1], rtol=1e-6)
    np.testing.assert_allclose(mix.emovec, mix.emovec_mat + 0.25 * emovec, rtol=1e-6)
    base, emo = np.zeros((1, 4), np.float32), np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(merge_emovec(base, emo, 0.25), np.full((1, 4), 0.25, np.float32))
    with pytest.raises(InputError, match="style"):
        mats.select_prototypes(np.zeros(10, np.float32))


def test_matrices_wrong_rows() -> None:
    with pytest.raises(CheckpointError, match="72 rows.*sums to 73"):
        EmotionMatrices.from_arrays(np.zeros((72, 192)), np.zeros((72, 8)), EMO_NUM)


# ---- feat1.pt / feat2.pt loader ------------------------------------------------------------------------

def test_demo_matrices_round_trip(tmp_path: Path) -> None:
    from export.emotion_matrices import load_emotion_matrices, write_demo_emotion_matrices

    write_demo_emotion_matrices(tmp_path / "feat1.pt", tmp_path / "feat2.pt", torch.Generator().manual_seed(0),
                                model_dim=32)
    mats = load_emotion_matrices(tmp_path / "feat1.pt", tmp_path / "feat2.pt", EMO_NUM, model_dim=32)
    assert [c.shape for c in mats.emo] == [(n, 32) for n in EMO_NUM] and mats.style_dim == 192
    mix = mix_emovec(mats, [0.2] * 8, np.ones(192, np.float32), np.zeros((1, 32), np.float32))
    assert np.all(np.isfinite(mix.emovec)) and 0.05 < float(mix.emovec.std()) < 10


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("feat1, feat2, words", [
    (torch.zeros(72, 192), torch.zeros(72, 32), r"shape \(72, 192\), expected \(73, 192\)"),
    (torch.zeros(73, 100), torch.zeros(73, 32), r"shape \(73, 100\)"),
    (torch.zeros(73, 192), torch.zeros(73, 31), r"emo_matrix.*shape \(73, 31\), expected \(73, 32\)"),
    ({"feat": torch.zeros(73, 192)}, torch.zeros(73, 32), "expected a plain tensor"),
    (torch.zeros(73, 192, dtype=torch.int64), torch.zeros(73, 32), "floating-point"),
    (torch.zeros(73, 192), torch.full((73, 32), float("nan")), "NaN"),
])
def test_loader_rejects_bad_files(tmp_path: Path, feat1, feat2, words) -> None:
    from export.emotion_matrices import load_emotion_matrices

    with pytest.raises(CheckpointError, match=words):
        load_emotion_matrices(_save(tmp_path / "feat1.pt", feat1), _save(tmp_path / "feat2.pt", feat2),
                              EMO_NUM, model_dim=32)


def test_loader_missing_and_truncated(tmp_path: Path) -> None:
    from export.emotion_matrices import load_emotion_matrices

    f1 = _save(tmp_path / "feat1.pt", torch.zeros(73, 192))
    with pytest.raises(CheckpointError, match="feat2.pt: file not found"):
        load_emotion_matrices(f1, tmp_path / "feat2.pt", EMO_NUM)
    f2 = _save(tmp_path / "feat2.pt", torch.zeros(73, 32))
    f2.write_bytes(f2.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="feat2.pt"):
        load_emotion_matrices(f1, f2, EMO_NUM)


# ---- parsing the emotion LLM's answer (UPSTREAM.md §2.11) ------------------------------------------

# (emotion text, model answer, expected vector in the order happy angry sad afraid disgusted melancholic
# surprised calm) — the table, each through the function the pipelines use.
ANSWERS = [
    ("今天真好", '{"高兴": 0.8, "惊讶": 0.3, "自然": 0}', [0.8, 0, 0, 0, 0, 0, 0.3, 0]),
    ("好", "高兴: 0.7, 悲伤: 0.2", [0.7, 0, 0.2, 0, 0, 0, 0, 0]),
    ("I feel melancholy today", '{"悲伤": 0.9, "自然": 0.1}', [0, 0, 0, 0, 0, 0.9, 0, 0.1]),
    ("so gloomy", "悲伤:0.6 低落:0.1", [0, 0, 0.1, 0, 0, 0.6, 0, 0]),
    ("angry", '{"愤怒": 2.5, "恐惧": -1}', [0, 1.2, 0, 0, 0, 0, 0, 0]),
    ("x", '"高兴"', [1, 0, 0, 0, 0, 0, 0, 0]),
    ("x", '{"emotion": "happy"}', [1, 0, 0, 0, 0, 0, 0, 0]),
    ("x", '{"label": "悲伤", "score": 0.9}', [0, 0, 1, 0, 0, 0, 0, 0]),
    ("x", '{"情绪": "angry"}', [0, 1, 0, 0, 0, 0, 0, 0]),
    ("x", '{"高兴": "悲伤"}', [0, 0, 1, 0, 0, 0, 0, 0]),
    ("x", '{"happy": 0.6, "sad": 0.4}', [0, 0, 0, 0, 0, 0, 0, 1]),
    ("x", '{"高兴": "0.5", "惊讶": "0.25"}', [0.5, 0, 0, 0, 0, 0, 0.25, 0]),
    ("x", "高兴", [0, 0, 0, 0, 0, 0, 0, 1]),
    ("x", "", [0, 0, 0, 0, 0, 0, 0, 1]),
    ("x", 'Result: {"反感": 0.4, "惊讶": 0.4}', [0, 0, 0, 0, 0.4, 0, 0.4, 0]),
    # beyond the table: the rules' corners
    ("x", '{"emotion_label": " Calm ", "情感": "高兴"}', [0, 0, 0, 0, 0, 0, 0, 1]),      # first alias wins
    ("x", '{"emotion": "高兴", "惊讶": 0.3}', [0, 0, 0, 0, 0, 0, 0.3, 0]),          # a score key: no one-hot
    ("x", '{"悲伤": "高兴", "高兴": 0.2}', [1, 0, 0, 0, 0, 0, 0, 0]),               # label value, vector order
    ("x", '{"Emotion": "happy", "HAPPY": 1}', [0, 0, 0, 0, 0, 0, 0, 1]),            # keys are exact
    ("x", "高兴：0.7", [0, 0, 0, 0, 0, 0, 0, 1]),                                     # full-width colon: no pair
    ("x", '{"高兴": 0.5, "恐惧": 0.1,}', [0.5, 0, 0, 0.1, 0, 0, 0, 0]),              # bad JSON -> the pairs
    ("x", "1. 高兴: 0.7\n2. 低落: 0.2", [0.7, 0, 0, 0, 0, 0.2, 0, 0]),
    ("x", "[1, 2]", [0, 0, 0, 0, 0, 0, 0, 1]),                                         # JSON, not an object
    ("x", '{"高兴": true, "愤怒": Infinity, "悲伤": NaN}', [1, 1.2, 1.2, 0, 0, 0, 0, 0]),  # Python's float()
    ("心情低落", '{"悲伤": 0.7}', [0, 0, 0, 0, 0, 0.7, 0, 0]),                         # the swap, any case
    ("I feel GLOOMY", '{"悲伤": 0.9, "低落": 0.1}', [0, 0, 0.1, 0, 0, 0.9, 0, 0]),
    ("I feel sad", '{"悲伤": 0.9, "低落": 0.1}', [0, 0, 0.9, 0, 0, 0.1, 0, 0]),
    # where upstream crashes (a melancholic text with an answer that is not a JSON object): our choice
    ("so gloomy", '"悲伤"', [0, 0, 0, 0, 0, 1, 0, 0]),             # the label's one-hot, then the swap
    ("so gloomy", '"高兴"', [1, 0, 0, 0, 0, 0, 0, 0]),
    ("so gloomy", "0.5", [0, 0, 0, 0, 0, 0, 0, 1]),                # no score in a number: calm
    # an object with a label alias and a melancholic text: upstream's order (swap first) gives calm
    ("so gloomy", '{"emotion": "悲伤"}', [0, 0, 0, 0, 0, 0, 0, 1]),
]


@pytest.mark.parametrize("text, answer, expected", ANSWERS)
def test_answers_are_parsed_as_upstream(text: str, answer: str, expected: list[float]) -> None:
    got = emotions_from_response(answer, text)
    assert list(got) == list(EMOTION_NAMES)
    assert list(got.values()) == pytest.approx(expected, abs=0, rel=0)


@pytest.mark.parametrize("answer, value", [
    ('{"高兴": "很高"}', "'很高'"),
    ('{"高兴": 0.5, "愤怒": null}', "None"),
    ('{"恐惧": [0.5]}', r"\[0.5\]"),
    ("高兴: 0.7.", "'0.7.'"),                 # the pair's number is '0.7.'
])
def test_a_non_numeric_score_is_an_error_of_its_own(answer: str, value: str) -> None:
    from runtime.errors import EmotionAnswerError, ToolkitError

    with pytest.raises(EmotionAnswerError, match=rf"score {value} is not a number") as err:
        emotions_from_response(answer, "x")
    message = str(err.value)
    assert repr(answer) in message and "Retry" in message and "--emo-vector" in message
    assert err.value.answer == answer and err.value.retryable and isinstance(err.value, ToolkitError)


# ---- the emotion LLM -----------------------------------------------------------------------------------

def test_strip_thinking_and_end_id() -> None:
    from runtime.emotion.llm import THINK_END_ID, strip_thinking, think_end_id

    assert strip_thinking([5, 9, 7, 9, 3, 4], 9) == [3, 4]
    assert strip_thinking([5, 6], 9) == [5, 6] and strip_thinking([5, 6], None) == [5, 6]

    class Big:
        unk_token_id = None

        def __len__(self) -> int:
            return 151669

    assert think_end_id(Big()) == THINK_END_ID


def test_missing_directory(tmp_path: Path) -> None:
    from runtime.emotion.llm import QwenEmotion

    with pytest.raises(CheckpointError, match="qwen0.6bemo4-merge.*not found"):
        QwenEmotion(tmp_path / "qwen0.6bemo4-merge")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="partial.*missing tokenizer_config.json"):
        QwenEmotion(tmp_path / "partial")


def test_llm_dtype_choice_needs_no_torch() -> None:
    from runtime.emotion.llm import choose_dtype

    assert choose_dtype("cuda") == "float16" and choose_dtype("cuda:1") == "float16"
    assert choose_dtype("cpu") == "float32"
    assert choose_dtype("cpu", "auto") == "auto" and choose_dtype("cuda", "bfloat16") == "bfloat16"
    assert choose_dtype("cpu", torch.float16) == "float16"              # a torch dtype's name is accepted
    with pytest.raises(InputError, match="dtype 'int8': expected one of auto, float16, bfloat16, float32"):
        choose_dtype("cpu", "int8")


def _demo_dir(tmp_path: Path) -> Path:
    """A directory that passes the file check (the stack check comes after it)."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def test_missing_transformers_or_torch_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.utils
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 — loaded before the patch,
    from transformers import tokenization_utils_base  # noqa: F401  so they keep the real is_torch_available

    from runtime.emotion.llm import QwenEmotion

    directory = _demo_dir(tmp_path)
    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)
    with pytest.raises(InputError, match=r"needs torch and transformers \(torch is not installed\).*--emo-vector"):
        QwenEmotion(directory)
    monkeypatch.undo()
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)     # import transformers -> ImportError
    with pytest.raises(InputError, match=r"needs torch and transformers \(transformers is not installed\)"):
        QwenEmotion(directory)


@pytest.fixture(scope="module")
def demo_qwen(tmp_path_factory: pytest.TempPathFactory):
    from export.qwen_emotion import write_demo_qwen_emotion
    from runtime.emotion.llm import QwenEmotion

    directory = write_demo_qwen_emotion(tmp_path_factory.mktemp("qwen") / "qwen0.6bemo4-merge",
                                        torch.Generator().manual_seed(0))
    return directory, QwenEmotion(directory, device="cpu", max_new_tokens=8)


def test_demo_qwen_end_to_end(demo_qwen) -> None:
    directory, qwen = demo_qwen
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 5_000_000
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json"):
        assert (directory / name).is_file(), name
    prompt = qwen.prompt("今天很开心")
    assert "文本情感分类" in prompt and "今天很开心" in prompt and prompt.endswith("<think>\n\n</think>\n\n")
    got = qwen.inference("今天很开心")
    assert list(got) == list(EMOTION_NAMES)
    assert got == {**{n: 0.0 for n in EMOTION_NAMES}, "calm": 1.0}   # random weights: the calm fallback
    assert qwen.vector("今天很开心") == [0.0] * 7 + [1.0]
    assert (qwen.device, qwen.dtype, qwen.model.dtype) == ("cpu", "float32", torch.float32)
    with pytest.raises(InputError, match="empty"):
        qwen.inference("  ")


def test_demo_qwen_loads_in_the_dtype_named_by_a_string(demo_qwen) -> None:
    from runtime.emotion.llm import QwenEmotion

    directory, _ = demo_qwen
    half = QwenEmotion(directory, device="cpu", dtype="float16", max_new_tokens=1)
    assert half.dtype == "float16" and half.model.dtype == torch.float16
    assert next(half.model.parameters()).device.type == "cpu"


def test_demo_qwen_canned_answer(demo_qwen, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer path with a model that 'thinks' first: everything up to the last </think> is dropped."""
    _, qwen = demo_qwen
    canned = qwen.tokenizer("<think>高兴: 1</think>\n\n{\"悲伤\": 0.9, \"愤怒\": 2}<|im_end|>",
                            return_tensors="pt")["input_ids"]

    def generate(input_ids, attention_mask, max_new_tokens, pad_token_id):
        assert max_new_tokens == 8 and pad_token_id == qwen.tokenizer.eos_token_id
        return torch.cat([input_ids, canned], dim=1)

    monkeypatch.setattr(qwen.model, "generate", generate)
    assert qwen.respond("x").strip() == '{"悲伤": 0.9, "愤怒": 2}'
    got = qwen.inference("so gloomy")
    assert (got["happy"], got["angry"], got["sad"], got["melancholic"]) == (0.0, 1.2, 0.0, 0.9)
