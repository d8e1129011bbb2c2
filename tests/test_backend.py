"""runtime/backend.py: one `open_backend` opens every graph and the GPT steps at load; injected executors
become the same kind of Backend; the synthesizer runs whatever Backend it is given and closes what it owns.
On the tiny demo export, ONNX Runtime on the CPU (the TensorRT path: tests/trt/test_backend_trt.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.backend import Backend, open_backend
from runtime.contracts import GRAPH_NAMES
from runtime.errors import ContractError, EngineMismatchError, InputError
from runtime.executors import GraphSet
from runtime.gpt.generate import GenerationConfig, generate
from runtime.gpt.graph_steps import GraphGptSteps
from runtime.gpt.steps import GptSteps
from runtime.manifest import read_manifest
from runtime.request import DecoderSettings, SynthesisRequest
from runtime.synthesizer import Synthesizer

GEN, DEC = GenerationConfig(max_mel_tokens=20), DecoderSettings(steps=3)


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


@pytest.fixture(scope="module")
def request_(tiny_ckpt) -> SynthesisRequest:
    return SynthesisRequest(text="Hello world. This is a test!", speaker=tiny_ckpt / "examples/speaker.wav")


class Counting:
    """An executor wrapper counting runs and closes (an injected executor, as calibration and benchmarks use)."""

    def __init__(self, inner, backend: str | None = None) -> None:
        self.inner, self.name, self.backend = inner, inner.name, backend or inner.backend
        self.calls = self.closed = 0

    def run(self, feed, outputs=None):
        self.calls += 1
        return self.inner.run(feed, outputs)

    def close(self) -> None:
        self.closed += 1


def _conditioning(manifest):
    rng = np.random.default_rng(0)
    d = manifest.dims.model_dim
    return ({"spk_latent": rng.standard_normal((1, 32, d)).astype(np.float32)}, rng.standard_normal((1, d)).astype(np.float32),
            rng.integers(2, manifest.dims.text_vocab, 10))


# ---------------------------------------------------------------------------------------------------
# open_backend


def test_open_backend_opens_every_graph_and_the_steps_now(tiny_export, manifest) -> None:
    backend = open_backend(manifest, tiny_export[0], "auto")
    graphs = backend.graphs
    assert backend.name == "ort-cpu" and isinstance(graphs, GraphSet)
    assert sorted(graphs.opened) == sorted(GRAPH_NAMES)               # nothing is left to load mid-request
    steps = backend.gpt_steps
    assert isinstance(steps, GraphGptSteps) and isinstance(steps, GptSteps)
    assert steps._prefill is graphs["gpt_prefill"] and steps._decode is graphs["gpt_decode"]   # one executor each
    assert sorted(graphs.opened) == sorted(GRAPH_NAMES)
    backend.close()
    assert backend.closed and graphs.opened == ()
    backend.close()                                                  # idempotent
    assert graphs.opened == ()


def test_a_bad_graph_file_fails_at_load_and_what_was_open_is_closed(tiny_export, manifest, tmp_path,
                                                                    monkeypatch) -> None:
    root = Path(shutil.copytree(tiny_export[0], tmp_path / "engines"))
    shutil.copyfile(root / "onnx/gpt_latent.onnx", root / "onnx/bigvgan.onnx")
    closed: list[tuple[str, ...]] = []
    real_close = GraphSet.close

    def spy_close(self) -> None:
        closed.append(self.opened)
        real_close(self)

    monkeypatch.setattr(GraphSet, "close", spy_close)
    with pytest.raises(EngineMismatchError, match="metadata says graph 'gpt_latent'"):
        open_backend(manifest, root, "ort-cpu")
    assert len(closed) == 1 and closed[0] and "bigvgan" not in closed[0]     # the graphs opened before it
    with pytest.raises(EngineMismatchError, match="bigvgan"):
        Synthesizer(root, "ort-cpu")                                  # at construction, not at the first request


def test_open_backend_refuses_an_export_without_every_graph(tiny_export, manifest) -> None:
    from dataclasses import replace

    partial = replace(manifest, graphs={g: e for g, e in manifest.graphs.items() if g != "dit_step"})
    with pytest.raises(ContractError, match=r"no graph\(s\) \['dit_step'\].*--graphs dit_step"):
        open_backend(partial, tiny_export[0], "ort-cpu")


# ---------------------------------------------------------------------------------------------------
# Injected executors


def test_injected_executors_become_a_backend_with_graph_steps_over_them(tiny_export, manifest) -> None:
    graph_set = GraphSet(manifest, tiny_export[0], "ort-cpu")
    executors = {g: Counting(graph_set[g]) for g in manifest.graphs}
    backend = Backend.from_executors(manifest, executors)
    assert backend.name == "ort-cpu" and backend.graphs is executors and isinstance(backend.gpt_steps, GraphGptSteps)
    result = generate(backend.gpt_steps, *_conditioning(manifest), GenerationConfig(max_mel_tokens=12), seed=0,
                      record=True)
    assert executors["gpt_prefill"].calls == 1
    assert executors["gpt_decode"].calls == len(result.trace.logits) - 1 > 0      # one call per step after the first
    backend.close()
    assert all(ex.closed == 0 for ex in executors.values())         # the caller's executors stay open
    mixed = {g: Counting(graph_set[g], "torch" if g == "bigvgan" else None) for g in manifest.graphs}
    assert Backend.from_executors(manifest, mixed).name == "ort-cpu+torch"
    with pytest.raises(ContractError, match=r"no graph\(s\) \['gpt_decode'\]"):
        Backend.from_executors(manifest, {g: ex for g, ex in executors.items() if g != "gpt_decode"})


def test_backend_close_closes_the_steps_then_what_it_owns_once() -> None:
    order: list[str] = []

    class Steps:
        geometry = None

        def prefill(self, feed):
            return feed

        def decode(self, feed):
            return feed

        def new_cache(self, kv, beams, max_rows, buckets):
            return None

        def new_batch_cache(self, max_rows, buckets):
            return None

        def close(self) -> None:
            order.append("steps")
            raise RuntimeError("steps failed to close")

    class Owned:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            order.append(self.name)

    backend = Backend("fake", {}, Steps(), (Owned("graphs"), Owned("stream")))
    with pytest.raises(RuntimeError, match="steps failed"):
        backend.close()
    assert order == ["steps", "graphs", "stream"]                    # the owned ones are closed all the same
    backend.close()
    assert order == ["steps", "graphs", "stream"]


# ---------------------------------------------------------------------------------------------------
# The synthesizer over a Backend


def test_every_way_to_give_the_synthesizer_its_backend_gives_the_same_audio(tiny_export, manifest,
                                                                            request_) -> None:
    root = tiny_export[0]
    by_name = Synthesizer(root, "ort-cpu")
    assert by_name.backend == "ort-cpu" and isinstance(by_name.gpt_steps, GraphGptSteps)
    assert sorted(by_name.graphs.opened) == sorted(GRAPH_NAMES)
    want = by_name.synthesize(request_, GEN, DEC, seed=3)
    opened = open_backend(manifest, root, "ort-cpu")
    by_backend = Synthesizer(root, opened)
    assert by_backend.graphs is opened.graphs and by_backend.gpt_steps is opened.gpt_steps
    graph_set = GraphSet(manifest, root, "ort-cpu")
    injected = Synthesizer(root, executors=graph_set)
    for synth in (by_backend, injected):
        got = synth.synthesize(request_, GEN, DEC, seed=3)
        assert len(got.segments) == len(want.segments)
        for a, b in zip(want.segments, got.segments):
            np.testing.assert_array_equal(b.codes, a.codes)
        np.testing.assert_array_equal(got.pcm, want.pcm)
    for synth in (by_name, by_backend):                               # what the synthesizer opened, it closes
        synth.close()
        synth.close()
        assert synth.graphs.opened == ()
    assert opened.closed
    injected.close()                                                  # injected executors stay the caller's
    assert sorted(graph_set.opened) == sorted(GRAPH_NAMES)
    graph_set.close()
    with pytest.raises(InputError, match="either an opened Backend or executors"):
        Synthesizer(root, opened, executors=graph_set)
