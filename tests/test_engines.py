"""The engine builder on CPU (engines/): the precision policy and its selection of fp32 islands, the builder's
decisions (flags, optimization profiles, cache key, reuse), parser and build failures, build_all's per-graph
failures, and `export.build` without a GPU. The strongly typed build itself (creation flags per TensorRT
version, TF32, graph forms, no removed call) is tests/test_engines_strong_typing.py's.

TensorRT cannot be installed here, so a fake `tensorrt` module stands in (tests/trt/fake_builder.py): it has
the classes and methods engines/builder.py calls (as in engines/TENSORRT_API.md), records every call, and
behaves like TensorRT 11 by default (what 11 removed is an AttributeError) or like 10.12+ when asked. The same
flow runs against real TensorRT in tests/test_engines_gpu.py.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import shutil
from pathlib import Path

import pytest

import engines
from engines import EngineBuildFailures, build_all
from engines.outcome import EngineOutcome, EngineResults
from engines.builder import (
    BuildSettings,
    build_plan,
    builder_flags,
    cache_decision,
    engine_key,
    ensure_plan,
    parser_errors,
    profile_calls,
    progress_monitor,
    timing_cache_path,
)
from engines.precision import (
    DEFAULT_POLICY_PATH,
    LayerInfo,
    PrecisionPolicy,
    load_policy,
    select_fp32_layers,
)
from export import build as build_mod
from runtime.errors import BackendError, CheckpointError, ContractError, InputError
from runtime.manifest import read_manifest, sha256_file
from runtime.trt.api import trt_logger
from runtime.trt.engine_plan import GpuInfo, decode_batch_max, decode_buckets, plan_paths, read_record

from tests.trt.fake_builder import (  # noqa: F401 — re-exported: tests/test_calibration.py imports them from here
    BuilderFlag,
    DataType,
    FakeLayer,
    FakeNetwork,
    FakeParserError,
    FakeProfile,
    FakeTrt,
    LayerType,
    MemoryPoolType,
    PreviewFeature,
    Severity,
    ErrorCode,
    fake_trt_for,
    graph_layers,
)

RTX = GpuInfo("NVIDIA GeForce RTX 4090", "8.9")
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
TRT = "11.4.0.106"          # the fake's default version


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


@pytest.fixture
def root(tiny_export, tmp_path) -> Path:
    """An export directory with the manifest and the ONNX files of a few small graphs (a copy)."""
    src = tiny_export[0]
    dst = tmp_path / "out"
    (dst / "onnx").mkdir(parents=True)
    shutil.copy2(src / "manifest.json", dst / "manifest.json")
    (dst / "onnx" / "fp16").mkdir()
    for name in ("length_regulator", "semantic_codec", "campplus", "gpt_decode", "dit_step"):
        shutil.copy2(src / "onnx" / f"{name}.onnx", dst / "onnx" / f"{name}.onnx")
        shutil.copy2(src / "onnx" / "fp16" / f"{name}.onnx", dst / "onnx" / "fp16" / f"{name}.onnx")
    return dst


@pytest.fixture(scope="module")
def policy() -> PrecisionPolicy:
    return load_policy()


# ---------------------------------------------------------------------------------------------------
# Precision policy


def test_default_policy_covers_the_design_spots(policy):
    assert policy.source == str(DEFAULT_POLICY_PATH) and policy.version == 1
    everywhere = {t for _, r in policy.rules_for("gpt_decode") for t in r.ops}
    assert {"LayerNormalization", "InstanceNormalization", "ReduceMean", "ReduceL2", "Softmax"} <= everywhere
    patterns = {g: {r.pattern for _, r in policy.rules_for(g)} for g in ("bigvgan", "length_regulator", "dit_step")}
    assert {"*.act/*", "*activations*act*"} <= patterns["bigvgan"]
    assert {"*interpolate*", "*floor*", "*Floor*", "*Cast*"} <= patterns["length_regulator"]
    assert "*t_embedder*" in patterns["dit_step"]
    assert {"*ReduceL2*", "*norm*"} <= {r.pattern for _, r in policy.rules_for("speaker_conditioner")}
    assert all(r.why for g in policy.graphs for _, r in policy.rules_for(g))          # every rule says why
    again = PrecisionPolicy.from_json(json.loads(json.dumps(policy.to_json())), "copy")
    assert again == policy and again.sha256() == policy.sha256() and len(policy.sha256()) == 64


def test_policy_override_file(tmp_path, policy):
    path = tmp_path / "precision_policy.json"
    path.write_text(json.dumps({"version": 1, "graphs": {"bigvgan": [
        {"pattern": "*conv_post*", "types": ["CONVOLUTION"], "dtype": "fp32", "why": "calibration: SNR 31 dB"}]}}))
    override = load_policy(path)
    assert override.source == str(path) and override.sha256() != policy.sha256()
    layers = [LayerInfo("bigvgan.conv_post/conv1d_9/Conv", "CONVOLUTION", ("FLOAT",)),
              LayerInfo("bigvgan.resblocks.0.activations.0.act/sin/Sin", "UNARY", ("FLOAT",))]
    assert select_fp32_layers("bigvgan", layers, override) == [
        ("bigvgan.conv_post/conv1d_9/Conv", "calibration: SNR 31 dB [bigvgan:*conv_post* types=CONVOLUTION]")]


@pytest.mark.parametrize("text, words", [
    (None, "file not found"),
    ("{not json", "not JSON (line 1, column 2"),
    ('{"version": 2, "graphs": {}}', "version 2, this toolkit reads version 1"),
    ('{"version": 1, "graphs": {"*": [{"patern": "*norm*"}]}}', "unknown keys ['patern']"),
    ('{"version": 1, "graphs": {"*": [{"pattern": "*", "types": ["softmax"]}]}}', "LayerType names in capitals"),
    ('{"version": 1, "graphs": {"*": [{"pattern": "*", "dtype": "fp8"}]}}', "dtype 'fp8'; supported: fp32"),
    ('{"version": 1, "graphs": {"*": {"pattern": "*"}}}', "graphs.*: must be a list of rules"),
    ('[1, 2]', "top level must be an object"),
])
def test_bad_policy_files_are_refused_clearly(tmp_path, text, words):
    path = tmp_path / "policy.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as err:
        load_policy(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_every_problem_of_a_policy_is_listed_at_once():
    with pytest.raises(InputError) as err:
        PrecisionPolicy.from_json({"version": 1, "graphs": {"a": [{"pattern": ""}, {"pattern": "x", "why": 3}]}}, "p")
    assert "graphs.a[0]: 'pattern' must be a non-empty string" in str(err.value)
    assert "graphs.a[1]: 'why' must be a string" in str(err.value)


def L(name: str, type_: str = "ELEMENTWISE", *dtypes: str, metadata: str = "", op: str = "") -> LayerInfo:  # noqa: N802
    """A node as the policy sees it; its ONNX op is the last part of the exporter's name unless given."""
    return LayerInfo(name, type_, tuple(dtypes or ("FLOAT",)), metadata, op or name.rsplit("/", 1)[-1])


def selected(graph: str, layers, policy) -> list[str]:
    return [name for name, _ in select_fp32_layers(graph, layers, policy)]


def test_selection_keeps_norms_softmax_and_reductions_in_fp32_everywhere(policy):
    layers = [
        L("cfm.estimator.transformer.layers.3.attention_norm.norm/mean_12/ReduceMean", "REDUCE"),
        L("cfm.estimator.transformer.layers.3.attention_norm.norm/rsqrt_6/Sqrt", "UNARY"),
        L("gpt.gpt.h.0.ln_1/layer_norm/LayerNormalization", "NORMALIZATION"),
        L("node_softmax", "SOFTMAX", op="Softmax"),                             # no module path: by op
        L("node_linalg_vector_norm", "REDUCE", op="ReduceL2"),
        L("gpt.perceiver_encoder.norm/div_2/Div"),
        L("cfm.estimator.transformer.layers.0.attention_norm.project_layer/linear_4/MatMul", "MATRIX_MULTIPLY"),
        L("campplus.xvector.block1.tdnnd1.nonlinear1.batchnorm/_native_batch_norm/BatchNormalization", "SCALE"),
        L("gpt.gpt.h.0.attn/matmul/MatMul", "MATRIX_MULTIPLY"),
        L("gpt.gpt.h.0.mlp/gelu/Tanh", "ACTIVATION"),
    ]
    for graph in ("dit_step", "gpt_decode", "speaker_conditioner"):
        assert selected(graph, layers, policy) == [ly.name for ly in layers[:6]], graph
    reasons = dict(select_fp32_layers("gpt_decode", layers, policy))
    assert reasons["node_softmax"].endswith("[*:* ops=Softmax]") and "overflows fp16" in reasons["node_softmax"]


def test_graph_rules_apply_only_to_their_graph(policy):
    snake = [L("bigvgan.resblocks.0.activations.2.act/sin_8/Sin", "UNARY"),
             L("bigvgan.activation_post.act/mul_3/Mul"),
             L("bigvgan.resblocks.0.activations.2.upsample/conv1d_7/Conv", "CONVOLUTION"),
             L("bigvgan.resblocks.0.convs1.0/conv1d_3/Conv", "CONVOLUTION"),
             L("(Unnamed Layer* 7) [Shuffle]", "SHUFFLE", metadata="[ONNX Layer: bigvgan.activation_post.act/pow/Pow]")]
    assert selected("bigvgan", snake, policy) == [snake[0].name, snake[1].name, snake[4].name]
    assert selected("dit_step", snake, policy) == []
    t_emb = [L("cfm.estimator.t_embedder/sin/Sin", "UNARY"), L("cfm.estimator.t_embedder.mlp.0/linear/Gemm",
                                                                "MATRIX_MULTIPLY")]
    assert selected("dit_step", t_emb, policy) == [t.name for t in t_emb]
    assert selected("bigvgan", t_emb, policy) == []


def test_length_regulator_index_arithmetic_is_fp32_but_not_its_conv_stack(policy):
    layers = [
        L("regulator/max_1/ReduceMax", "REDUCE", "INT64"),                       # integer: never forced
        L("regulator.content_in_proj/linear/MatMul", "MATRIX_MULTIPLY"),
        L("regulator/arange/Range", "FILL", "INT64"),
        L("regulator/_to_copy/Cast", "CAST"),                                    # int64 -> float32 frame numbers
        L("regulator/div/Div"),
        L("regulator/mul_5/Mul"),
        L("regulator/floor/Floor", "UNARY"),
        L("regulator/_to_copy_2/Cast", "CAST", "INT64"),
        L("regulator/clamp/Clip", "ELEMENTWISE", "INT64"),
        L("regulator/index_select/Gather", "GATHER"),
        L("regulator.model.0/conv1d/Conv", "CONVOLUTION"),
        L("regulator.model.1/group_norm/InstanceNormalization", "NORMALIZATION"),
        L("regulator.model.2/mish/Mish", "ACTIVATION"),
        L("regulator/lt/Less", "ELEMENTWISE", "BOOL"),
        L("regulator/_to_copy_3/Cast", "CAST"),
        L("regulator/mul_69/Mul"),
        L("regulator/shape/Shape", "SHAPE", "INT64"),
        L("regulator/const", "CONSTANT"),
    ]
    got = dict(select_fp32_layers("length_regulator", layers, policy))
    assert list(got) == ["regulator/_to_copy/Cast", "regulator/div/Div", "regulator/mul_5/Mul",
                         "regulator/floor/Floor", "regulator/index_select/Gather",
                         "regulator.model.1/group_norm/InstanceNormalization", "regulator/_to_copy_3/Cast",
                         "regulator/mul_69/Mul"]
    assert "[length_regulator:*floor*]" in got["regulator/floor/Floor"]
    assert "[length_regulator:*Cast*]" in got["regulator/_to_copy/Cast"]
    assert "outside the conv stack" in got["regulator/div/Div"]
    assert selected("bigvgan", layers[4:6], policy) == []                      # the catch-all is LR's only


def test_integer_shape_and_constant_layers_are_never_forced():
    everything = PrecisionPolicy({"*": (dataclasses.replace(load_policy().graphs["*"][0], ops=()),)})
    layers = [L("a/Shape", "SHAPE", "INT64"), L("b/const", "CONSTANT"), L("c/idx", "GATHER", "INT32"),
              L("d/mask", "ELEMENTWISE", "BOOL"), L("e/topk", "TOPK", "FLOAT", "INT32"), L("f/none", "GATHER", "INT8")]
    assert selected("any", layers, everything) == ["e/topk"]


# ---------------------------------------------------------------------------------------------------
# Builder decisions


def test_builder_flags_set_nothing_and_clear_tf32_at_every_precision():
    """Strong typing: the precision is the graph's, so no flag is set; TF32 is cleared for every plan."""
    for precision in ("fp32", "fp16", "int8"):
        assert builder_flags(precision).set == () and builder_flags(precision).clear == ("TF32",)
    with pytest.raises(InputError, match="expected one of fp32, fp16, int8"):
        builder_flags("bf16")


def test_decode_profiles_are_one_per_bucket_with_cache_len_fixed(manifest):
    entry = manifest.graph("gpt_decode")
    calls = profile_calls(entry)
    assert [label for label, _ in calls] == [f"cache_len={b}" for b in decode_buckets(entry)]
    for bucket, (_, shapes) in zip(decode_buckets(entry), calls):
        by_name = {name: (lo, opt, hi) for name, lo, opt, hi in shapes}
        assert list(by_name) == [t.name for t in entry.inputs]                 # one set_shape per input
        rows = decode_batch_max(entry, bucket)                 # the shared decode batch's rows (64: tiny model)
        assert rows == 64 and by_name["mel_ids"] == ((1, 1), (3, 1), (rows, 1))
        for layer in range(manifest.dims.layers):
            lo, opt, hi = by_name[f"kv_cache.{layer}"]
            assert lo[3] == opt[3] == hi[3] == bucket and (lo[1], opt[1], hi[1]) == (1, 3, rows)
        assert by_name["kv_mask"] == ((1, bucket), (3, bucket), (rows, bucket))


def test_dit_profile_comes_from_the_manifest_ranges(manifest):
    entry = manifest.graph("dit_step")
    ((label, shapes),) = profile_calls(entry)
    by_name = {name: (lo, opt, hi) for name, lo, opt, hi in shapes}
    r, b = entry.ranges["mel_len"], entry.ranges["batch"]
    assert label == "default"
    assert by_name["x"] == ((b.min, 80, r.min), (b.opt, 80, r.opt), (b.max, 80, r.max))
    assert by_name["cond"] == ((b.min, r.min, manifest.dims.content_dim), (b.opt, r.opt, manifest.dims.content_dim),
                               (b.max, r.max, manifest.dims.content_dim))
    assert by_name["cfg_rate"] == ((1,), (1,), (1,)) and by_name["t"] == ((1,), (1,), (4,))


def test_build_plan_drives_tensorrt_as_documented(manifest, root, policy, caplog):
    trt = fake_trt_for(manifest)
    entry = manifest.graph("gpt_decode")
    settings = BuildSettings("fp16", policy, workspace_bytes=3 << 30)
    with caplog.at_level(logging.DEBUG, logger="engines"):
        built = build_plan(entry, entry.path(root), settings, trt, timing_cache=b"old-cache", tag="[1/1] gpt_decode")
    ((network, config),) = trt.builds
    assert trt.creation_flags == [0] and network.strongly_typed                     # TensorRT 11: always
    assert config.pools == {MemoryPoolType.WORKSPACE: 3 << 30}
    assert config.flags == set() and trt.cleared == {BuilderFlag.TF32}             # nothing set, TF32 cleared
    assert config.preview == {PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10: True}   # memory follows the shapes
    assert [p.shapes for p in config.profiles] == [list(calls) for _, calls in profile_calls(entry)]
    assert trt.cache_loads == [b"old-cache"] and built.timing_cache == b"old-cache+timed"
    assert config.progress_monitor is not None
    assert "[1/1] gpt_decode: Building engine (2 steps)" in caplog.text
    assert built.fp32_layers == ("gpt_decode.block.norm/mean/ReduceMean",          # as the graph types them
                                 "gpt_decode.block.attn/softmax/Cast", "gpt_decode.block.attn/softmax/Softmax",
                                 "gpt_decode/add/Add")
    assert b"gpt_decode.block/linear/MatMul=HALF" in built.plan and b"strongly_typed=True" in built.plan
    assert built.tensor_types == {"INT64": 1, "FLOAT": 4, "HALF": 2}


def test_fp32_plans_clear_tf32_and_record_no_fp32_layers(manifest, root, policy):
    trt = fake_trt_for(manifest, form="fp32")
    entry = manifest.graph("dit_step")
    built = build_plan(entry, entry.path(root), BuildSettings("fp32", policy), trt)
    ((network, config),) = trt.builds
    assert config.flags == set() and trt.cleared == {BuilderFlag.TF32}
    assert built.fp32_layers == () and network.strongly_typed


def test_parser_errors_name_the_failing_nodes(manifest, root, policy):
    trt = fake_trt_for(manifest)
    trt.parse_errors["length_regulator"] = [
        FakeParserError("UNSUPPORTED_NODE", "Floor on INT64 is not supported", 6, "regulator/floor/Floor", "Floor"),
        FakeParserError("INVALID_GRAPH", "graph input 'ylens' has no shape"),
        FakeParserError("UNSUPPORTED_NODE", "no importer", 12, "", "Mish"),
    ]
    entry = manifest.graph("length_regulator")
    with pytest.raises(BackendError) as err:
        build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt)
    text = str(err.value)
    assert str(entry.path(root)) in text and f"TensorRT {TRT} could not parse the graph" in text
    assert "node 'regulator/floor/Floor' (Floor): UNSUPPORTED_NODE: Floor on INT64 is not supported" in text
    assert "graph: INVALID_GRAPH: graph input 'ylens' has no shape" in text
    assert "node #12 (Mish): UNSUPPORTED_NODE: no importer" in text
    assert not trt.builds


def test_parser_errors_without_tensorrt_10_methods():
    class OldError:                                 # TensorRT 8.x ParserError: no node_name / node_operator
        def code(self):
            return ErrorCode.UNSUPPORTED_NODE

        def desc(self):
            return "unsupported"

        def node(self):
            return 3

    class Parser:
        num_errors = 1

        def get_error(self, i):
            return OldError()

    assert parser_errors(Parser()) == ["node #3: UNSUPPORTED_NODE: unsupported"]


def test_a_failed_build_reports_tensorrts_errors(manifest, root, policy):
    trt = fake_trt_for(manifest)
    trt.build_fails.add("kv_mask")
    entry = manifest.graph("gpt_decode")
    with pytest.raises(BackendError) as err:
        build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt)
    assert "could not build the fp16 engine of graph 'gpt_decode'" in str(err.value)
    assert "Error Code 4: Internal Error (out of memory for tactic)" in str(err.value)


def test_network_inputs_and_profiles_are_checked(manifest, root, policy):
    trt = FakeTrt(lambda path: (["x"], []))
    entry = manifest.graph("length_regulator")
    with pytest.raises(ContractError, match=r"inputs \['x'\] are not the manifest's \['s', 'ylens'\]"):
        build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt)
    trt = fake_trt_for(manifest)
    trt.reject_profiles = True
    with pytest.raises(ContractError, match="TensorRT rejected the optimization profile"):
        build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt)


def test_a_shape_tensor_input_is_refused_before_the_build():
    """An input TensorRT makes a shape tensor (HOST location at run time) would need set_shape_input value
    ranges that no contract declares: refused, naming it (runtime/trt/executor.py refuses such a plan too)."""
    from types import SimpleNamespace

    from engines.builder import check_network_inputs

    entry = SimpleNamespace(name="length_regulator", inputs=[SimpleNamespace(name="s"), SimpleNamespace(name="ylens")])
    network = FakeNetwork(["s", "ylens"], [])
    check_network_inputs(network, entry)                                  # data tensors: fine
    network.inputs[1].is_shape_tensor = True
    with pytest.raises(ContractError, match=r"treats input\(s\) \['ylens'\] as shape tensors .* set_shape_input"):
        check_network_inputs(network, entry)
    profile = FakeProfile()
    profile.set_shape_input("n", [1], [2], [3])
    with pytest.raises(RuntimeError, match="inconsistent"):
        profile.set_shape_input("n", [3], [2], [1])


def test_a_stale_timing_cache_is_replaced(manifest, root, policy, caplog):
    trt = fake_trt_for(manifest)
    entry = manifest.graph("length_regulator")
    with caplog.at_level(logging.WARNING, logger="engines"):
        built = build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt, timing_cache=b"stale")
    assert trt.cache_loads == [b"stale", b""] and built.timing_cache == b"+timed"
    assert "made on another device or TensorRT" in caplog.text


def test_logger_and_progress_monitor_route_to_logging(caplog):
    trt = FakeTrt(None)
    logger = trt_logger(trt)
    assert trt_logger(trt) is logger and logger.base_initialised       # one per module; base __init__ called
    logger.errors.clear()
    with caplog.at_level(logging.DEBUG, logger="tensorrt"):
        logger.log(Severity.WARNING, "weights are subnormal")
        logger.log(Severity.INFO, "memory usage")
        logger.log(Severity.ERROR, "tactic failed")
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "tensorrt"}
    assert levels == {"TensorRT: weights are subnormal": logging.WARNING, "TensorRT: memory usage": logging.DEBUG,
                      "TensorRT: tactic failed": logging.ERROR}
    assert list(logger.errors) == ["tactic failed"]
    monitor = progress_monitor(trt, "[2/5] bigvgan")
    assert monitor.base_initialised and monitor.step_complete("x", 0) is True
    del trt.IProgressMonitor                                               # an older TensorRT 10.x
    assert progress_monitor(trt, "t") is None


# ---------------------------------------------------------------------------------------------------
# The plan cache


def test_plans_are_reused_while_the_key_holds_and_rebuilt_with_the_reason(manifest, root, policy, caplog):
    entry = manifest.graph("length_regulator")
    settings = BuildSettings("fp16", policy)
    trt = fake_trt_for(manifest)
    caplog.set_level(logging.INFO, logger="engines")

    first = ensure_plan(entry, root, settings, trt=trt, gpu=RTX, tag="lr")
    plan, sidecar = plan_paths(root, "length_regulator", "fp16")
    assert first.plan == plan and not first.reused and len(trt.builds) == 1
    record = read_record(sidecar)
    assert record.key == engine_key(entry, "fp16", policy, TRT, RTX)
    assert record.key.graph_form == "fp16-mixed"
    assert record.key.policy_sha256 == policy.sha256() and record.plan_sha256 == sha256_file(plan)
    assert record.fp32_layers == ("length_regulator.block.norm/mean/ReduceMean",   # the graph's fp32 layers
                                  "length_regulator.block.attn/softmax/Cast",
                                  "length_regulator.block.attn/softmax/Softmax",
                                  "length_regulator/add/Add")
    assert record.notes["network"] == "strongly typed" and record.notes["network_flags"] == []   # 11: implicit
    assert record.notes["flags_set"] == [] and record.notes["flags_cleared"] == ["TF32"]
    assert timing_cache_path(root).read_bytes() == b"+timed"
    assert "lr: building engines/length_regulator.fp16.plan: no plan built yet" in caplog.text

    caplog.clear()
    again = ensure_plan(entry, root, settings, trt=trt, gpu=RTX, tag="lr")
    assert again.reused and len(trt.builds) == 1 and "lr: reused engines/length_regulator.fp16.plan" in caplog.text

    def rebuilt(words: str, **kw) -> None:
        caplog.clear()
        n = len(trt.builds)
        out = ensure_plan(kw.pop("entry", entry), root, kw.pop("settings", settings), trt=kw.pop("trt", trt),
                          gpu=kw.pop("gpu", RTX), tag="lr")
        assert not out.reused and len(trt.builds) == n + 1, words
        assert words in caplog.text

    rebuilt("it was built for NVIDIA GeForce RTX 4090 (compute capability 8.9), this GPU is NVIDIA A100", gpu=A100)
    rebuilt("it was built for NVIDIA A100-SXM4-80GB (compute capability 8.0), this GPU is NVIDIA GeForce RTX 4090")
    older = fake_trt_for(manifest, version="10.16.1.11")
    older.builds = trt.builds
    rebuilt(f"it was built with TensorRT {TRT}, this is TensorRT 10.16.1.11", trt=older)
    rebuilt(f"it was built with TensorRT 10.16.1.11, this is TensorRT {TRT}")

    onnx_file = entry.path(root)
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\n")                 # "re-exported"
    changed = dataclasses.replace(entry, sha256=sha256_file(onnx_file))
    rebuilt("it was built from another ONNX file (re-exported since)", entry=changed)
    empty = BuildSettings("fp16", PrecisionPolicy({}, source="empty"))
    rebuilt("it was built with another precision policy", entry=changed, settings=empty)

    plan.write_bytes(plan.read_bytes() + b"x")
    rebuilt("does not match its recorded sha256", entry=changed, settings=empty)
    sidecar.unlink()
    rebuilt("the plan has no record length_regulator.fp16.json", entry=changed, settings=empty)


def test_a_policy_change_does_not_rebuild_fp32_plans(manifest, root, policy):
    entry = manifest.graph("length_regulator")
    trt = fake_trt_for(manifest, form="fp32")
    ensure_plan(entry, root, BuildSettings("fp32", policy), trt=trt, gpu=RTX)
    out = ensure_plan(entry, root, BuildSettings("fp32", PrecisionPolicy({}, source="other")), trt=trt, gpu=RTX)
    assert out.reused and out.record.key.policy_sha256 == "" and len(trt.builds) == 1


def test_cache_decision_on_an_unreadable_record(manifest, root, policy):
    plan, sidecar = plan_paths(root, "dit_step", "fp16")
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    sidecar.write_text("{}")
    decision = cache_decision(engine_key(manifest.graph("dit_step"), "fp16", policy, "10.13", RTX), plan, sidecar)
    assert not decision.reuse and "unreadable plan record" in decision.reasons[0]


def test_an_onnx_file_changed_behind_the_manifest_is_refused(manifest, root, policy):
    entry = manifest.graph("dit_step")
    entry.path(root).write_bytes(b"not the exported graph")
    with pytest.raises(CheckpointError, match="does not match the manifest's sha256"):
        ensure_plan(entry, root, BuildSettings("fp16", policy), trt=fake_trt_for(manifest), gpu=RTX)


# ---------------------------------------------------------------------------------------------------
# INT8: explicit quantization in the graph


def test_int8_plans_are_built_from_qdq_graphs_without_a_calibrator(manifest, root, policy):
    """INT8 is the graph's (QuantizeLinear/DequantizeLinear): nothing to pass, no flag, no calibrator."""
    trt = fake_trt_for(manifest, form="int8-qdq")
    out = ensure_plan(manifest.graph("gpt_decode"), root, BuildSettings("int8", policy), trt=trt, gpu=RTX)
    ((network, config),) = trt.builds
    assert out.plan.name == "gpt_decode.int8.plan" and out.record.key.graph_form == "int8-qdq"
    assert config.flags == set() and out.record.notes["tensor_types"]["INT8"] == 1
    with pytest.raises(AttributeError, match="removed in TensorRT 11"):
        config.int8_calibrator                                           # not even there (TensorRT 11)


def test_int8_from_a_graph_without_qdq_nodes_is_refused(manifest, root, policy):
    """An int8 form that holds no Q/DQ (here: the fp16 form recorded as the int8 one) is refused by the builder
    (strongly typed: it would silently be an fp16 plan under the int8 name)."""
    entry = manifest.graph("gpt_decode")
    fake = dataclasses.replace(entry.forms["fp16"], kind="int8")
    manifest = dataclasses.replace(manifest, graphs={**manifest.graphs, "gpt_decode": dataclasses.replace(
        entry, forms={**entry.forms, "int8": fake})})
    with pytest.raises(EngineBuildFailures) as err:
        build_all(manifest, root, "int8", graphs=["gpt_decode"], trt=fake_trt_for(manifest, form="fp16-mixed"), gpu=RTX)
    assert "is not in the int8-qdq precision form: it has 0 quantize/dequantize layer(s)" in str(err.value)
    assert "explicit quantization" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# build_all


def test_build_all_goes_on_after_a_failed_graph(manifest, root, caplog):
    trt = fake_trt_for(manifest)
    trt.parse_errors["semantic_codec"] = [FakeParserError("UNSUPPORTED_NODE", "ArgMax select_last_index", 40,
                                                          "node_argmax", "ArgMax")]
    caplog.set_level(logging.INFO, logger="engines")
    graphs = ["length_regulator", "semantic_codec", "campplus"]
    with pytest.raises(EngineBuildFailures) as err:
        build_all(manifest, root, "fp16", graphs=graphs, workspace_gib=1.5, trt=trt, gpu=RTX)
    results = err.value.results
    assert [(o.graph, o.status) for o in results.outcomes] == [
        ("length_regulator", "built"), ("semantic_codec", "failed"), ("campplus", "built")]
    assert results.outcome("semantic_codec").reason.startswith("BackendError: ") and not results.ok
    assert [p.name for p in err.value.built] == ["length_regulator.fp16.plan", "campplus.fp16.plan"]
    assert list(err.value.failed) == ["semantic_codec"]
    assert "node 'node_argmax' (ArgMax): UNSUPPORTED_NODE" in str(err.value)
    assert "[2/3] semantic_codec: engine FAILED" in caplog.text and "[3/3] campplus: built" in caplog.text
    assert all(config.pools[MemoryPoolType.WORKSPACE] == int(1.5 * (1 << 30)) for _, config in trt.builds)

    trt.parse_errors.clear()
    results = build_all(manifest, root, "fp16", graphs=graphs, trt=trt, gpu=RTX)
    assert [p.name for p in results.plans] == [f"{g}.fp16.plan" for g in graphs]
    assert [o.status for o in results.outcomes] == ["reused", "built", "reused"] and results.ok
    assert results.detail == f"TensorRT {TRT} on {RTX.describe()}"
    assert len(trt.builds) == 3                                           # only semantic_codec was built again


def test_build_all_checks_its_arguments(manifest, root):
    trt = fake_trt_for(manifest)
    with pytest.raises(InputError, match="precision 'fp8'"):
        build_all(manifest, root, "fp8", trt=trt, gpu=RTX)
    with pytest.raises(InputError, match=r"graphs \['nope'\] are not in the manifest"):
        build_all(manifest, root, "fp16", graphs=["nope"], trt=trt, gpu=RTX)
    with pytest.raises(InputError, match="precision policy .*missing.json: file not found"):
        build_all(manifest, root, "fp16", policy_path=root / "missing.json", trt=trt, gpu=RTX)
    assert not trt.builds


def test_build_all_needs_tensorrt(manifest, root):
    with pytest.raises(BackendError, match="tensorrt is not installed"):
        build_all(manifest, root, "fp16", graphs=["length_regulator"], gpu=RTX)


# ---------------------------------------------------------------------------------------------------
# export.build


def test_export_build_without_a_gpu_skips_engines(tiny_ckpt, tiny_export, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_export[0], out)
    monkeypatch.setattr(engines, "available", lambda: (False, "no CUDA GPU (cudaErrorNoDevice)"))
    called = []
    monkeypatch.setattr(engines, "build_all", lambda *a, **k: called.append(a))
    code = build_mod.main(["--checkpoints", str(tiny_ckpt), "--out", str(out), "--precision", "fp16", "--no-lint"])
    printed = capsys.readouterr().out
    assert code == 0 and not called
    assert "exported: -" in printed and "engines skipped: no CUDA GPU (cudaErrorNoDevice)" in printed
    assert read_manifest(out).precision == "fp16"
    assert not (out / "engines").exists()


def test_run_engines_reports_typed_outcomes(manifest, root, monkeypatch):
    monkeypatch.setattr(engines, "available", lambda: (True, "TensorRT 10.13.0.35, 1 CUDA device(s)"))
    seen = []

    def fake_build_all(m, out, precision, policy_path=None):
        seen.append((precision, policy_path))
        return EngineResults(precision, tuple(EngineOutcome(g, "built", plan=out / "engines" / f"{g}.{precision}.plan")
                                              for g in m.graphs), "TensorRT 10.13.0.35 on RTX")

    monkeypatch.setattr(engines, "build_all", fake_build_all)
    results = build_mod.run_engines(manifest, root, "fp32")
    assert seen == [("fp32", None)]
    build_mod.run_engines(manifest, root, "fp16", root / "precision_policy.json")
    assert seen[-1] == ("fp16", root / "precision_policy.json")          # the policy reaches the builder
    assert results.ok and [o.graph for o in results.outcomes] == list(manifest.graphs)
    assert results.summary() == f"engines (fp32, TensorRT 10.13.0.35 on RTX): {len(manifest.graphs)} built"

    def failing(m, out, precision, policy_path=None):
        raise EngineBuildFailures(EngineResults(precision, (
            EngineOutcome("campplus", "reused", plan=out / "engines/campplus.fp16.plan"),
            EngineOutcome("bigvgan", "failed", "BackendError: out of memory"))))

    monkeypatch.setattr(engines, "build_all", failing)
    results = build_mod.run_engines(manifest, root, "fp16")
    assert results.failed == {"bigvgan": "BackendError: out of memory"} and not results.ok
    assert results.summary().splitlines() == ["engines (fp16): 1 reused, 1 failed",
                                              "  engine bigvgan failed: BackendError: out of memory"]

    def refusing(m, out, precision, policy_path=None):
        raise BackendError("no usable CUDA GPU (device 0)")

    monkeypatch.setattr(engines, "build_all", refusing)
    results = build_mod.run_engines(manifest, root, "fp16")
    assert results.failed == {g: "BackendError: no usable CUDA GPU (device 0)" for g in manifest.graphs}

    monkeypatch.setattr(engines, "available", lambda: (False, "tensorrt is not installed"))
    results = build_mod.run_engines(manifest, root, "fp16")
    assert {o.status for o in results.outcomes} == {"skipped"} and results.ok and not results.plans
    assert results.summary() == "engines skipped: tensorrt is not installed"


def test_export_build_exit_code_follows_the_typed_engine_outcomes(tiny_ckpt, tiny_export, tmp_path, monkeypatch,
                                                                  capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_export[0], out)
    monkeypatch.setattr(engines, "available", lambda: (True, "TensorRT 10.13.0.35, 1 CUDA device(s)"))

    def one_fails(m, root, precision, policy_path=None):
        raise EngineBuildFailures(EngineResults(precision, tuple(
            EngineOutcome(g, "failed", "BackendError: FAILED-looking text is not what counts") if g == "bigvgan"
            else EngineOutcome(g, "built", plan=root / "engines" / f"{g}.plan") for g in m.graphs)))

    monkeypatch.setattr(engines, "build_all", one_fails)
    args = ["--checkpoints", str(tiny_ckpt), "--out", str(out), "--precision", "fp16", "--no-lint"]
    assert build_mod.main(args) == 1
    assert "engine bigvgan failed: BackendError" in capsys.readouterr().out

    def all_built(m, root, precision, policy_path=None):
        return EngineResults(precision, tuple(EngineOutcome(g, "built", "FAILED in a reason does not fail",
                                                            root / "engines" / f"{g}.plan") for g in m.graphs))

    monkeypatch.setattr(engines, "build_all", all_built)
    assert build_mod.main(args) == 0


def test_engine_outcomes_are_checked():
    plan = Path("engines/x.fp16.plan")
    assert EngineOutcome("x", "built", plan=plan).ok and not EngineOutcome("x", "skipped", "no GPU").ok
    with pytest.raises(ContractError, match="status 'FAILED' is not one of built, reused, failed, skipped"):
        EngineOutcome("x", "FAILED", "why")
    with pytest.raises(ContractError, match="a built engine needs a plan path"):
        EngineOutcome("x", "built")
    with pytest.raises(ContractError, match="a failed engine has no plan path"):
        EngineOutcome("x", "failed", "why", plan)
    with pytest.raises(ContractError, match="a skipped engine needs a reason"):
        EngineOutcome("x", "skipped")
    results = EngineResults.all_failed(["a", "b"], "fp16", "no GPU")
    assert results.failed == {"a": "no GPU", "b": "no GPU"} and results.outcome("b").status == "failed"
    with pytest.raises(KeyError, match="no engine outcome for graph 'c'"):
        results.outcome("c")


def test_a_tensorrt_without_activation_resize_still_builds(manifest, root, policy):
    trt = fake_trt_for(manifest)
    trt.PreviewFeature = enum.Enum("PreviewFeature", "ALIASED_PLUGIN_IO_10_03")    # should a release drop it
    entry = manifest.graph("length_regulator")
    build_plan(entry, entry.path(root), BuildSettings("fp16", policy), trt)
    ((_, config),) = trt.builds
    assert config.preview == {}
