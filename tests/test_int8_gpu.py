"""Calibration on a real GPU: int8 plans built from the INT8 forms (explicit Q/DQ, gated on the CPU) by
`python -m calibration int8`, and FP16 plans built with a calibrated precision policy. Gated by the `gpu`
marker (tests/conftest.py: require_gpu): skipped with the probe's reason where no NVIDIA GPU is visible,
failed where one is visible but TensorRT/CUDA is not usable."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [pytest.mark.gpu]


@pytest.fixture(scope="module")
def calibrated(tiny_export, tmp_path_factory):
    """A copy of the tiny export plus a small calibration directory (ONNX Runtime collection)."""
    from calibration.collect import CollectSettings, collect
    from calibration.corpus import CalibrationText, write_default_voices

    root = tmp_path_factory.mktemp("int8")
    out = shutil.copytree(tiny_export[0], root / "out")
    calib = root / "calib"
    refs = write_default_voices(calib / "references")[:2]
    texts = [CalibrationText("en", "The quick brown fox jumps over the lazy dog."),
             CalibrationText("zh", "今天天气很好，我们一起去公园散步吧。")]
    collect(out, calib, texts, refs, CollectSettings(backend="ort-cpu", gpt_tokens=12, euler_steps=4))
    return out, calib


def test_calibration_int8_leaves_a_runnable_int8_plan_per_graph(calibrated, tmp_path):
    """`python -m calibration int8`'s flow on a GPU machine: INT8 forms gated on the CPU, recorded in the
    manifest, then one strongly typed int8 plan per graph built from its int8 form (the INT8 form, or the fp16
    form of a refused graph), and the pipeline runs on them."""
    from calibration.int8_build import Int8Settings, build_int8
    from runtime.executors import backend_status
    from runtime.manifest import read_manifest
    from runtime.request import DecoderSettings, SynthesisRequest
    from runtime.synthesizer import Synthesizer
    from runtime.gpt.generate import GenerationConfig
    from runtime.trt.engine_plan import plan_paths

    out = shutil.copytree(calibrated[0], tmp_path / "out")
    calib = shutil.copytree(calibrated[1], tmp_path / "calib")
    shutil.rmtree(out / "engines", ignore_errors=True)
    result = build_int8(out, calib, Int8Settings(items=1))
    assert result.ok and {o.status for o in result.engines.outcomes} == {"built"}
    record = json.loads((calib / "int8_gate.json").read_text())
    manifest = read_manifest(out, check_hashes=True)
    for graph, entry in manifest.graphs.items():
        assert plan_paths(out, graph, "int8")[0].is_file(), graph
        kind = "int8" if record["graphs"][graph]["accepted"] else "fp16"
        assert entry.forms["int8"].file == f"onnx/{kind}/{graph}.onnx"
    assert backend_status("trt", out, "int8").ok
    request = SynthesisRequest(text="Hello world.", speaker=calib / "references" / sorted(
        p.name for p in (calib / "references").glob("*.wav"))[0])
    with Synthesizer(out, "trt", engine_precision="int8") as synth:
        audio = synth.synthesize(request, GenerationConfig(max_mel_tokens=16), DecoderSettings(steps=3), seed=0)
    assert audio.pcm.size > 0


def test_fp16_plans_follow_a_calibrated_policy(calibrated):
    import engines
    from calibration.feeds import FeedStore
    from calibration.fp16_analysis import AnalysisLimits, analyze_graph
    from calibration.policy_writer import calibrated_policy, write_policy
    from runtime.manifest import read_manifest
    from runtime.trt.engine_plan import plan_paths

    out, calib = calibrated
    manifest = read_manifest(out)
    entry = manifest.graph("length_regulator")
    analysis = analyze_graph("length_regulator", entry.path(out), FeedStore.open(calib), None, AnalysisLimits())
    policy_file = write_policy(calibrated_policy(None, [analysis]), calib)
    engines.build_all(manifest, out, "fp16", policy_file, graphs=["length_regulator"])
    sidecar = json.loads(plan_paths(out, "length_regulator", "fp16")[1].read_text())
    recorded = json.dumps(sidecar)
    for layer in analysis.measured:
        assert layer in recorded, f"measured fp32 layer {layer} missing from the plan record"
