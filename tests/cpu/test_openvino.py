"""The OpenVINO executor (runtime/executors/openvino.py) on the tiny demo export: same results as ONNX Runtime
in fp32, the same feed and identity checks, and clear errors for what it cannot do here."""

from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BackendError, ContractError, EngineMismatchError, InputError
from runtime.executors import OrtExecutor, backend_status, resolve_backend
from runtime.executors import openvino as ov_module
from runtime.executors.openvino import OvExecutor, OvOptions
from runtime.manifest import read_manifest
from runtime.synthesizer import Synthesizer

from .helpers import fixed_length_synthesis, lsb

pytest.importorskip("openvino", reason="the OpenVINO executor needs the openvino package (the `cpu` extra)")


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


def _codec_feed(t: int = 12) -> dict[str, np.ndarray]:
    return {"features": np.random.default_rng(0).standard_normal((1, t, 64)).astype(np.float32)}


def test_every_graph_compiles_and_matches_onnx_runtime_in_fp32(tiny_export, manifest) -> None:
    ov = OvExecutor(manifest.graph("semantic_codec"), tiny_export[0])
    ort = OrtExecutor(manifest.graph("semantic_codec"), tiny_export[0])
    feed = _codec_feed()
    got, want = ov.run(feed), ort.run(feed)
    assert got["codes"].dtype == np.int64                     # the contract's dtype, whatever OpenVINO computes in
    np.testing.assert_array_equal(got["codes"], want["codes"])
    np.testing.assert_allclose(got["quantized"], want["quantized"], rtol=0, atol=1e-5)
    for name in manifest.graphs:                              # and every other graph at least compiles
        OvExecutor(manifest.graph(name), tiny_export[0]).close()


def test_outputs_go_into_given_buffers_and_feeds_are_checked(tiny_export, manifest) -> None:
    ov = OvExecutor(manifest.graph("semantic_codec"), tiny_export[0])
    feed = _codec_feed()
    fresh = ov.run(feed)
    buf = {"codes": np.empty((1, 12), np.int64), "quantized": np.empty((1, 12, 64), np.float32)}
    got = ov.run(feed, outputs=buf)
    assert got["quantized"] is buf["quantized"]
    np.testing.assert_array_equal(buf["quantized"], fresh["quantized"])
    again = ov.run(_codec_feed(20))                            # returned arrays are the caller's: not overwritten
    assert again["quantized"].shape == (1, 20, 64) and fresh["quantized"].shape == (1, 12, 64)
    with pytest.raises(ContractError, match="dtype float64"):
        ov.run({"features": feed["features"].astype(np.float64)})
    ov.close()
    with pytest.raises(BackendError, match="was closed"):
        ov.run(feed)


def test_a_graph_file_from_another_build_is_refused(tiny_export, manifest, tmp_path) -> None:
    root = Path(shutil.copytree(tiny_export[0], tmp_path / "engines"))
    shutil.copyfile(root / "onnx/speaker_conditioner.onnx", root / "onnx/emotion_conditioner.onnx")
    with pytest.raises(EngineMismatchError, match="metadata says graph 'speaker_conditioner'"):
        OvExecutor(manifest.graph("emotion_conditioner"), root)


def test_ov_cpu_synthesis_equals_ort_cpu(tiny_export, tiny_ckpt) -> None:
    """fp32 on OpenVINO: the same codes and the waveform within 2 LSB of ONNX Runtime's."""
    speaker = tiny_ckpt / "examples" / "speaker.wav"
    with Synthesizer(tiny_export[0], "ov-cpu") as ov, Synthesizer(tiny_export[0], "ort-cpu") as ort:
        assert ov.backend == "ov-cpu" and all(isinstance(g, OvExecutor) for g in ov.graphs.values())
        codes_ov, pcm_ov = fixed_length_synthesis(ov, speaker)
        codes_ort, pcm_ort = fixed_length_synthesis(ort, speaker)
    assert codes_ov == codes_ort and sum(map(len, codes_ov)) >= 40
    assert lsb(pcm_ov, pcm_ort) <= 2


def test_bf16_is_refused_where_the_cpu_has_none(tiny_export, manifest, monkeypatch) -> None:
    monkeypatch.setattr(ov_module, "cpu_capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(BackendError, match="no bf16 support"):
        OvExecutor(manifest.graph("campplus"), tiny_export[0], OvOptions(precision="bf16"))
    status = backend_status("ov-cpu", tiny_export[0], "bf16")
    assert not status.ok and "no bf16 support" in status.detail


def test_precisions_that_are_not_openvino_hints_are_refused(tiny_export) -> None:
    with pytest.raises(InputError, match="bf16 is OpenVINO's precision hint.*not on ort-cpu"):
        resolve_backend("ort-cpu", tiny_export[0], "bf16")
    with pytest.raises(InputError, match="fp32 or bf16"):
        Synthesizer(tiny_export[0], "ov-cpu", engine_precision="fp16")


def test_a_missing_openvino_names_the_package(tiny_export, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    monkeypatch.setattr(ov_module, "_CORE", None)
    with pytest.raises(BackendError, match="openvino is not installed: pip install openvino"):
        resolve_backend("ov-cpu", tiny_export[0])
    with pytest.raises(BackendError, match="pip install openvino"):
        Synthesizer(tiny_export[0], "ov-cpu")
