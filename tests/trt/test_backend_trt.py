"""runtime/backend.py on `trt`, through the fake tensorrt + cudart: the GPT steps are TrtGptSteps (device
KV cache), the graph set opens every other graph at load, close frees every device allocation, and the
synthesizer — with no backend branch of its own — gives the audio ONNX Runtime gives."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import executors as executors_module
from runtime.backend import STEP_GRAPHS, open_backend
from runtime.contracts import GRAPH_NAMES
from runtime.gpt.generate import GenerationConfig, generate
from runtime.request import DecoderSettings, SynthesisRequest
from runtime.synthesizer import Synthesizer
from runtime.trt import api
from runtime.trt.gpu import Probe


@pytest.fixture
def trt_here(fake_engines, monkeypatch):
    """The fake engines, with this process believing TensorRT and a GPU are present."""
    root, trt = fake_engines
    monkeypatch.setattr(executors_module, "tensorrt", lambda: Probe(True, "fake TensorRT"))
    monkeypatch.setattr(api, "import_tensorrt", lambda: trt)
    return root, trt


def test_open_backend_on_trt_opens_trt_gpt_steps_and_the_other_graphs(trt_here, manifest) -> None:
    from runtime.trt.gpt_steps import TrtGptSteps

    root, trt = trt_here
    backend = open_backend(manifest, root, "trt", precision="fp16")
    assert backend.name == "trt" and isinstance(backend.gpt_steps, TrtGptSteps)
    assert sorted(backend.graphs.opened) == sorted(set(GRAPH_NAMES) - set(STEP_GRAPHS))
    rng = np.random.default_rng(0)
    d = manifest.dims.model_dim
    spk, emo = rng.standard_normal((1, 32, d)).astype(np.float32), rng.standard_normal((1, d)).astype(np.float32)
    generate(backend.gpt_steps, {"spk_latent": spk}, emo, rng.integers(2, manifest.dims.text_vocab, 10),
             GenerationConfig(num_beams=3, max_mel_tokens=6), seed=0)
    assert trt.cudart.device                                          # prefill kv, device cache, kv_new
    backend.close()
    backend.close()
    assert backend.graphs.opened == ()
    assert not trt.cudart.device and not trt.cudart.host and not trt.cudart.execs


def test_the_synthesizer_on_trt_gives_the_audio_ort_gives(trt_here, tiny_ckpt) -> None:
    root, trt = trt_here
    request = SynthesisRequest(text="Hello world. This is a test!", speaker=tiny_ckpt / "examples/speaker.wav")
    gen, dec = GenerationConfig(max_mel_tokens=20), DecoderSettings(steps=3)
    with Synthesizer(root, "ort-cpu") as ort:
        want = ort.synthesize(request, gen, dec, seed=5)
    with Synthesizer(root, "trt", engine_precision="fp16") as tts:
        assert tts.backend == "trt"
        got = tts.synthesize(request, gen, dec, seed=5)
    for a, b in zip(want.segments, got.segments, strict=True):
        np.testing.assert_array_equal(b.codes, a.codes)
    np.testing.assert_allclose(got.pcm, want.pcm, atol=2)
    assert not trt.cudart.device and not trt.cudart.host and not trt.cudart.execs
