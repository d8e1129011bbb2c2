"""The mixed-precision pass (engines/mixed_precision.py): fp16 graphs with the policy's fp32 islands, explicit
Casts at the borders, the contract's I/O dtypes; and the emulation calibration derives from them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from engines.mixed_precision import (FP16_MAX, MixedPrecisionError, float_io_preserved, fp16_nodes, mixed_precision_model,
                                     node_views, tensor_types, to_mixed_precision)
from engines.precision import PrecisionPolicy


def _policy(rules: list[dict], graph: str = "*") -> PrecisionPolicy:
    return PrecisionPolicy.from_json({"version": 1, "graphs": {graph: [{"dtype": "fp32", **r} for r in rules]}})


def _model(nodes, inputs, outputs, inits=(), opset: int = 18) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 9
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    return tensor_types(onnx.shape_inference.infer_shapes(model, strict_mode=True))


def _mlp(big: bool = False) -> onnx.ModelProto:
    """x -> MatMul(w) -> LayerNorm -> Mul(w) -> y, plus a Shape of the MatMul output cast to float (z)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    if big:
        w[0, 0] = 1e5                                   # beyond fp16: clipped to 65504 in the fp16 copy
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["a"], name="net.fc/linear/MatMul"),
        h.make_node("LayerNormalization", ["a", "g", "b"], ["n"], name="net.norm/layer_norm/LayerNormalization", axis=-1),
        h.make_node("Mul", ["n", "w"], ["y"], name="net/mul/Mul"),
        h.make_node("Shape", ["a"], ["s"], name="net/shape/Shape"),
        h.make_node("Cast", ["s"], ["z"], name="net/cast/Cast", to=TP.FLOAT),
    ]
    inits = [nh.from_array(w, "w"), nh.from_array(np.ones(8, np.float32), "g"), nh.from_array(np.zeros(8, np.float32), "b")]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [8, 8])],
                  [h.make_tensor_value_info("y", TP.FLOAT, [8, 8]), h.make_tensor_value_info("z", TP.FLOAT, [2])], inits)


def test_islands_casts_and_io() -> None:
    model = _mlp(big=True)
    mixed = to_mixed_precision(model, "g", _policy([{"pattern": "*", "ops": ["LayerNormalization"]}]))
    onnx.checker.check_model(mixed.model, full_check=True)
    assert float_io_preserved(model, mixed.model) == []
    assert set(mixed.fp32_nodes) == {"net.norm/layer_norm/LayerNormalization"}
    assert mixed.half == {"net.fc/linear/MatMul", "net/mul/Mul", "net/cast/Cast"}
    types = _types(mixed.model)
    nodes = {n.name: n for n in mixed.model.graph.node}
    mm, ln, mul = nodes["net.fc/linear/MatMul"], nodes["net.norm/layer_norm/LayerNormalization"], nodes["net/mul/Mul"]
    assert types[mm.input[0]] == TP.FLOAT16 and types[mm.input[1]] == TP.FLOAT16 and types["a"] == TP.FLOAT16
    assert all(types[t] == TP.FLOAT for t in ln.input) and types["n"] == TP.FLOAT      # the island reads float32
    assert [types[t] for t in mul.input] == [TP.FLOAT16, TP.FLOAT16]
    assert nodes["net/shape/Shape"].input[0] == "a"                                    # Shape reads fp16 as is
    assert next(a.i for a in nodes["net/cast/Cast"].attribute if a.name == "to") == TP.FLOAT16
    # the graph outputs keep their names and float32: y and z are produced under <name>/fp16 and cast back
    assert mixed.renamed == {"y": "y/fp16", "z": "z/fp16"}
    assert {n.output[0]: n.input[0] for n in mixed.model.graph.node if n.output[0] in ("y", "z")} == mixed.renamed
    # one fp16 copy of the weight, clipped to fp16's range; the float32 graph input is cast once
    w16 = {i.name: nh.to_array(i) for i in mixed.model.graph.initializer}["w/fp16"]
    assert w16.dtype == np.float16 and w16[0, 0] == FP16_MAX
    casts = [n for n in mixed.model.graph.node if n.op_type == "Cast" and n.name.startswith("x/")]
    assert len(casts) == 1
    x = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    y, z = _run(mixed.model, {"x": x})
    assert y.dtype == np.float32 and z.tolist() == [8.0, 8.0]


def test_resize_scales_stay_float32_and_constant_of_shape_gets_an_fp16_value() -> None:
    nodes = [
        h.make_node("Mul", ["x", "two"], ["m"], name="mul"),
        h.make_node("Concat", ["one4", "sc"], ["scales"], name="scales/Concat", axis=0),   # float scales
        h.make_node("Resize", ["m", "", "scales"], ["r"], name="resize", mode="nearest"),
        h.make_node("Shape", ["r"], ["s"], name="shape"),
        h.make_node("ConstantOfShape", ["s"], ["c"], name="fill"),                          # default value: 0.0 float
        h.make_node("Add", ["r", "c"], ["y"], name="add"),
    ]
    inits = [nh.from_array(np.float32([2.0]), "two"), nh.from_array(np.float32([1, 1]), "one4"),
             nh.from_array(np.float32([1, 2]), "sc")]
    model = _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 1, 2, 3])],
                   [h.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    mixed = to_mixed_precision(model, "g", _policy([]))
    onnx.checker.check_model(mixed.model, full_check=True)
    types = _types(mixed.model)
    resize = next(n for n in mixed.model.graph.node if n.op_type == "Resize")
    assert types[resize.input[0]] == TP.FLOAT16 and types[resize.input[2]] == TP.FLOAT
    fill = next(n for n in mixed.model.graph.node if n.op_type == "ConstantOfShape")
    assert types[fill.output[0]] == TP.FLOAT16
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    (y,) = _run(mixed.model, {"x": x})
    np.testing.assert_array_equal(y, np.repeat(2 * x, 2, axis=3))


def test_an_initializer_shared_by_fp16_and_fp32_nodes_keeps_both_forms() -> None:
    model = _mlp()
    mixed = to_mixed_precision(model, "g", _policy([{"pattern": "net/mul/*"}]))
    names = {i.name: i.data_type for i in mixed.model.graph.initializer}
    assert names["w"] == TP.FLOAT and names["w/fp16"] == TP.FLOAT16       # Mul (fp32) and MatMul (fp16) read w
    assert "net/mul/Mul" in mixed.fp32_nodes


def test_all_fp32_is_the_float32_graph() -> None:
    model = _mlp()
    views = node_views(model)
    mixed = mixed_precision_model(model, views, set())
    assert mixed.casts == 0 and mixed.fp16_tensors == set()
    x = np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)
    for a, b in zip(_run(model, {"x": x}), _run(mixed.model, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_control_flow_and_dtype_attribute_ops_are_refused() -> None:
    then = h.make_graph([h.make_node("Identity", ["x"], ["t"])], "then", [], [h.make_tensor_value_info("t", TP.FLOAT, [1])])
    model = _model([h.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=then)],
                   [h.make_tensor_value_info("c", TP.BOOL, []), h.make_tensor_value_info("x", TP.FLOAT, [1])],
                   [h.make_tensor_value_info("y", TP.FLOAT, [1])])
    with pytest.raises(MixedPrecisionError, match="subgraph"):
        node_views(model)
    model = _model([h.make_node("RandomNormalLike", ["x"], ["y"], name="noise")],
                   [h.make_tensor_value_info("x", TP.FLOAT, [1])], [h.make_tensor_value_info("y", TP.FLOAT, [1])])
    views = node_views(model)
    with pytest.raises(MixedPrecisionError, match="noise.*keep them fp32"):
        mixed_precision_model(model, views, fp16_nodes(views, []))


def test_the_emulation_is_derived_from_the_mixed_graph() -> None:
    """calibration's emulated model = the mixed graph with fp16 storage emulated by Cast pairs: its outputs
    equal float32 compute on fp16-rounded inputs with fp16-rounded results, node by node."""
    from calibration.fp16_emulation import emulated_model, session

    model = _mlp()
    views = node_views(model)
    fp32 = {"net.norm/layer_norm/LayerNormalization"}
    emu = emulated_model(model, views, fp16_nodes(views, fp32))
    x = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32) * 3
    y, z = session(emu).run(None, {"x": x})
    def r(v: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):                      # w[0, 0] = 65504 overflows some products: inf
            return v.astype(np.float16).astype(np.float32)

    w = nh.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    w16 = r(np.clip(w, -FP16_MAX, FP16_MAX))
    a = r(r(x) @ w16)
    with np.errstate(invalid="ignore"):
        mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
        n = (a - mu) / np.sqrt(var + 1e-5)                    # the fp32 island, on the rounded input
    expected = r(r(n) * w16)
    np.testing.assert_array_equal(y, r(y))                    # fp16 values: the rounding happened
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-3)     # within one fp16 step (4.9e-4 relative)
    assert np.mean(y == expected) > 0.9                      # and mostly bit-equal (fp32 summation order aside)
    assert z.tolist() == [8.0, 8.0]


# ---- the fp16 forms an export ships ----------------------------------------------------------------


def test_the_tiny_export_ships_the_passes_fp16_forms(tiny_export) -> None:
    """export.build --precision fp16 writes, per graph, exactly the pass's output (what calibration's emulation
    is derived from), with the contract's I/O, recorded in the manifest with its float32 source and policy."""
    from engines.mixed_precision import precision_summary
    from engines.precision import default_policy
    from runtime.manifest import read_manifest

    out, _ = tiny_export
    manifest = read_manifest(out, check_hashes=True)
    policy = default_policy()
    for name, entry in manifest.graphs.items():
        form = entry.forms["fp16"]
        assert form.file == f"onnx/fp16/{name}.onnx"
        assert form.made_from == entry.sha256 and form.policy_sha256 == policy.sha256()
        fp32 = onnx.load(str(entry.path(out)))
        shipped = onnx.load(str(out / form.file))
        assert float_io_preserved(fp32, shipped) == [], name
        made = to_mixed_precision(fp32, name, policy)
        assert shipped == made.model, name
        assert dict(form.counts) == dict(precision_summary(made)) and made.fp16_count > 0
        view = entry.form("fp16")
        assert (view.file, view.sha256, view.inputs) == (form.file, form.sha256, entry.inputs)


def test_the_runtime_runs_the_fp16_forms_on_the_cpu(tiny_export, tiny_ckpt) -> None:
    """ort-cpu runs the float32 graphs unless a precision is asked for; with --engine-precision fp16 it runs
    the fp16 forms end to end (the graphs ONNX Runtime CUDA and TensorRT compute)."""
    from runtime.executors import graph_form
    from runtime.gpt.generate import GenerationConfig
    from runtime.request import DecoderSettings, SynthesisRequest
    from runtime.synthesizer import Synthesizer

    out, _ = tiny_export
    request = SynthesisRequest(text="Hello world.", speaker=tiny_ckpt / "examples/speaker.wav")
    fast = (GenerationConfig(max_mel_tokens=16), DecoderSettings(steps=3))
    with Synthesizer(out, "ort-cpu", engine_precision="fp16") as half, Synthesizer(out, "ort-cpu") as full:
        assert graph_form(half.manifest, "dit_step", "ort-cpu", "fp16") == "fp16"
        assert graph_form(full.manifest, "dit_step", "ort-cpu") == "fp32"
        assert graph_form(full.manifest, "dit_step", "ort-cuda") == "fp16"           # the export's precision
        a = half.synthesize(request, *fast, seed=0)
        b = full.synthesize(request, *fast, seed=0)
    assert a.pcm.size > 0 and np.abs(a.pcm).max() > 0 and b.pcm.size > 0


# ---- Q/DQ (an INT8 form's explicit quantization) -------------------------------------------------


def _qdq(opset: int = 19) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul(DQ(Q(w)), per-channel axis 1) -> Relu -> y; the activation's DQ is also read by a
    Shape (size only); and x feeds an island Mul through its own Q/DQ pair (an fp32 reader)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    zero = nh.from_array(np.zeros((), np.int8), "zp")
    nodes = [
        h.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq"], name="x_Q"),
        h.make_node("DequantizeLinear", ["xq", "sx", "zp"], ["xd"], name="x_DQ"),
        h.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], name="w_Q", axis=1),
        h.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="w_DQ", axis=1),
        h.make_node("MatMul", ["xd", "wd"], ["a"], name="net.fc/linear/MatMul"),
        h.make_node("Relu", ["a"], ["y"], name="net/relu/Relu"),
        h.make_node("Shape", ["xd"], ["s"], name="net/shape/Shape"),
        h.make_node("QuantizeLinear", ["x", "sx2", "zp"], ["xq2"], name="x_Q_2"),
        h.make_node("DequantizeLinear", ["xq2", "sx2", "zp"], ["xd2"], name="x_DQ_2"),
        h.make_node("Mul", ["xd2", "xd2"], ["z"], name="net.island/mul/Mul"),
    ]
    inits = [nh.from_array(w, "w"), nh.from_array(np.float32(0.05), "sx"), nh.from_array(np.float32(0.05), "sx2"),
             nh.from_array((np.abs(w).max(0) / 127).astype(np.float32), "sw"),
             nh.from_array(np.zeros(4, np.int8), "zw"), zero]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [2, 8])],
                  [h.make_tensor_value_info("y", TP.FLOAT, [2, 4]), h.make_tensor_value_info("z", TP.FLOAT, [2, 8]),
                   h.make_tensor_value_info("s", TP.INT64, [2])], inits, opset=opset)


def test_qdq_pairs_take_the_precision_of_the_node_they_feed() -> None:
    model = _qdq()
    # a rule matching the Q/DQ names is not applied to them: their precision follows their readers
    policy = _policy([{"pattern": "net.island/*"}, {"pattern": "x_*"}])
    mixed = to_mixed_precision(model, "g", policy)
    onnx.checker.check_model(mixed.model, full_check=True)
    assert float_io_preserved(model, mixed.model) == []
    assert set(mixed.fp32_nodes) == {"net.island/mul/Mul"}
    assert {"x_Q", "x_DQ", "w_Q", "w_DQ", "net.fc/linear/MatMul"} <= mixed.half        # Shape does not count
    assert not {"x_Q_2", "x_DQ_2"} & mixed.half                                       # they feed the island
    types = _types(mixed.model)
    nodes = {n.name: n for n in mixed.model.graph.node}
    mm = nodes["net.fc/linear/MatMul"]
    assert list(mm.input) == ["xd", "wd"] and types["xd"] == types["wd"] == TP.FLOAT16   # no Cast after a DQ
    assert nodes["x_Q"].input[1] == nodes["x_DQ"].input[1] == "sx/fp16"                 # one fp16 scale per pair
    assert types["sx/fp16"] == types["sw/fp16"] == TP.FLOAT16 and types[nodes["x_Q"].input[0]] == TP.FLOAT16
    assert nodes["w_Q"].input[0] == "w/fp16" and types["zw"] == types["zp"] == TP.INT8
    assert [types[t] for t in nodes["x_Q_2"].input[:2]] == [TP.FLOAT, TP.FLOAT] and types["xd2"] == TP.FLOAT
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    y, z, s = _run(mixed.model, {"x": x})
    y32, z32, _ = _run(model, {"x": x})
    np.testing.assert_allclose(y, y32, rtol=2e-2, atol=2e-2)
    assert s.tolist() == [2, 8] and np.array_equal(z, z32)                              # the island is float32


def test_fp16_qdq_needs_opset_19() -> None:
    model = _qdq(opset=18)
    with pytest.raises(MixedPrecisionError, match="needs opset 19.*opset 18"):
        to_mixed_precision(model, "g", _policy([]))
    # all fp32: nothing to convert, any opset
    views = node_views(model)
    assert mixed_precision_model(model, views, set()).casts == 0


def test_the_emulation_of_a_qdq_form_is_fake_quantization_in_fp16() -> None:
    """calibration's emulation of an INT8 form: Q/DQ as ONNX defines them on fp16-rounded inputs with fp16
    scales, every fp16 result rounded."""
    from calibration.fp16_emulation import emulate_form, session

    model = _qdq()
    mixed = to_mixed_precision(model, "g", _policy([{"pattern": "net.island/*"}]))
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32) * 2
    y, z, _ = session(emulate_form(mixed.model)).run(None, {"x": x})

    def r(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float16).astype(np.float32)

    inits = {i.name: nh.to_array(i) for i in model.graph.initializer}
    sx, sw = r(inits["sx"]), r(inits["sw"])
    xd = r(np.clip(np.round(r(x) / sx), -128, 127) * sx)
    wd = r(np.clip(np.round(r(inits["w"]) / sw), -128, 127) * sw)
    expected = r(np.maximum(r(xd @ wd), 0))
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-3)
    xd2 = np.clip(np.round(x / inits["sx2"]), -128, 127) * inits["sx2"]            # the island's pair: fp32
    np.testing.assert_allclose(z, xd2 * xd2, rtol=1e-6)
