"""The strongly typed build (engines/builder.py, engines/strong_typing.py) through the fake TensorRT of each
supported kind (tests/trt/fake_builder.py): the creation flag (10.12+: STRONGLY_TYPED; 11.x: none, it is the
only mode), TF32 cleared for every plan, no call TensorRT 11 removed (the 11.x fake has none of them, the 10.x
fake fails the build if one is used on a strongly typed network), the version gate, the graph-form check, and
a plan recorded before strong typing being rebuilt."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from engines.builder import BuildSettings, build_plan, ensure_plan
from engines.precision import load_policy
from engines.strong_typing import NetworkTypes, graph_form_problem, network_creation, network_types
from runtime.errors import BackendError, ContractError, InputError
from runtime.manifest import read_manifest
from runtime.trt.engine_plan import GpuInfo, plan_paths, read_record
from tests.trt.fake_builder import (
    DataType,
    FakeConfig,
    FakeLayer,
    FakeNetwork,
    FakeTrt,
    fake_trt_for,
)

RTX3090 = GpuInfo("NVIDIA GeForce RTX 3090", "8.6")
FORMS = {"fp32": "fp32", "fp16": "fp16-mixed", "int8": "int8-qdq"}
SUPPORTED = ["10.12.0.36", "10.16.1.11", "11.0.0.114", "11.4.0.106"]


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


@pytest.fixture
def root(tiny_export, tmp_path) -> Path:
    dst = tmp_path / "out"
    (dst / "onnx").mkdir(parents=True)
    shutil.copy2(tiny_export[0] / "manifest.json", dst / "manifest.json")
    for name in ("length_regulator", "dit_step"):
        shutil.copy2(tiny_export[0] / "onnx" / f"{name}.onnx", dst / "onnx" / f"{name}.onnx")
    return dst


@pytest.fixture(scope="module")
def policy():
    return load_policy()


# ---------------------------------------------------------------------------------------------------
# The creation flag, TF32, and no removed call, on every supported TensorRT


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_plan_is_strongly_typed_with_tf32_cleared_and_no_removed_call(manifest, root, policy, version,
                                                                            precision):
    trt = fake_trt_for(manifest, version=version, form=FORMS[precision])
    entry = manifest.graph("dit_step")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)         # a deprecated (weak-typing) call would raise
        out = ensure_plan(entry, root, BuildSettings(precision, policy), trt=trt, gpu=RTX3090)
    ((network, config),) = trt.builds
    eleven = version.startswith("11.")
    assert trt.creation_flags == [0 if eleven else 1 << 1]           # 10.x: STRONGLY_TYPED is bit 1
    assert network.strongly_typed and not network.misuse
    assert trt.BuilderFlag.TF32 not in config.flags and trt.cleared == {trt.BuilderFlag.TF32}
    assert config.flags == set() and config.weak_typing() == []
    notes = out.record.notes
    assert notes["network"] == "strongly typed" and notes["flags_cleared"] == ["TF32"] and notes["flags_set"] == []
    assert notes["network_flags"] == ([] if eleven else ["STRONGLY_TYPED"])
    assert out.record.key.graph_form == FORMS[precision] and notes["graph_form"] == FORMS[precision]


def test_the_creation_flag_comes_from_the_installed_module():
    """The bit moved between majors (10.x EXPLICIT_BATCH = 0, STRONGLY_TYPED = 1; 11.x STRONGLY_TYPED = 0): it is
    computed from the module on 10.x and not passed at all on 11.x, where it is deprecated and ignored."""
    ten, eleven = network_creation(FakeTrt(None, "10.12.0.36")), network_creation(FakeTrt(None, "11.4.0.106"))
    assert (ten.flags, ten.names, ten.implicit) == (2, ("STRONGLY_TYPED",), False)
    assert (eleven.flags, eleven.names, eleven.implicit) == (0, (), True)


@pytest.mark.parametrize("version, words", [("10.11.0.33", "needs TensorRT ≥ 10.12"),
                                            ("10.7.0.23", "needs TensorRT ≥ 10.12"),
                                            ("12.0.0.1", "a major version this toolkit does not know")])
def test_an_unsupported_tensorrt_is_refused_before_any_call(manifest, root, policy, version, words):
    trt = fake_trt_for(manifest, version=version)
    entry = manifest.graph("dit_step")
    with pytest.raises(BackendError, match=words) as err:
        build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt)
    assert "tensorrt-cu12>=10.12,<12" in str(err.value) and "tensorrt-cu13>=10.12,<12" in str(err.value)
    assert trt.creation_flags == [] and not trt.builds


def test_a_10x_network_that_is_not_strongly_typed_is_refused(manifest, root, policy):
    trt = fake_trt_for(manifest, version="10.16.1.11")
    real = trt.Builder.create_network
    trt.Builder.create_network = lambda self, flags=0: real(self, 0)  # a binding that drops the flag
    entry = manifest.graph("dit_step")
    with pytest.raises(BackendError, match="created a network that is not strongly typed"):
        build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt)


# ---------------------------------------------------------------------------------------------------
# The fakes refuse what TensorRT 11 removed (and 10.x refuses it on strongly typed networks)


def test_the_11x_fake_has_none_of_the_removed_api():
    trt = FakeTrt(None, "11.4.0.106")
    for name in ("FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"):
        with pytest.raises(AttributeError):
            getattr(trt.BuilderFlag, name)
    with pytest.raises(AttributeError, match="IInt8EntropyCalibrator2.*removed in TensorRT 11"):
        trt.IInt8EntropyCalibrator2
    assert not hasattr(trt.PreviewFeature, "PROFILE_SHARING_0806")
    config, layer = FakeConfig(trt), FakeLayer("a/Softmax", "SOFTMAX")
    with pytest.raises(AttributeError, match="int8_calibrator.*removed in TensorRT 11"):
        config.int8_calibrator = object()
    with pytest.raises(AttributeError, match="set_calibration_profile.*removed in TensorRT 11"):
        config.set_calibration_profile(None)
    with pytest.raises(AttributeError, match="'precision'.*removed in TensorRT 11"):
        layer.precision = DataType.FLOAT
    with pytest.raises(AttributeError, match="set_output_type.*removed in TensorRT 11"):
        layer.set_output_type(0, DataType.FLOAT)
    with pytest.raises(AttributeError):
        layer.get_output(0).dtype = DataType.HALF                     # ITensor.dtype is read-only


def test_the_10x_fake_fails_a_strongly_typed_build_that_uses_weak_typing(manifest, root):
    trt = fake_trt_for(manifest, version="10.16.1.11")
    builder = trt.Builder(_logger(trt))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, None)
    assert parser.parse_from_file(str(manifest.graph("dit_step").path(root)))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    with pytest.warns(DeprecationWarning):
        network.get_layer(1).precision = trt.float32
    assert builder.build_serialized_network(network, config) is None
    assert any("BuilderFlag.FP16" in e and "ILayer.precision" in e for e in builder.logger.errors)
    weak = builder.create_network(0)                                  # weakly typed 10.x: still allowed
    assert not weak.strongly_typed and builder.build_serialized_network(weak, config) is not None


def _logger(trt):
    from runtime.trt.api import trt_logger

    logger = trt_logger(trt)
    logger.errors.clear()
    return logger


# ---------------------------------------------------------------------------------------------------
# Graph forms


@pytest.mark.parametrize("precision, form, words", [
    ("fp16", "fp32", "it has no fp16 tensor"),
    ("fp16", "int8-qdq", "quantize/dequantize layer(s) (an int8-qdq graph?)"),
    ("fp32", "fp16-mixed", "an fp32 graph has neither"),
    ("int8", "fp32", "INT8 is explicit quantization"),
])
def test_a_graph_in_another_precision_form_is_refused(manifest, root, policy, precision, form, words):
    trt = fake_trt_for(manifest, form=form)
    entry = manifest.graph("length_regulator")
    with pytest.raises(ContractError) as err:
        build_plan(entry, entry.path(root), BuildSettings(precision, policy), trt)
    text = str(err.value)
    assert f"is not in the {FORMS[precision]} precision form" in text and words in text
    assert "precision must be in its graph" in text
    assert not trt.builds


def test_network_types_and_the_form_rules():
    layers = [FakeLayer("w", "CONSTANT", "FLOAT"), FakeLayer("s", "SHAPE", "INT64"),
              FakeLayer("c", "CAST", "HALF"), FakeLayer("mm", "MATRIX_MULTIPLY", "HALF"),
              FakeLayer("back", "CAST", "FLOAT"), FakeLayer("sm", "SOFTMAX", "FLOAT"),
              FakeLayer("topk", "TOPK", "FLOAT", "INT32")]
    types = network_types(FakeNetwork([], layers))
    assert types.fp32_layers == ("back", "sm", "topk")                # constants and shapes are not computation
    assert types.dtypes == {"FLOAT": 4, "INT64": 1, "HALF": 2, "INT32": 1} and types.qdq_layers == 0
    assert graph_form_problem("fp16-mixed", types) == ""
    assert "reduced-precision tensors {'HALF': 2}" in graph_form_problem("fp32", types)
    qdq = NetworkTypes({"FLOAT": 3, "INT8": 1, "HALF": 2}, 2, ())
    assert graph_form_problem("int8-qdq", qdq) == "" and graph_form_problem("fp16-mixed", qdq)
    assert "not a graph form this builder knows" in graph_form_problem("bf16-mixed", qdq)


def test_an_explicit_graph_form_is_checked():
    with pytest.raises(InputError, match="graph form 'fp8-qdq': expected one of fp32, fp16-mixed, int8-qdq"):
        BuildSettings("int8", load_policy(), graph_form="fp8-qdq")
    assert BuildSettings("fp16", load_policy()).graph_form == "fp16-mixed"


# ---------------------------------------------------------------------------------------------------
# Plans built before strong typing


def test_a_plan_recorded_before_strong_typing_is_rebuilt(manifest, root, policy, caplog):
    """An old sidecar (no graph_form: a weakly typed build with precision flags) reads without error and
    its plan is rebuilt, the log saying why."""
    entry = manifest.graph("dit_step")
    trt = fake_trt_for(manifest)
    settings = BuildSettings("fp16", policy)
    ensure_plan(entry, root, settings, trt=trt, gpu=RTX3090)
    sidecar = plan_paths(root, "dit_step", "fp16")[1]
    data = json.loads(sidecar.read_text())
    del data["key"]["graph_form"]
    data["notes"] = {"flags_set": ["FP16", "OBEY_PRECISION_CONSTRAINTS"], "int8": False}
    sidecar.write_text(json.dumps(data))
    assert read_record(sidecar).key.graph_form == "weakly-typed"
    caplog.set_level("INFO", logger="engines")
    out = ensure_plan(entry, root, settings, trt=trt, gpu=RTX3090, tag="dit")
    assert not out.reused and len(trt.builds) == 2
    assert "dit: building engines/dit_step.fp16.plan: it was built as a weakly typed network" in caplog.text
    assert read_record(sidecar).key.graph_form == "fp16-mixed"
