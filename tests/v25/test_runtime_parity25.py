"""End-to-end parity for IndexTTS-2.5 on the tiny 2.5 demo (the 2.0 gate, tests/test_runtime_parity.py): the
runtime over ONNX Runtime reproduces the eager 2.5 pipeline (export/pipeline.py) for the same seed — identical
codes, mel within 1e-4, waveform within 2 LSB — for voice cloning, emotion audio / vector / text, a multi-segment
zh / en text, beam sampling, greedy and duration factors 0.75 and 1.5; plus the 2.5-only request fields and both
CLIs' --lang / --duration-factor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.pipeline import EagerIndexTTS2
from runtime.cfm import mel_length_25
from runtime.errors import InputError
from runtime.gpt.generate import GenerationConfig
from runtime.request import SynthesisRequest
from runtime.synthesizer import Synthesizer
from tests.test_runtime_parity import DECODER, SEED, _request, assert_same_audio

GEN = GenerationConfig(max_mel_tokens=30)
CASES: dict[str, tuple] = {     # name -> (request fields, generation settings[, seed])
    "voice_cloning_en": ({"lang": "en"}, GEN),
    "auto_language_zh": ({"text": "今天天气很好，我们去公园。"}, GEN),
    "emotion_audio": ({"emo_audio": "examples/emotion.wav", "emo_alpha": 0.6, "lang": "en"}, GEN),
    "emotion_vector": ({"emo_vector": (0, 0.4, 0, 0, 0, 0, 0.3, 0), "emo_alpha": 0.8, "lang": "en"}, GEN),
    "emotion_text": ({"use_emo_text": True, "emo_text": "so happy today", "lang": "en"}, GEN),
    "multi_segment_zh_en": ({"text": "The train was late. 今天天气很好。Please read slowly, then pause.",
                             "lang": "zh", "max_text_tokens_per_segment": 12}, GEN),
    "beam_sampling_3": ({"text": "A longer sentence, to let the beams run for a while.", "lang": "en"},
                        GenerationConfig(do_sample=True, num_beams=3, max_mel_tokens=40), 11),
    "greedy": ({"lang": "en"}, GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=30)),
    "duration_factor_slow": ({"lang": "en", "duration_factor": 1.5}, GEN),
    "duration_factor_fast": ({"lang": "en", "duration_factor": 0.75}, GEN),
}


@pytest.fixture(scope="module")
def eager25(tiny25_ckpt: Path) -> EagerIndexTTS2:
    return EagerIndexTTS2(tiny25_ckpt, emo_text_max_new_tokens=8)


@pytest.fixture(scope="module")
def synth25(tiny25_export) -> Synthesizer:
    return Synthesizer(tiny25_export[0], "ort-cpu", emo_text_max_new_tokens=8)


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_on_ort_equals_the_eager_2_5_pipeline(case, eager25, synth25, tiny25_ckpt) -> None:
    kw, generation, seed = (*CASES[case], SEED)[:3]
    request = _request(tiny25_ckpt, kw)
    want = eager25.synthesize(request, generation, DECODER, seed=seed)
    got = synth25.synthesize(request, generation, DECODER, seed=seed)
    assert_same_audio(want, got, f"{case}: runtime+ORT vs eager 2.5 pipeline")
    assert sum(s.codes.size for s in want.segments) > 0, "nothing was generated: the case tests nothing"
    for s in want.segments:                  # the 2.5 target length: int(2N * 1.72 * df)
        assert s.mel.shape[-1] == mel_length_25(2 * s.codes.size, request.duration_factor)
    if case == "multi_segment_zh_en":
        assert len(want.segments) >= 2


def test_an_unknown_lang_uses_common_with_a_warning(synth25, tiny25_ckpt, caplog) -> None:
    with caplog.at_level("WARNING"):
        prep = synth25.prepare(_request(tiny25_ckpt, {"lang": "tlh"}), seed=0)
    assert int(prep.condition["lang_id"][0]) == 105                     # upstream's "common" row
    assert "lang 'tlh' is not in IndexTTS-2.5's language table" in caplog.text


def test_lang_picks_the_prefix_and_the_embedding(synth25, tiny25_ckpt) -> None:
    en = synth25.segments(_request(tiny25_ckpt, {"lang": "en"}))
    zh = synth25.segments(_request(tiny25_ckpt, {"lang": "zh"}))
    assert en[0][0] != zh[0][0]                                          # <|en|> vs <|zh|>
    prep = synth25.prepare(_request(tiny25_ckpt, {"lang": "ja", "text": "こんにちは"}), seed=0)
    assert int(prep.condition["lang_id"][0]) == 7 and prep.condition["style"].shape == (1, 192)


def test_2_5_fields_on_a_2_0_export_are_refused(tiny_export, tiny_ckpt) -> None:
    synth = Synthesizer(tiny_export[0], "ort-cpu")
    for kw in ({"lang": "en"}, {"duration_factor": 1.2}):
        with pytest.raises(InputError, match="IndexTTS-2.5 inputs; this export is IndexTTS2 2.0"):
            synth.synthesize(SynthesisRequest("hello", tiny_ckpt / "examples/speaker.wav", **kw), GEN, DECODER)


def test_a_quick_first_segment_joins_back_to_the_text(synth25, tiny25_ckpt) -> None:
    text = "The train was late again, so we walked to the station in the rain. Please read slowly."
    whole = synth25.segments(_request(tiny25_ckpt, {"text": text, "lang": "en"}))
    quick = synth25.segments(_request(tiny25_ckpt, {"text": text, "lang": "en", "quick_streaming_tokens": 6}))
    assert len(quick) > len(whole) and len(quick[0]) <= 1 + 1 + 6 + 1   # <|en|>, " ", <= 6 text tokens, end id
    decode = synth25.tokenizer.tokenizer.encoding.decode

    def text_of(segments: list[list[int]]) -> str:
        # each segment is `<|en|> ` + its text (the space may merge into the first word) + the end id 1
        return "".join(decode(s[1:-1])[1:] for s in segments)

    assert text_of(quick) == text_of(whole) and text_of(whole).startswith("the train was late")
    assert np.all(np.array([s[-1] for s in quick]) == 1)


def test_both_clis_take_lang_and_duration_factor(tiny25_export, tiny25_ckpt, tmp_path, capsys) -> None:
    """`--lang` / `--duration-factor` in the runtime and the eager CLI: the same codes at every factor (the GPT
    does not see it), 1.5x the audio at 1.5, and the two CLIs write the same audio."""
    import soundfile as sf

    from export import synthesize as eager_cli
    from runtime import cli

    common = ["--speaker", str(tiny25_ckpt / "examples/speaker.wav"), "--text", "Hello world, this is a test.",
              "--lang", "en", "--greedy", "--max-mel-tokens", "24", "--steps", "3", "--seed", "0"]
    audio, codes = {}, {}
    for factor in ("1.0", "1.5"):
        for name, run, where in (("runtime", cli.main, ["synthesize", "--engines", str(tiny25_export[0])]),
                                 ("eager", eager_cli.main, ["--checkpoints", str(tiny25_ckpt)])):
            out = tmp_path / f"{name}-{factor}.wav"
            assert run([*where, *common, "--duration-factor", factor, "--out", str(out)]) == 0
            printed = capsys.readouterr().out
            codes[name, factor] = int(printed.split(" codes")[0].rsplit(" ", 1)[1])
            audio[name, factor], sr = sf.read(out, dtype="int16")
            assert sr == 22050
    assert len(set(codes.values())) == 1 and codes["runtime", "1.0"] > 0          # same codes everywhere
    n = codes["runtime", "1.0"]
    for name in ("runtime", "eager"):
        assert audio[name, "1.0"].size == mel_length_25(2 * n, 1.0) * 256
        assert audio[name, "1.5"].size == mel_length_25(2 * n, 1.5) * 256
        assert audio[name, "1.5"].size / audio[name, "1.0"].size == pytest.approx(1.5, abs=0.02)
    for factor in ("1.0", "1.5"):
        diff = np.abs(audio["runtime", factor].astype(np.int32) - audio["eager", factor].astype(np.int32))
        assert diff.max() <= 2, factor
