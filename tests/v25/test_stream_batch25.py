"""Streaming and batching on an IndexTTS-2.5 export hold the same promises as on 2.0 (tests/streaming,
tests/scheduler): the stream is the offline audio (identical codes, identical mel, waveform within 1 LSB), and
requests from many threads that share graph calls — the decode steps, the Euler steps and the codec decoder's
S_infer pass — each get exactly their audio alone."""

from __future__ import annotations

import pytest

from runtime.gpt.generate import GenerationConfig
from runtime.synthesizer import Synthesizer
from tests.scheduler.test_concurrent import assert_concurrent_requests_are_alone
from tests.streaming.test_stream import DECODER, _chunks, assert_stream_is_offline
from tests.test_runtime_parity import _request

STREAM_CASES = {
    "voice_cloning_en": ({"lang": "en"}, GenerationConfig(max_mel_tokens=30), 3),
    "multi_segment_zh_en": ({"text": "The train was late. 今天天气很好。Please read slowly, then pause.", "lang": "zh",
                             "max_text_tokens_per_segment": 10, "duration_factor": 1.3},
                            GenerationConfig(max_mel_tokens=24), 4),
    "beams_emotion_vector": ({"emo_vector": (0, 0.4, 0, 0, 0, 0, 0.3, 0), "lang": "en"},
                             GenerationConfig(do_sample=True, num_beams=3, max_mel_tokens=30), 5),
}


@pytest.fixture(scope="module")
def synth25(tiny25_export) -> Synthesizer:
    tts = Synthesizer(tiny25_export[0], "ort-cpu")
    yield tts
    tts.close()


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_the_2_5_stream_is_the_offline_audio(case, synth25, tiny25_ckpt) -> None:
    kw, generation, seed = STREAM_CASES[case]
    request = _request(tiny25_ckpt, kw)
    whole = synth25.synthesize(request, generation, DECODER, seed=seed)
    assert_stream_is_offline(_chunks(synth25, request, generation, seed), whole, case)
    if case == "multi_segment_zh_en":
        assert len(whole.segments) >= 2


def test_concurrent_2_5_requests_share_calls_and_each_is_its_audio_alone(synth25, tiny25_ckpt, monkeypatch) -> None:
    assert_concurrent_requests_are_alone(synth25, tiny25_ckpt, monkeypatch, "2.5")
