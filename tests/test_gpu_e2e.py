"""End-to-end on TensorRT (DESIGN.md §6 gate 4): the runtime with fp32 engines reproduces the eager pipeline
(identical codes, mel and waveform within tolerance); fp16 engines stay within stated bounds. Needs an NVIDIA
GPU with TensorRT 10 and cuda-python; skipped elsewhere, written to run unchanged there.

Bounds for fp16 (random-weight tiny demo, so there is no "speech quality" to judge): the GPT's codes may
diverge once a token's probability margin is below fp16 resolution, so codes are compared as agreement of the
common prefix and the decoder is checked by feeding it the eager codes: mel SNR >= 25 dB against the fp32 mel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.trt import gpu
from runtime.gpt.generate import GenerationConfig
from runtime.request import DecoderSettings, SynthesisRequest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu.tensorrt().ok, reason=f"needs TensorRT and an NVIDIA GPU "
                                                                f"({gpu.tensorrt().detail})")]

DECODER = DecoderSettings(steps=6)
MEL_ATOL_FP32 = 1e-3          # TF32 is disabled in fp32 plans; kernels differ from the CPU's in summation order
FP16_MEL_SNR_DB = 25.0


@pytest.fixture(scope="module")
def engines_dir(trt_engines) -> Path:
    """The session's export with fp32 and fp16 plans (tests/conftest.py: trt_engines)."""
    return trt_engines[0]


@pytest.fixture(scope="module")
def eager(tiny_ckpt):
    from export.pipeline import EagerIndexTTS2

    return EagerIndexTTS2(tiny_ckpt)


def _request(ckpt: Path, **kw) -> SynthesisRequest:
    kw.setdefault("text", "Hello world. This is a test!")
    return SynthesisRequest(speaker=ckpt / "examples/speaker.wav", **kw)


@pytest.mark.parametrize("kw, generation", [
    ({}, GenerationConfig(max_mel_tokens=40)),                                          # beam sampling, 3 beams
    ({"emo_vector": (0, 0.4, 0, 0, 0, 0, 0.3, 0)}, GenerationConfig(max_mel_tokens=40)),
    ({"text": "The quick brown fox jumps over the lazy dog."},
     GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=40)),                 # greedy
])
def test_fp32_engines_equal_the_eager_pipeline(engines_dir, eager, tiny_ckpt, kw, generation) -> None:
    from runtime.synthesizer import Synthesizer

    request = _request(tiny_ckpt, **kw)
    want = eager.synthesize(request, generation, DECODER, seed=7)
    with Synthesizer(engines_dir, "trt", engine_precision="fp32") as tts:
        got = tts.synthesize(request, generation, DECODER, seed=7)
    for a, b in zip(want.segments, got.segments, strict=True):
        np.testing.assert_array_equal(b.codes, a.codes)
        np.testing.assert_allclose(b.mel, a.mel, rtol=0, atol=MEL_ATOL_FP32)
        assert np.abs(b.pcm.astype(np.int32) - a.pcm).max(initial=0) <= 16


def test_fp16_engines_within_bounds(engines_dir, tiny_ckpt) -> None:
    from runtime.cfm import euler_solve, mel_length, regulate
    from runtime.synthesizer import Synthesizer

    request = _request(tiny_ckpt)
    generation = GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=40)
    with Synthesizer(engines_dir, "trt", engine_precision="fp32") as fp32:
        ref = fp32.synthesize(request, generation, DECODER, seed=3)
        prep = fp32.prepare(request, seed=3)
        codes = ref.segments[0].codes
        s_infer = fp32.graphs["gpt_latent"].run({"spk_latent": prep.spk_latent, "emovec": prep.emovec,
                                                 "text_ids": ref.segments[0].text_ids[None],
                                                 "codes": np.ascontiguousarray(codes[None])})["s_infer"]
        cond = regulate(fp32.graphs["length_regulator"], s_infer, mel_length(codes.size))
        prompt = prep.prompt
        condition = np.concatenate([prompt.prompt_condition, cond], axis=1)
        noise = np.random.default_rng(0).standard_normal((1, 80, condition.shape[1]), dtype=np.float32)
        mel32 = euler_solve(fp32.graphs["dit_step"], condition, prompt.ref_mel, prompt.style, noise, 6)
    with Synthesizer(engines_dir, "trt", engine_precision="fp16") as fp16:
        half = fp16.synthesize(request, generation, DECODER, seed=3)
        mel16 = euler_solve(fp16.graphs["dit_step"], condition, prompt.ref_mel, prompt.style, noise, 6)
    a, b = ref.segments[0].codes, half.segments[0].codes
    n = min(a.size, b.size)
    common = n if np.array_equal(a[:n], b[:n]) else int(np.argmax(a[:n] != b[:n]))
    assert common >= min(5, a.size), f"fp16 greedy codes diverge at token {common}"
    snr = 10 * np.log10(np.sum(mel32 ** 2) / max(float(np.sum((mel16 - mel32) ** 2)), 1e-30))
    assert snr >= FP16_MEL_SNR_DB, f"fp16 mel SNR {snr:.1f} dB (the decoder alone, on the fp32 codes)"
