"""The executor interface and the ONNX Runtime executor; backend choice; the synthesizer's caches and
thread safety — on the tiny demo export."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BackendError, ContractError, EngineMismatchError, InputError
from runtime.executors import GraphSet, OrtExecutor, backend_status, resolve_backend
from runtime.executors import ort as ort_module
from runtime.gpt.generate import GenerationConfig, generate
from runtime.gpt.graph_steps import GraphGptSteps, geometry_of
from runtime.manifest import read_manifest
from runtime.request import DecoderSettings, SynthesisRequest
from runtime.synthesizer import Synthesizer


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


def _executor(tiny_export, manifest, name: str) -> OrtExecutor:
    return OrtExecutor(manifest.graph(name), tiny_export[0])


def _codec_feed(t: int = 12) -> dict[str, np.ndarray]:
    return {"features": np.random.default_rng(0).standard_normal((1, t, 64)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------------
# Feeds and outputs


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("features"), "missing from the feed"),
    (lambda f: f.update(extra=np.zeros(1, np.float32)), "does not take"),
    (lambda f: f.update(features=f["features"].astype(np.float64)), "dtype float64"),
    (lambda f: f.update(features=f["features"][0]), "rank 2"),
    (lambda f: f.update(features=np.zeros((1, 12, 65), np.float32)), "axis 2 is 65"),
    (lambda f: f.update(features=np.zeros((1, 24, 64), np.float32)[:, ::2]), "C-contiguous"),
    (lambda f: f.update(features=[[1.0]]), "numpy array"),
])
def test_a_wrong_feed_names_the_tensor(tiny_export, manifest, change, message) -> None:
    executor = _executor(tiny_export, manifest, "semantic_codec")
    feed = _codec_feed()
    change(feed)
    with pytest.raises(ContractError, match=message):
        executor.run(feed)


def test_inconsistent_dynamic_axes_are_refused(tiny_export, manifest) -> None:
    executor = _executor(tiny_export, manifest, "length_regulator")
    with pytest.raises(ContractError, match="another input has batch = 2"):
        executor.run({"s": np.zeros((2, 5, 64), np.float32), "ylens": np.array([3], np.int64)})


def test_outputs_are_written_into_given_buffers(tiny_export, manifest) -> None:
    executor = _executor(tiny_export, manifest, "semantic_codec")
    feed = _codec_feed()
    fresh = executor.run(feed)
    buf = {"codes": np.empty((1, 12), np.int64), "quantized": np.empty((1, 12, 64), np.float32)}
    got = executor.run(feed, outputs=buf)
    assert got["quantized"] is buf["quantized"] and got["codes"] is buf["codes"]
    np.testing.assert_array_equal(buf["quantized"], fresh["quantized"])
    np.testing.assert_array_equal(buf["codes"], fresh["codes"])
    # ORT-allocated outputs are copies the caller owns: the next run does not change them
    again = executor.run(_codec_feed(20))
    assert again["quantized"].shape == (1, 20, 64) and fresh["quantized"].shape == (1, 12, 64)
    np.testing.assert_array_equal(executor.run(feed)["quantized"], fresh["quantized"])
    with pytest.raises(ContractError, match="output buffer 'quantized'"):
        executor.run(feed, outputs={"quantized": np.empty((1, 11, 64), np.float32)})


def test_data_dependent_outputs_cannot_be_preallocated(tiny_export, manifest) -> None:
    executor = _executor(tiny_export, manifest, "length_regulator")
    feed = {"s": np.zeros((1, 5, 64), np.float32), "ylens": np.array([9], np.int64)}
    assert executor.run(feed)["cond"].shape == (1, 9, 48)
    with pytest.raises(ContractError, match="data-dependent shape"):
        executor.run(feed, outputs={"cond": np.empty((1, 9, 48), np.float32)})


class CountingBinding:
    """Wraps an IOBinding and counts the input bindings."""

    def __init__(self, binding) -> None:
        self._binding, self.inputs = binding, 0

    def bind_input(self, *a, **k):
        self.inputs += 1
        return self._binding.bind_input(*a, **k)

    def __getattr__(self, name):
        return getattr(self._binding, name)


def test_decode_steps_bind_nothing_new(tiny_export, manifest) -> None:
    """After the first decode step, the loop's feeds (cache views, ids, positions, mask) and the output
    buffers stay the same arrays: no step rebinds or allocates an input."""
    prefill = _executor(tiny_export, manifest, "gpt_prefill")
    decode = _executor(tiny_export, manifest, "gpt_decode")
    counting = CountingBinding(decode._binding)
    decode._binding = counting
    steps = GraphGptSteps(prefill, decode, geometry_of(manifest))
    rng = np.random.default_rng(0)
    spk = rng.standard_normal((1, 32, 64)).astype(np.float32)
    emo = rng.standard_normal((1, 64)).astype(np.float32)
    result = generate(steps, {"spk_latent": spk}, emo, np.arange(2, 12), GenerationConfig(num_beams=3, max_mel_tokens=30), seed=0)
    inputs = len(manifest.graph("gpt_decode").inputs)
    assert len(result.codes) > 3, "too few decode steps to show anything"
    assert counting.inputs == inputs            # bound once, at the first step (one cache bucket)


# ---------------------------------------------------------------------------------------------------
# Identity and backends


def test_a_graph_file_from_another_build_is_refused(tiny_export, manifest, tmp_path) -> None:
    root = Path(shutil.copytree(tiny_export[0], tmp_path / "engines"))
    shutil.copyfile(root / "onnx/speaker_conditioner.onnx", root / "onnx/emotion_conditioner.onnx")
    with pytest.raises(EngineMismatchError, match="metadata says graph 'speaker_conditioner'"):
        OrtExecutor(manifest.graph("emotion_conditioner"), root)


def test_backend_choice_here(tiny_export) -> None:
    assert resolve_backend("auto", tiny_export[0]) == "ort-cpu"
    assert resolve_backend("ort-cpu") == "ort-cpu"
    with pytest.raises(InputError, match="unknown backend 'gpu'"):
        resolve_backend("gpu")
    for name in ("trt", "ort-cuda"):
        with pytest.raises(BackendError, match=f"backend {name} cannot run here"):
            resolve_backend(name, tiny_export[0])
        status = backend_status(name, tiny_export[0])
        assert not status.ok and status.detail


def test_ort_cuda_is_refused_without_the_provider(tiny_export, manifest) -> None:
    with pytest.raises(BackendError, match="no CUDA execution provider"):
        OrtExecutor(manifest.graph("campplus"), tiny_export[0], "ort-cuda")


@pytest.mark.filterwarnings("ignore:Specified provider .CUDAExecutionProvider.:UserWarning")
def test_ort_cuda_falling_back_to_cpu_is_detected(tiny_export, manifest, monkeypatch) -> None:
    """ONNX Runtime silently runs on the CPU when the CUDA provider cannot load; the executor checks the
    providers the session really got (simulated: this onnxruntime claims CUDA but cannot load it)."""
    monkeypatch.setattr(ort_module, "cuda_provider_available", lambda: True)
    with pytest.raises(BackendError, match="did not activate the CUDA execution provider"):
        OrtExecutor(manifest.graph("campplus"), tiny_export[0], "ort-cuda")


def test_graph_set_opens_lazily_and_once(tiny_export, manifest) -> None:
    graphs = GraphSet(manifest, tiny_export[0], "ort-cpu")
    assert len(graphs._open) == 0
    first = graphs["campplus"]
    assert graphs["campplus"] is first and list(graphs._open) == ["campplus"]


# ---------------------------------------------------------------------------------------------------
# Synthesizer: caches, threads


class CountingExecutor:
    def __init__(self, inner) -> None:
        self.inner, self.name, self.backend, self.calls = inner, inner.name, inner.backend, 0

    def run(self, feed, outputs=None):
        self.calls += 1
        return self.inner.run(feed, outputs)


@pytest.fixture(scope="module")
def counted(tiny_export, manifest):
    graphs = GraphSet(manifest, tiny_export[0], "ort-cpu")
    executors = {name: CountingExecutor(graphs[name]) for name in manifest.graphs}
    return Synthesizer(tiny_export[0], executors=executors), executors


def test_speaker_preparation_is_cached_by_content(counted, tiny_ckpt, tmp_path) -> None:
    synth, executors = counted
    speaker = tiny_ckpt / "examples/speaker.wav"
    synth.speaker(speaker)
    before = executors["semantic_encoder"].calls
    synth.speaker(speaker)
    copy = tmp_path / "same_voice.wav"
    shutil.copyfile(speaker, copy)
    synth.speaker(copy)                                           # same content, other path: cached
    assert executors["semantic_encoder"].calls == before
    other = tmp_path / "other_voice.wav"
    import soundfile as sf

    data, sr = sf.read(speaker, dtype="float32")
    sf.write(other, data * 0.5, sr)
    synth.speaker(other)                                          # new content: prepared again
    assert executors["semantic_encoder"].calls == before + 1


def test_concurrent_requests_get_what_they_would_get_alone(tiny_export, tiny_ckpt) -> None:
    synth = Synthesizer(tiny_export[0], "ort-cpu")
    gen, dec = GenerationConfig(max_mel_tokens=25), DecoderSettings(steps=3)
    requests = [SynthesisRequest(text=t, speaker=tiny_ckpt / "examples/speaker.wav", max_text_tokens_per_segment=8)
                for t in ("The train was late. Please read slowly.", "今天天气很好。我们去公园吧。")]
    alone = [synth.synthesize(r, gen, dec, seed=i) for i, r in enumerate(requests)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = synth.synthesize(requests[i], gen, dec, seed=i)
        except BaseException as err:  # noqa: BLE001 — reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, want in enumerate(alone):
        np.testing.assert_array_equal(results[i].pcm, want.pcm)
