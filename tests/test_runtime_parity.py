"""End-to-end parity on the tiny demo checkpoint (DESIGN.md §6 gate 3).

The runtime (torch-free orchestration) over ONNX Runtime must reproduce the eager pipeline
(export/pipeline.py, the independent reference) for the same seed: identical GPT codes, mel and
waveform within tolerance, in every mode. The same orchestration over the eager torch executors
(export/torch_executor.py) must agree with both, which separates graph differences from host-code
differences.

Tolerances: mel |Δ| <= 1e-4 (log-mel values up to ~7; measured ≤ 3.9e-6: ORT vs torch kernels and the
t schedule's last bit, runtime/cfm.py), waveform within 2 LSB of int16 (float differences ~1e-6 flip
the truncation of a sample by at most one step; measured ≤ 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.pipeline import EagerIndexTTS2
from export.torch_executor import torch_executors
from runtime.gpt.generate import GenerationConfig
from runtime.request import DecoderSettings, SynthesisRequest, SynthesisResult
from runtime.synthesizer import Synthesizer

MEL_ATOL = 1e-4
PCM_LSB = 2
DECODER = DecoderSettings(steps=6)
SEED = 7
CASES: dict[str, tuple] = {     # name -> (request fields, generation settings[, seed])
    "voice_cloning": ({}, GenerationConfig(max_mel_tokens=40)),
    "emotion_audio_alpha": ({"emo_audio": "examples/emotion.wav", "emo_alpha": 0.6}, GenerationConfig(max_mel_tokens=40)),
    "emotion_vector": ({"emo_vector": (0, 0.4, 0, 0, 0, 0, 0.3, 0), "emo_alpha": 0.8}, GenerationConfig(max_mel_tokens=40)),
    "emotion_vector_random": ({"emo_vector": (0.5, 0, 0, 0, 0, 0, 0, 0.2), "use_random": True},
                              GenerationConfig(max_mel_tokens=40)),
    "emotion_text": ({"use_emo_text": True, "emo_text": "so happy today"}, GenerationConfig(max_mel_tokens=40)),
    "multi_segment": ({"text": "The train was late. 今天天气很好。Please read slowly, then pause.",
                       "max_text_tokens_per_segment": 8}, GenerationConfig(max_mel_tokens=40)),
    # seed 11: 30 codes ending in the stop token (beam reorders at every step, then the scorer's finalize)
    "beam_sampling_3": ({"text": "A longer sentence, to let the beams run for a while."},
                        GenerationConfig(do_sample=True, num_beams=3, max_mel_tokens=60), 11),
    "sampling_1": ({}, GenerationConfig(do_sample=True, num_beams=1, max_mel_tokens=40)),
    "greedy": ({"text": "The quick brown fox jumps over the lazy dog."},
               GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=40)),
}


@pytest.fixture(scope="module")
def eager(tiny_ckpt: Path) -> EagerIndexTTS2:
    return EagerIndexTTS2(tiny_ckpt, emo_text_max_new_tokens=8)


@pytest.fixture(scope="module")
def ort_synth(tiny_export) -> Synthesizer:
    return Synthesizer(tiny_export[0], "ort-cpu", emo_text_max_new_tokens=8)


@pytest.fixture(scope="module")
def torch_synth(tiny_export, eager: EagerIndexTTS2) -> Synthesizer:
    out = tiny_export[0]
    return Synthesizer(out, executors=torch_executors(eager.models, Synthesizer(out, "ort-cpu").manifest),
                       emo_text_max_new_tokens=8)


def _request(ckpt: Path, kw: dict) -> SynthesisRequest:
    kw = dict(kw)
    kw.setdefault("text", "Hello world. This is a test!")
    if "emo_audio" in kw:
        kw["emo_audio"] = ckpt / kw["emo_audio"]
    return SynthesisRequest(speaker=ckpt / "examples/speaker.wav", **kw)


def assert_same_audio(want: SynthesisResult, got: SynthesisResult, what: str) -> None:
    assert got.emotion == want.emotion, what
    assert len(got.segments) == len(want.segments), what
    for a, b in zip(want.segments, got.segments):
        where = f"{what}, segment {a.index}"
        np.testing.assert_array_equal(b.text_ids, a.text_ids, err_msg=where)
        np.testing.assert_array_equal(b.codes, a.codes, err_msg=f"{where}: codes differ")
        assert b.stopped == a.stopped, where
        assert b.mel.shape == a.mel.shape, where
        np.testing.assert_allclose(b.mel, a.mel, rtol=0, atol=MEL_ATOL, err_msg=f"{where}: mel")
        assert b.pcm.shape == a.pcm.shape, where
        assert np.abs(b.pcm.astype(np.int32) - a.pcm).max(initial=0) <= PCM_LSB, f"{where}: waveform"
    assert got.pcm.shape == want.pcm.shape, what


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_on_ort_equals_the_eager_pipeline(case, eager, ort_synth, torch_synth, tiny_ckpt) -> None:
    kw, generation, seed = (*CASES[case], SEED)[:3]
    request = _request(tiny_ckpt, kw)
    want = eager.synthesize(request, generation, DECODER, seed=seed)
    got = ort_synth.synthesize(request, generation, DECODER, seed=seed)
    assert_same_audio(want, got, f"{case}: runtime+ORT vs eager pipeline")
    same_host = torch_synth.synthesize(request, generation, DECODER, seed=seed)
    assert_same_audio(want, same_host, f"{case}: runtime+torch executors vs eager pipeline")
    assert sum(s.codes.size for s in want.segments) > 0, "nothing was generated: the case tests nothing"
    if case == "beam_sampling_3":
        assert want.segments[0].codes.size >= 20, "the beam case should run many decode steps"
    if case == "multi_segment":
        assert len(want.segments) >= 3


def test_streaming_yields_the_same_segments(ort_synth, tiny_ckpt) -> None:
    kw, generation = CASES["multi_segment"]
    request = _request(tiny_ckpt, kw)
    whole = ort_synth.synthesize(request, generation, DECODER, seed=3)
    streamed = list(ort_synth.synthesize_segments(request, generation, DECODER, seed=3))
    assert [s.index for s in streamed] == list(range(len(whole.segments)))
    for a, b in zip(whole.segments, streamed):
        np.testing.assert_array_equal(a.pcm, b.pcm)
        assert b.count == len(whole.segments)
