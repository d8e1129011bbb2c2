"""calibration/: feed collection and storage, the FP16 emulation and analysis, the policy it writes and the
engine builder consuming it (TensorRT's network API behind the fakes of test_engines), the end-to-end
effect, INT8 forms (Q/DQ) and their gate on the CPU, and the CLI — on the tiny demo export and on hand-made graphs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.collect import CollectSettings, collect, keep_rule
from calibration.corpus import CalibrationText, read_texts, write_default_voices
from calibration.effect import ForcedSteps, snr_db
from calibration.feeds import FeedStore, TensorStats
from calibration.fp16_analysis import AnalysisLimits, analyze_graph, escape_pattern
from calibration.fp16_emulation import (FP16_MAX, emulated_model, fp16_nodes, fp16_weight, node_views,
                                        policy_fp32, session)
from calibration.gate import decide, evaluate
from calibration.policy_writer import calibrated_policy, write_policy
from engines.precision import PrecisionPolicy, default_policy, load_policy
from runtime.errors import InputError
from runtime.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_calib(tiny_ckpt, tiny_export, tmp_path_factory):
    """A small calibration run on the tiny demo: two texts (EN, ZH) x two voices, eager backend."""
    out = tmp_path_factory.mktemp("calib")
    refs = write_default_voices(out / "references")[:2]
    texts = [CalibrationText("en", "The quick brown fox jumps over the lazy dog."),
             CalibrationText("zh", "今天天气很好，我们一起去公园散步吧。")]
    summary = collect(tiny_export[0], out, texts, refs, CollectSettings(gpt_tokens=12, euler_steps=4),
                      checkpoints=tiny_ckpt)
    return out, summary


def _graph(nodes, inputs, outputs, inits=(), name="g"):
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _store_with(tmp_path: Path, graph: str, feeds: list[dict]) -> FeedStore:
    store = FeedStore(tmp_path / "calib")
    for i, feed in enumerate(feeds):
        store.add(graph, feed, item=i, segment=0, call=0)
    store.save()
    return FeedStore.open(store.root)


# ---------------------------------------------------------------------------------------------------
# Feeds and corpus


def test_feed_store_keeps_feeds_and_exact_statistics(tmp_path):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, n)).astype(np.float32), "ids": np.arange(n, dtype=np.int64)[None]}
             for n in (5, 9, 7, 4)]
    feeds[2]["x"][0, 0, 0] = np.inf
    store = _store_with(tmp_path, "g", feeds)
    assert [r.shapes["x"] for r in store.records("g")] == [[1, 3, 5], [1, 3, 9], [1, 3, 7], [1, 3, 4]]
    for got, want in zip(store.feeds("g"), feeds):
        np.testing.assert_array_equal(got["x"], want["x"])
    x = np.concatenate([f["x"].reshape(-1) for f in feeds])
    finite = x[np.isfinite(x)]
    s = store.graphs["g"].stats["x"]
    assert s.nonfinite == 1 and s.count == finite.size and s.calls == 4
    assert s.dims == [[1, 1], [3, 3], [4, 9]]
    assert s.min == finite.min() and s.max == finite.max() and s.absmax == np.abs(finite).max()
    assert s.mean == pytest.approx(finite.astype(np.float64).mean()) and s.std == pytest.approx(finite.std())
    assert TensorStats.from_json(s.to_json()).std == pytest.approx(s.std)
    # a limited pick spans the set: first and last included
    assert [r.file for r in store.records("g", 2)] == [store.records("g")[0].file, store.records("g")[-1].file]


def test_feed_store_refuses_what_is_not_a_calibration_directory(tmp_path):
    with pytest.raises(InputError, match="not a calibration directory"):
        FeedStore.open(tmp_path)
    (tmp_path / "calibration.json").write_text('{"version": 99}')
    with pytest.raises(InputError, match="format 99"):
        FeedStore.open(tmp_path)


def test_texts_file_languages_and_errors(tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("# comment\nen: Hello there.\n你好，世界。\n\nzh:  再见\nPlain English.\n", encoding="utf-8")
    assert read_texts(f) == [CalibrationText("en", "Hello there."), CalibrationText("zh", "你好，世界。"),
                             CalibrationText("zh", "再见"), CalibrationText("en", "Plain English.")]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(InputError, match="no text"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="not found"):
        read_texts(tmp_path / "missing.txt")


def test_keep_rule_per_graph():
    s = CollectSettings(decode_calls=(0, 5))
    assert [i for i in range(10) if keep_rule("gpt_decode", s, 25)(i)] == [0, 5]
    assert [i for i in range(25) if keep_rule("dit_step", s, 25)(i)] == [0, 12, 24]
    assert all(keep_rule("bigvgan", s, 25)(i) for i in range(3))


def test_collection_on_the_tiny_demo_covers_every_graph(tiny_calib, tiny_export):
    out, summary = tiny_calib
    store = FeedStore.open(out)
    manifest = read_manifest(tiny_export[0])
    assert set(store.graphs) == set(manifest.graphs)
    assert summary.items == 4 and len(store.items) == 4
    assert {i["lang"] for i in store.items} == {"en", "zh"} and len({i["reference"] for i in store.items}) == 2
    assert len(store.records("dit_step")) == 3 * summary.segments           # first / middle / last step
    assert all(r.call in (0, 2, 3) for r in store.records("dit_step"))
    assert all(r.call in CollectSettings().decode_calls for r in store.records("gpt_decode"))
    for g, gf in store.graphs.items():              # every feed satisfies the graph's contract
        entry = manifest.graph(g)
        assert set(gf.stats) == {t.name for t in entry.inputs}
        from runtime.executors.base import check_feed
        check_feed(entry, store.load(gf.feeds[0]))
    assert store.meta["backend"] == "torch" and store.meta["dims"]["layers"] == manifest.dims.layers


# ---------------------------------------------------------------------------------------------------
# FP16 emulation


def test_emulation_rounds_every_fp16_layer_like_numpy():
    """y = tanh(x @ W + b) * 3 with every layer in fp16: each input and output rounded, weights clipped."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 5)) * 0.7).astype(np.float32)
    w[0, 0] = 1e5                                                   # beyond fp16: TensorRT clips weights
    b = rng.standard_normal(5).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="net.fc/linear/MatMul"),
             helper.make_node("Add", ["m", "b"], ["a"], name="net.fc/linear/Add"),
             helper.make_node("Tanh", ["a"], ["t"], name="net/tanh/Tanh"),
             helper.make_node("Mul", ["t", "three"], ["y"], name="net/mul/Mul")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.float32(3.0), "three")]
    model = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    views = node_views(model)
    x = (rng.standard_normal((2, 6)) * 1e-3).astype(np.float32)
    x[1, 0] = 0.0

    def r(v):
        return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)

    def numpy_emulation(fp32: set[str]):
        m = np.matmul(r(x), fp16_weight(w)) if "net.fc/linear/MatMul" not in fp32 else x @ w
        m = r(m) if "net.fc/linear/MatMul" not in fp32 else m
        a = r(r(m) + r(b)) if "net.fc/linear/Add" not in fp32 else m + b
        t = r(np.tanh(r(a))) if "net/tanh/Tanh" not in fp32 else np.tanh(a)
        return r(r(t) * 3.0) if "net/mul/Mul" not in fp32 else t * np.float32(3.0)

    for fp32 in (set(), {"net/tanh/Tanh"}, {"net.fc/linear/MatMul", "net.fc/linear/Add"}):
        emu = emulated_model(model, views, fp16_nodes(views, fp32))
        got = session(emu).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, numpy_emulation(fp32), rtol=1e-6, atol=1e-7)
    assert fp16_weight(np.float32([1e5, -7e4, 1e-9]))[:2].tolist() == [FP16_MAX, -FP16_MAX]


def _overflow_graph() -> onnx.ModelProto:
    """An injected overflow: a layer whose activations reach ~2e5, scaled back down right after."""
    rng = np.random.default_rng(2)
    w_big = np.clip(rng.standard_normal((8, 8)) * 1e4, -6e4, 6e4).astype(np.float32)     # fp16 holds these
    w_out = (rng.standard_normal((8, 4)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_big"], ["h"], name="net.big/linear/MatMul"),
             helper.make_node("Mul", ["h", "tiny"], ["s"], name="net/mul/Mul"),
             helper.make_node("Tanh", ["s"], ["t"], name="net.act/tanh/Tanh"),
             helper.make_node("MatMul", ["t", "w_out"], ["y"], name="net.out/linear/MatMul")]
    inits = [numpy_helper.from_array(w_big, "w_big"), numpy_helper.from_array(w_out, "w_out"),
             numpy_helper.from_array(np.float32(1e-5), "tiny")]
    return _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits, name="overflow")


def test_an_injected_overflow_is_caught_and_forced_to_fp32(tmp_path):
    model = _overflow_graph()
    path = tmp_path / "overflow.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(3)
    store = _store_with(tmp_path, "overflow", [{"x": 3 * rng.standard_normal((3, 8)).astype(np.float32)}
                                               for _ in range(3)])
    analysis = analyze_graph("overflow", path, store, None, AnalysisLimits(max_feeds=3))
    first = analysis.rounds[0]
    assert first.label == "all fp16" and first.outputs[0].rel_err > 0.1             # fp16 alone breaks it
    assert max(s.emu_nonfinite for s in first.layers) > 0                            # inf inside (tanh hides it)
    assert any(s.first_nonfinite and s.node == "net.big/linear/MatMul" for s in first.layers)
    assert analysis.measured["net.big/linear/MatMul"].kind in ("non-finite", "overflow")
    # the scale-down layer reads the fp32 overflow: converting its input to fp16 would overflow again
    assert analysis.measured["net/mul/Mul"].kind in ("non-finite", "overflow")
    assert "net.act/tanh/Tanh" not in analysis.measured and "net.out/linear/MatMul" not in analysis.measured
    final = analysis.final
    assert final.outputs[0].nonfinite == 0 and final.outputs[0].rel_err < 5e-3 and not final.flags
    # the written policy forces exactly those layers, in the emulation and in the shipped fp16 graph
    policy = calibrated_policy(None, [analysis])
    policy = PrecisionPolicy.from_file(write_policy(policy, tmp_path))
    views = node_views(model)
    assert set(policy_fp32("overflow", views, policy)) == {"net.big/linear/MatMul", "net/mul/Mul"}
    from engines.mixed_precision import to_mixed_precision

    mixed = to_mixed_precision(model, "overflow", policy)
    assert list(mixed.fp32_nodes) == ["net.big/linear/MatMul", "net/mul/Mul"]
    assert all(why.startswith("calibration (") for why in mixed.fp32_nodes.values())


def test_constant_guards_that_fp16_flushes_are_flagged(tmp_path):
    """x / (|x| + 1e-9)-style guard: 1e-9 is zero in fp16, so x = 0 gives 0/0 = NaN."""
    nodes = [helper.make_node("Abs", ["x"], ["a"], name="net.norm/abs/Abs"),
             helper.make_node("Add", ["a", "eps"], ["d"], name="net.norm/add/Add"),
             helper.make_node("Div", ["x", "d"], ["y"], name="net.norm/div/Div")]
    model = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                   [numpy_helper.from_array(np.float32(1e-9), "eps")], name="guard")
    path = tmp_path / "guard.onnx"
    onnx.save(model, path)
    store = _store_with(tmp_path, "guard", [{"x": np.float32([0.0, 1.0, -2.0, 0.5])}])
    analysis = analyze_graph("guard", path, store, None, AnalysisLimits())
    assert analysis.rounds[0].outputs[0].nonfinite == 1
    assert analysis.measured["net.norm/add/Add"].kind == "constant"
    assert analysis.final.outputs[0].nonfinite == 0


def test_analysis_without_a_base_policy_rediscovers_the_length_regulators_index_arithmetic(tiny_calib, tiny_export):
    """With no islands at all, the measured rules find the float index computation (frames gathered by
    floor(dst * T_in / T_out)) that the shipped policy pins by reading the model."""
    export, _ = tiny_export
    manifest = read_manifest(export)
    store = FeedStore.open(tiny_calib[0])
    entry = manifest.graph("length_regulator")
    analysis = analyze_graph("length_regulator", entry.path(export), store, None, AnalysisLimits(max_feeds=4))
    first, final = analysis.rounds[0], analysis.final
    assert first.outputs[0].rel_err > 0.05, "fp16 index arithmetic should move frames in the all-fp16 round"
    kinds = {f.kind for f in analysis.measured.values()}
    assert "index" in kinds
    assert final.outputs[0].rel_err < 1e-2 and not final.flags
    views = node_views(onnx.load(str(entry.path(export))))
    default_fp32 = set(policy_fp32("length_regulator", views, default_policy()))
    index_layers = {n for n, f in analysis.measured.items() if f.kind == "index"}
    assert index_layers <= default_fp32, "the measured index layers are among the shipped policy's islands"


def test_measured_rules_are_exact_node_names():
    assert escape_pattern("a.b/mul_9/Mul") == "a.b/mul_9/Mul"
    assert escape_pattern("x[0]*?") == "x[[]0][*][?]"
    from engines.precision import LayerInfo
    rule_pattern = escape_pattern("net/mul_9/Mul")
    from engines.precision import PolicyRule
    rule = PolicyRule(rule_pattern)
    assert rule.matches(LayerInfo("net/mul_9/Mul", "ELEMENTWISE", ("FLOAT",)))
    assert not rule.matches(LayerInfo("net/mul_90/Mul", "ELEMENTWISE", ("FLOAT",)))
    # an extra layer the parser makes for that node is matched through its metadata
    assert rule.matches(LayerInfo("(Unnamed Layer* 3) [Shuffle]", "SHUFFLE", ("FLOAT",),
                                  "[ONNX Layer: net/mul_9/Mul]"))


# ---------------------------------------------------------------------------------------------------
# The policy file through the engine builder (TensorRT network API behind the fakes)


def test_the_calibrated_policy_is_what_the_fp16_graph_keeps_in_fp32(tiny_calib, tiny_export, tmp_path):
    """The policy file a calibration writes, applied by the mixed-precision pass that makes the shipped fp16
    graphs (export.build --precision fp16 --precision-policy FILE), keeps exactly the measured nodes in fp32."""
    from engines.mixed_precision import to_mixed_precision, tensor_types

    export, _ = tiny_export
    manifest = read_manifest(export)
    store = FeedStore.open(tiny_calib[0])
    entry = manifest.graph("length_regulator")
    analysis = analyze_graph("length_regulator", entry.path(export), store, None, AnalysisLimits(max_feeds=3))
    policy_file = write_policy(calibrated_policy(None, [analysis]), tmp_path)
    mixed = to_mixed_precision(onnx.load(str(entry.path(export))), "length_regulator", load_policy(policy_file))
    assert set(mixed.fp32_nodes) == set(analysis.measured)
    types = tensor_types(onnx.shape_inference.infer_shapes(mixed.model))
    for node in mixed.model.graph.node:
        if node.name in analysis.measured:
            assert all(types.get(o) != onnx.TensorProto.FLOAT16 for o in node.output), node.name


# ---------------------------------------------------------------------------------------------------
# End-to-end effect


def test_snr():
    x = np.sin(np.arange(1000) / 7.0)
    assert snr_db(x, x) == float("inf")
    assert snr_db(x, x * 1.01) == pytest.approx(40.0, abs=1e-6)
    assert snr_db(x, np.full_like(x, np.nan)) == float("-inf")


def test_forced_steps_follow_the_reference_and_record_greedy_choices():
    geom = SimpleNamespace(stop_mel_token=7, start_mel_token=6, vocab_size=8)
    logits = [np.float32([[0, 9, 1, 5, 0, 0, 0, 0]]), np.float32([[0, 0, 50, 4, 0, 0, 0, 0]]),
              np.float32([[0, 0, 0, 0, 0, 0, 0, 9]])]
    calls = iter(logits)
    inner = SimpleNamespace(geometry=geom, prefill=lambda f: {"logits": next(calls).copy()},
                            decode=lambda f: {"logits": next(calls).copy()})
    steps = ForcedSteps(inner, repetition_penalty=10.0)
    steps.start([2, 2], stopped=True)
    outs = [steps.prefill({}), steps.decode({}), steps.decode({})]
    assert [int(np.argmax(o["logits"])) for o in outs] == [2, 2, 7]        # the loop follows the reference
    # greedy after the repetition penalty (seen: the fake prompt id 1, start 6, then the forced codes):
    # 9 on id 1 -> 0.9, so 3 wins; then 2 is seen: 50 -> 5 still beats 4; then the stop token
    assert steps.choices == [3, 2, 7] and steps.agreement() == (2, 3)


# ---------------------------------------------------------------------------------------------------
# INT8: Q/DQ forms, their checks, the gate, the command (CPU only: no TensorRT, real or fake)


INT8_GRAPHS = ("gpt_decode", "dit_step", "bigvgan")     # MatMul + Gemm + Conv, islands; ConvTranspose


@pytest.fixture(scope="module")
def int8_forms(tiny_calib, tiny_export, tmp_path_factory):
    """The INT8 forms of three tiny graphs under the shipped policy, saved: {graph: (Int8Form, path)}."""
    from calibration.int8_qdq import make_int8_form
    from export.precision_forms import save

    export, calib = tiny_export[0], tiny_calib[0]
    manifest, store, out = read_manifest(export), FeedStore.open(calib), tmp_path_factory.mktemp("int8_forms")
    forms = {}
    for g in INT8_GRAPHS:
        form = make_int8_form(manifest.graph(g).path(export), g, store, default_policy())
        save(form.mixed.model, out / f"{g}.onnx")
        forms[g] = (form, out / f"{g}.onnx")
    return forms


def _by_output(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_int8_forms_have_what_tensorrt_needs(int8_forms, tiny_export, tiny_calib):
    """Symmetric INT8 Q/DQ (zero points 0), per-channel weight scales on each weight's output-channel axis
    (Conv 0, ConvTranspose 1, MatMul 1 of [K, N], Gemm by transB), per-tensor activations, fp16 scales and
    DQ outputs at opset 19, the policy's islands untouched, graph I/O unchanged, checker and ONNX Runtime OK."""
    from calibration.int8_qdq import output_channel_axis, quantizable_nodes

    export = tiny_export[0]
    manifest, store = read_manifest(export), FeedStore.open(tiny_calib[0])
    seen_ops = set()
    for g, (form, path) in int8_forms.items():
        model = form.mixed.model
        original = onnx.load(str(manifest.graph(g).path(export)))
        onnx.checker.check_model(str(path), full_check=True)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]
        assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == \
               [(i.name, i.type.tensor_type.elem_type) for i in original.graph.input]
        assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
        chosen, islands = quantizable_nodes(original, g, default_policy())
        assert islands and sorted(form.quantized) == sorted(chosen) and len(chosen) > 0, g
        inits = {i.name: i for i in model.graph.initializer}
        types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        producer = _by_output(model)
        for node in model.graph.node:
            if node.name in islands:                                   # an island reads no quantized value
                assert all(producer.get(t) is None or producer[t].op_type != "DequantizeLinear" for t in node.input)
            if node.name not in form.quantized:
                continue
            seen_ops.add(node.op_type)
            x_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
            assert x_dq.op_type == w_dq.op_type == "DequantizeLinear" and types[x_dq.output[0]] == TensorProto.FLOAT16
            x_q, w_q = producer[x_dq.input[0]], producer[w_dq.input[0]]
            for q, dq in ((x_q, x_dq), (w_q, w_dq)):
                assert q.input[1] == dq.input[1] and inits[q.input[1]].data_type == TensorProto.FLOAT16
                zero = inits[q.input[2]]
                assert zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any()
                assert (numpy_helper.to_array(inits[q.input[1]]) > 0).all()
            assert numpy_helper.to_array(inits[x_q.input[1]]).size == 1           # activations: per tensor
            w = inits[w_q.input[0]]                                                   # weights stay float (fp16)
            axis = next(a.i for a in w_q.attribute if a.name == "axis") % len(w.dims)
            want = output_channel_axis(node, list(w.dims))
            assert axis == want and numpy_helper.to_array(inits[w_q.input[1]]).size == w.dims[want], node.name
            assert w.data_type == TensorProto.FLOAT16
        assert form.counts["quantized_nodes"] == len(form.quantized)
        assert form.counts["quantize_linear"] == form.counts["dequantize_linear"] >= len(form.quantized)
        sess = session(path)
        feed = next(store.feeds(g))
        outs = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
        assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
    assert seen_ops == {"MatMul", "Gemm", "Conv", "ConvTranspose"}


def test_form_checks_name_what_tensorrt_would_refuse(int8_forms):
    from calibration.int8_qdq import form_problems

    form, _ = int8_forms["gpt_decode"]
    model = onnx.ModelProto()
    model.CopyFrom(form.mixed.model)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert form_problems(original, model, form.quantized, form.islands) == []
    inits = {i.name: i for i in model.graph.initializer}
    w_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits)
    x_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    next(a for a in w_q.attribute if a.name == "axis").i = 0                  # per-channel on the wrong axis
    zero = inits[x_q.input[2]]
    zero.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zero.name))   # asymmetric
    island = next(n for n in model.graph.node if n.name in form.islands and n.input)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    island.input[0] = dq.output[0]                                             # an island reading INT8 values
    problems = "\n".join(form_problems(original, model, form.quantized, form.islands))
    assert "weight scales must be one per output channel" in problems
    assert "zero point must be an INT8 zero" in problems
    assert f"{island.name}: an fp32 island of the precision policy reads a DequantizeLinear output" in problems


def test_only_the_quantized_nodes_read_quantized_values():
    """ONNX Runtime's quantizer points every reader of a quantized tensor (and a graph output) at the
    DequantizeLinear; restore_float_readers gives the others, and the graph output, the float tensor back."""
    from calibration.int8_qdq import restore_float_readers

    s = numpy_helper.from_array(np.float32(0.1), "s")
    z = numpy_helper.from_array(np.int8(0), "z")
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("Relu", ["x"], ["h_QuantizeLinear_Input"], name="relu"),       # h: a graph output
             helper.make_node("QuantizeLinear", ["h_QuantizeLinear_Input", "s", "z"], ["hq"], name="h_Q"),
             helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["h"], name="h_DQ"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
             helper.make_node("ReduceMean", ["h"], ["m"], name="mean", axes=[-1], keepdims=1)]
    model = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "y", "m")], [s, z, w])
    assert restore_float_readers(model, {"mm"}) == 0         # the island's input moved with the renaming
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["relu"].output[0] == "h" and by_name["h_Q"].input[0] == "h"
    assert by_name["h_DQ"].output[0] == "h/dequantized" and by_name["mm"].input[0] == "h/dequantized"
    assert by_name["mean"].input[0] == "h"
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    h, _, m = session(model).run(None, {"x": x})
    np.testing.assert_array_equal(h, np.maximum(x, 0))
    np.testing.assert_allclose(m, np.maximum(x, 0).mean(-1, keepdims=True), rtol=1e-6)


def decide_from(agreement: float, mel: float, wav: float):
    from calibration.effect import EffectSummary, ItemEffect

    item = ItemEffect("t", "en", "r", tokens=100, forced_agree=round(agreement * 100), mel_snr_db=mel, wav_snr_db=wav)
    return decide(EffectSummary("x", [item]))


def test_gate_decisions_against_the_limits():
    assert decide_from(0.99, 30.0, 20.0).accepted
    d = decide_from(0.26, 30.0, 20.0)
    assert not d.accepted and d.reasons == ["greedy-token agreement 0.260 < 0.98"]
    d = decide_from(1.0, 12.0, 5.0)
    assert d.reasons == ["mel SNR 12.0 dB < 25.0 dB", "waveform SNR 5.0 dB < 15.0 dB"]
    assert d.metrics["items"] == 1 and d.metrics["tokens"] == 100


def test_gate_judges_each_graph_alone(tiny_calib, tiny_export):
    """A graph whose INT8 executor is far off is refused; an exact one is accepted."""
    from runtime.executors import GraphSet, OrtOptions
    from runtime.synthesizer import Synthesizer

    export, _ = tiny_export
    manifest = read_manifest(export)
    graphs = GraphSet(manifest, export, "ort-cpu", OrtOptions(intra_op_threads=1))
    ref = Synthesizer(export, executors=graphs)

    class Noisy:
        def __init__(self, inner):
            self.inner, self.name, self.backend, self.entry = inner, inner.name, inner.backend, inner.entry

        def run(self, feed, outputs=None):
            out = self.inner.run(feed, outputs)
            rng = np.random.default_rng(0)
            return {k: v + 0.3 * np.abs(v).max() * rng.standard_normal(v.shape).astype(v.dtype) for k, v in out.items()}

    def open_test(graph):
        return Synthesizer(export, executors={g: (Noisy(graphs[g]) if g == graph == "bigvgan" else graphs[g])
                                              for g in manifest.graphs})

    store = FeedStore.open(tiny_calib[0])
    decisions = evaluate(ref, open_test, ["bigvgan", "length_regulator"], store.items[:1], 8)
    assert not decisions["bigvgan"].accepted and "waveform SNR" in decisions["bigvgan"].reasons[0]
    assert decisions["length_regulator"].accepted and decisions["length_regulator"].metrics["token_agreement"] == 1.0


def _copies(tiny_export, tiny_calib, tmp_path):
    import shutil

    return (Path(shutil.copytree(tiny_export[0], tmp_path / "out")),
            Path(shutil.copytree(tiny_calib[0], tmp_path / "calib")))


def test_int8_command_records_accepted_forms_and_falls_back_to_fp16(tiny_calib, tiny_export, tmp_path):
    """`python -m calibration int8`'s flow with the gate's judgement injected: accepted graphs get
    onnx/int8/<graph>.onnx in the manifest, a refused graph its fp16 form (with the reasons in the form's
    note and in int8_gate.json), the plans are built from the new manifest; a rerun that refuses a graph
    removes its INT8 file; int8-gate judges the recorded INT8 forms again."""
    from calibration.gate import GATE_NAME
    from calibration.int8_build import Int8Settings, build_int8, regate_int8
    from engines.outcome import EngineOutcome, EngineResults
    from runtime.manifest import sha256_file

    out, calib = _copies(tiny_export, tiny_calib, tmp_path)
    graphs = ("length_regulator", "dit_step", "bigvgan")
    judged, built = [], []

    def judge(engines_dir, calib_dir, emulations, n_items, progress, limits):
        judged.append(sorted(emulations))
        assert (engines_dir, calib_dir, n_items) == (out, calib, 2) and all(p.is_file() for p in emulations.values())
        return {g: decide_from(1.0, 12.0 if g == refuse else 40.0, 30.0) for g in emulations}

    def build(manifest, engines_dir, names):
        built.append({g: manifest.graph(g).form("int8").file for g in names})
        return EngineResults("int8", tuple(EngineOutcome(g, "built", plan=engines_dir / f"{g}.int8.plan") for g in names))

    refuse = "dit_step"
    result = build_int8(out, calib, Int8Settings(items=2, graphs=graphs), judge=judge, build=build)
    assert judged == [sorted(graphs)] and result.accepted == ["length_regulator", "bigvgan"]
    assert result.fallbacks == ["dit_step"] and result.ok
    manifest = read_manifest(out, check_hashes=True)
    for g in ("length_regulator", "bigvgan"):
        form = manifest.graph(g).forms["int8"]
        assert form.file == f"onnx/int8/{g}.onnx" and form.sha256 == sha256_file(out / form.file)
        assert form.counts["quantize_linear"] > 0 and form.made_from == manifest.graph(g).sha256 and form.recipe
    dit = manifest.graph("dit_step")
    assert dit.forms["int8"].file == dit.forms["fp16"].file and dit.forms["int8"].counts["quantized_nodes"] == 0
    assert dit.forms["int8"].graph_form == "fp16-mixed" and dit.form("int8").graph_form == "fp16-mixed"
    assert manifest.graph("bigvgan").forms["int8"].graph_form == ""
    assert "refused by the INT8 gate: mel SNR 12.0 dB < 25.0 dB" in dit.forms["int8"].note
    assert not (out / "onnx" / "int8" / "dit_step.onnx").exists()
    assert built == [{"length_regulator": "onnx/int8/length_regulator.onnx", "dit_step": "onnx/fp16/dit_step.onnx",
                      "bigvgan": "onnx/int8/bigvgan.onnx"}]
    record = json.loads((calib / GATE_NAME).read_text())
    assert "CPU, ONNX Runtime" in record["judged_on"]
    assert {g: d["accepted"] for g, d in record["graphs"].items()} == {"length_regulator": True, "dit_step": False,
                                                                      "bigvgan": True}
    assert record["graphs"]["dit_step"]["counts"]["quantize_linear"] > 0           # what was refused
    assert record["graphs"]["dit_step"]["form"] == "onnx/fp16/dit_step.onnx"

    refuse = "bigvgan"                                   # the next run refuses another graph
    again = build_int8(out, calib, Int8Settings(items=2, graphs=("bigvgan",)), judge=judge, build=build)
    assert again.fallbacks == ["bigvgan"] and not (out / "onnx" / "int8" / "bigvgan.onnx").exists()
    record = json.loads((calib / GATE_NAME).read_text())["graphs"]
    assert {g: d["accepted"] for g, d in record.items()} == {"length_regulator": True, "dit_step": False,
                                                             "bigvgan": False}       # merged per graph

    refuse = "length_regulator"                          # int8-gate: only recorded INT8 forms are judged
    regated = regate_int8(out, calib, Int8Settings(items=2), judge=judge)
    assert judged[-1] == ["length_regulator"] and regated.fallbacks == ["length_regulator"]
    assert read_manifest(out).graph("length_regulator").forms["int8"].file == "onnx/fp16/length_regulator.onnx"


def test_int8_command_without_tensorrt_skips_the_plans_and_checks_its_inputs(tiny_calib, tiny_export, tmp_path):
    from calibration.int8_build import Int8Settings, build_int8

    out, calib = _copies(tiny_export, tiny_calib, tmp_path)
    accept = lambda e, c, emulations, *a: {g: decide_from(1.0, 40.0, 30.0) for g in emulations}  # noqa: E731
    result = build_int8(out, calib, Int8Settings(items=1, graphs=("length_regulator",)), judge=accept)
    assert result.accepted == ["length_regulator"]
    assert [o.status for o in result.engines.outcomes] == ["skipped"] and result.ok
    assert result.engines.summary().startswith("engines skipped: ")
    with pytest.raises(InputError, match="graphs \\['nope'\\] are not in"):
        build_int8(out, calib, Int8Settings(graphs=("nope",)), judge=accept)
    other = write_policy(PrecisionPolicy({}), tmp_path / "p")                         # not the fp16 forms' policy
    with pytest.raises(InputError, match="made with another precision policy"):
        build_int8(out, calib, Int8Settings(graphs=("length_regulator",), policy_path=other), judge=accept)


# ---------------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibration", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1200)


def test_cli_analyze_and_report_on_the_tiny_demo(tiny_calib, tiny_export):
    calib = tiny_calib[0]
    export = tiny_export[0]
    r = _cli("analyze", "--engines", str(export), "--calib", str(calib), "--max-feeds", "2", "--effect-items", "1",
             "--effect-variants", "calibrated", "--threads", "1")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "precision policy ->" in r.stdout and "report ->" in r.stdout
    policy = load_policy(calib / "precision_policy.json")
    assert policy.rules_for("bigvgan")                                   # the base rules are kept
    analysis = json.loads((calib / "analysis.json").read_text())
    assert [a["graph"] for a in analysis["graphs"]] == list(read_manifest(export).graphs)
    effect = json.loads((calib / "effect.json").read_text())["variants"][0]
    assert effect["label"] == "fp16, calibrated policy" and effect["forced_agreement"] >= 0.9
    report = (calib / "REPORT.md").read_text()
    for g in read_manifest(export).graphs:
        assert f"| {g} |" in report
    assert "## End-to-end effect against float32" in report and "## INT8" in report
    assert not (calib / "fp16_emulated_calibrated").exists()             # removed unless --keep-emulated
    # the effect alone, for another variant: merged by label, the calibrated entry kept as it was
    r = _cli("effect", "--engines", str(export), "--calib", str(calib), "--effect-items", "1",
             "--effect-variants", "none", "--threads", "1")
    assert r.returncode == 0, r.stderr + r.stdout
    variants = json.loads((calib / "effect.json").read_text())["variants"]
    assert [v["label"] for v in variants] == ["fp16, calibrated policy", "fp16, no fp32 islands"]
    assert variants[0] == effect
    assert variants[1]["policy_sha256"] is not None and variants[1]["items"][0]["tokens"] > 0
    assert "fp16, no fp32 islands" in (calib / "REPORT.md").read_text()


def test_cli_errors_are_clear(tmp_path, tiny_export):
    r = _cli("analyze", "--engines", str(tiny_export[0]), "--calib", str(tmp_path))
    assert r.returncode == 2 and "not a calibration directory" in r.stderr and "Traceback" not in r.stderr
    r = _cli("collect", "--engines", str(tiny_export[0]), "--out", str(tmp_path / "c"), "--backend", "ort-cpu",
             "--reference", str(tmp_path / "missing.wav"))
    assert r.returncode == 2 and "missing.wav: file not found" in r.stderr
    r = _cli("effect", "--engines", str(tiny_export[0]), "--calib", str(tmp_path))
    assert r.returncode == 2 and "not a calibration directory" in r.stderr and "Traceback" not in r.stderr
    r = _cli("int8-gate", "--engines", str(tiny_export[0]), "--calib", str(tmp_path))
    assert r.returncode == 2 and "no INT8 forms to judge" in r.stderr and "Traceback" not in r.stderr
    r = _cli("int8", "--engines", str(tiny_export[0]), "--calib", str(tmp_path), "--graphs", "nope")
    assert r.returncode == 2 and "not a calibration directory" in r.stderr


def test_int8_cli_end_to_end_on_the_cpu(tiny_calib, tiny_export, tiny_ckpt, tmp_path):
    """`python -m calibration int8` on the tiny demo without TensorRT: every graph gets an int8 form (its INT8
    form when the CPU gate accepts it, else its fp16 form with the reasons), int8_gate.json and the report say
    where and what was measured, the plans are skipped with the reason, and the runtime synthesizes with
    --engine-precision int8 on the CPU."""
    from calibration.gate import GATE_NAME

    out, calib = _copies(tiny_export, tiny_calib, tmp_path)
    r = _cli("int8", "--engines", str(out), "--calib", str(calib), "--items", "1", "--max-feeds", "2",
             "--threads", "2")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "INT8 forms: " in r.stdout and "engines skipped: " in r.stdout and "Traceback" not in r.stderr
    assert "pre-process" not in r.stderr                                 # quantize_static's advice is not shown
    manifest = read_manifest(out, check_hashes=True)
    record = json.loads((calib / GATE_NAME).read_text())
    assert set(record["graphs"]) == set(manifest.graphs) and "CPU, ONNX Runtime" in record["judged_on"]
    for g, entry in manifest.graphs.items():
        form, d = entry.forms["int8"], record["graphs"][g]
        if d["accepted"]:
            assert form.file == f"onnx/int8/{g}.onnx" and form.counts["quantize_linear"] > 0
            assert d["metrics"]["items"] == 1 and d["counts"]["quantized_nodes"] > 0
        else:
            assert form.file == entry.forms["fp16"].file and d["reasons"][0] in form.note
    assert any(d["accepted"] for d in record["graphs"].values())
    report = (calib / "REPORT.md").read_text()
    assert "judged on CPU, ONNX Runtime" in report and "| gpt_decode | " in report
    wav = tmp_path / "int8.wav"
    r = subprocess.run([sys.executable, "-m", "runtime", "synthesize", "--engines", str(out), "--speaker",
                        str(tiny_ckpt / "examples" / "speaker.wav"), "--text", "Hello world.", "--out", str(wav),
                        "--engine-precision", "int8", "--backend", "ort-cpu", "--max-mel-tokens", "16",
                        "--steps", "3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    assert wav.is_file() and wav.stat().st_size > 44


def test_export_build_checks_policy_and_calibration_arguments_first(tmp_path, tiny_ckpt):
    def build(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "export.build", "--checkpoints", str(tiny_ckpt), "--out",
                               str(tmp_path / "out"), *extra], cwd=REPO, capture_output=True, text=True, timeout=600)

    r = build("--precision-policy", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "nope.json: file not found" in r.stderr
    out = tmp_path / "out"
    r = build("--precision", "int8")
    assert r.returncode == 2 and "--precision int8: INT8 engines are built by the calibration step" in r.stderr
    assert f"python -m calibration int8 --engines {out} --calib CALIB" in r.stderr and "Traceback" not in r.stderr
    r = build("--precision", "fp16", "--calibration", str(tmp_path))      # the old INT8 route names the new one
    assert r.returncode == 2 and "--calibration: INT8 engines are built by" in r.stderr
    assert not out.exists()                                   # nothing exported before the refusal


def test_shipped_fp16_graphs_stay_within_the_calibrated_bounds_on_held_out_feeds(tiny_calib, tiny_export, tiny_ckpt,
                                                                                 tmp_path):
    """The calibration's loop closed: analyse every graph on two feeds -> policy + bounds; export.build's form
    writer makes the fp16 graphs with that policy; each shipped file, emulated (its fp16 rounding included),
    stays within the recorded bounds against float32 on the feeds the analysis did not see."""
    import shutil

    from calibration.bounds import bounds_record, problems, read_bounds, write_bounds
    from calibration.fp16_emulation import emulate_form, session
    from export.dims import checkpoint_contracts
    from export.layout import CheckpointLayout
    from export.precision_forms import write_fp16_forms

    export, _ = tiny_export
    out = Path(shutil.copytree(export, tmp_path / "out"))
    manifest = read_manifest(out)
    store = FeedStore.open(tiny_calib[0])
    analyses = [analyze_graph(g, manifest.graph(g).path(out), store, default_policy(), AnalysisLimits(max_feeds=2))
                for g in manifest.graphs if g in store.graphs]
    policy = calibrated_policy(default_policy(), analyses)
    policy_file = write_policy(policy, tmp_path)
    bounds = read_bounds(write_bounds(bounds_record(analyses, policy.sha256()), tmp_path))
    dims = manifest.dims
    contracts = checkpoint_contracts(dims, CheckpointLayout.open(tiny_ckpt).config)
    entries, failed = write_fp16_forms(manifest.graphs, contracts, dims, out, policy_file)
    assert not failed
    found, checked = [], 0
    for a in analyses:
        form = entries[a.graph].forms["fp16"]
        assert form.policy_sha256 == policy.sha256()
        seen = {r.file for r in store.records(a.graph, 2)}
        held_out = [r for r in store.records(a.graph) if r.file not in seen] or store.records(a.graph)
        ref_sess = session(manifest.graph(a.graph).path(out))
        emu_sess = session(emulate_form(onnx.load(str(out / form.file))))
        names = [o.name for o in ref_sess.get_outputs()]
        for record in held_out[:3]:
            feed = store.load(record)
            feed = {k: v for k, v in feed.items() if k in {i.name for i in ref_sess.get_inputs()}}
            ref = dict(zip(names, ref_sess.run(None, feed)))
            emu = dict(zip(names, emu_sess.run(None, feed)))
            found += problems(a.graph, bounds[a.graph], ref, emu)
            checked += 1
    assert checked >= len(analyses) and not found, found


def test_check_holds_the_shipped_forms_to_the_bounds_on_held_out_feeds(tiny_calib, tiny_export, tiny_ckpt, tmp_path):
    """`python -m calibration check`: analysed graphs' fp16 forms within their bounds on feeds the analysis
    did not see, recorded and reported; a bound the form cannot meet is reported out of bounds."""
    import shutil

    from calibration.bounds import bounds_record, write_bounds
    from calibration.check import CHECK_NAME, check_shipped
    from calibration.cli import main as calibration_main
    from export.dims import checkpoint_contracts
    from export.layout import CheckpointLayout
    from export.precision_forms import write_fp16_forms

    out = Path(shutil.copytree(tiny_export[0], tmp_path / "out"))
    calib = Path(shutil.copytree(tiny_calib[0], tmp_path / "calib"))
    manifest = read_manifest(out)
    store = FeedStore.open(calib)
    graphs = ("campplus", "length_regulator", "dit_step")
    analyses = [analyze_graph(g, manifest.graph(g).path(out), store, default_policy(), AnalysisLimits(max_feeds=1))
                for g in graphs]
    policy = calibrated_policy(default_policy(), analyses)
    policy_file = write_policy(policy, calib)
    record = bounds_record(analyses, policy.sha256())
    write_bounds(record, calib)
    contracts = checkpoint_contracts(manifest.dims, CheckpointLayout.open(tiny_ckpt).config)
    entries, failed = write_fp16_forms(manifest.graphs, contracts, manifest.dims, out, policy_file)
    assert not failed
    import dataclasses

    from runtime.manifest import write_manifest

    write_manifest(dataclasses.replace(manifest, graphs={**manifest.graphs, **entries}), out)   # as export.build
    results = check_shipped(out, calib, feeds=2)
    assert [r.graph for r in results] == [g for g in manifest.graphs if g in graphs]
    for r in results:
        assert r.ok, r.problems
        assert r.feeds >= 1 and set(r.worst) == set(record["graphs"][r.graph])
        assert r.held_out == (len(store.records(r.graph)) > 1)
    assert json.loads((calib / CHECK_NAME).read_text())[0]["graph"] == results[0].graph
    record["graphs"]["dit_step"]["x_next"]["rel_err"] = -1.0            # a bound nothing can meet
    write_bounds(record, calib)
    assert calibration_main(["check", "--engines", str(out), "--calib", str(calib), "--feeds", "1"]) == 1
    report = (calib / "REPORT.md").read_text()
    assert "## Shipped fp16 graphs against the bounds" in report and "NO: dit_step.x_next" in report
