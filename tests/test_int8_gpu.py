"""Calibration on a real GPU: INT8 plans built with the entropy calibrator fed by collected feeds, the
calibration cache reused on the next build, the INT8 gate run over the plans, and FP16 plans built with a
calibrated precision policy. Gated by the `gpu` marker (tests/conftest.py: require_gpu): skipped with the
probe's reason where no NVIDIA GPU is visible, failed where one is visible but TensorRT/CUDA is not usable;
written to run unchanged on a machine with TensorRT 10, cuda-python and a GPU."""

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


def test_int8_plans_are_calibrated_cached_and_gated(calibrated):
    import engines
    from calibration.gate import GATE_NAME, run_int8_gate
    from calibration.int8 import INT8_DIR, calibrator_factory
    from runtime.manifest import read_manifest
    from runtime.trt.engine_plan import plan_paths

    out, calib = calibrated
    manifest = read_manifest(out)
    results = engines.build_all(manifest, out, "int8", calibrator=calibrator_factory(calib))
    assert [o.status for o in results.outcomes] == ["built"] * len(manifest.graphs)
    caches = sorted((calib / INT8_DIR).glob("*.cache"))
    assert caches, "TensorRT wrote no calibration cache through write_calibration_cache"
    for cache in caches:
        header = json.loads(cache.read_bytes().split(b"\n", 1)[0])
        assert header["format"] == "indextts2-int8-calibration" and header["blob_size"] > 0
    # the gate runs every INT8 plan against the float32 graphs and moves refused plans aside
    gate = run_int8_gate(out, calib, 1, print)
    record = json.loads((calib / GATE_NAME).read_text())
    assert set(record["graphs"]) == set(manifest.graphs)
    for graph, decision in record["graphs"].items():
        plan, _ = plan_paths(out, graph, "int8")
        assert plan.exists() == decision["accepted"]
        assert (plan.with_name(plan.name + ".refused")).exists() == (not decision["accepted"])
    assert gate.refused == [g for g, d in record["graphs"].items() if not d["accepted"]]
    # rebuilding: refused graphs come back as fp16 (no calibrator), the others reuse their plans
    engines.build_all(manifest, out, "int8", calibrator=calibrator_factory(calib))
    for graph, decision in record["graphs"].items():
        sidecar = json.loads(plan_paths(out, graph, "int8")[1].read_text())
        assert sidecar["notes"]["int8"] == decision["accepted"]


def test_calibration_int8_leaves_a_runnable_int8_plan_per_graph(calibrated, tmp_path):
    """`python -m calibration int8`'s flow: calibrated build, gate, refused graphs rebuilt as fp16."""
    from calibration.int8_build import Int8Settings, build_int8
    from runtime.executors import backend_status
    from runtime.manifest import read_manifest
    from runtime.trt.engine_plan import plan_paths

    out = shutil.copytree(calibrated[0], tmp_path / "out")
    calib = shutil.copytree(calibrated[1], tmp_path / "calib")
    shutil.rmtree(out / "engines", ignore_errors=True)               # a fresh build, no earlier gate
    (calib / "int8_gate.json").unlink(missing_ok=True)
    result = build_int8(out, calib, Int8Settings(items=1))
    assert result.ok and {o.status for o in result.engines.outcomes} == {"built"}
    for graph, decision in result.gate.decisions.items():                # accepted: INT8; refused: fp16 now
        record = json.loads(plan_paths(out, graph, "int8")[1].read_text())
        assert record["notes"]["int8"] == decision.accepted, graph
    for graph in read_manifest(out).graphs:
        assert plan_paths(out, graph, "int8")[0].is_file(), graph
    assert backend_status("trt", out, "int8").ok


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
