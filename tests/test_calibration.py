"""calibration/: feed collection and storage, the FP16 emulation and analysis, the policy it writes and the
engine builder consuming it (TensorRT's network API behind the fakes of test_engines), the end-to-end
effect, INT8 calibrator / cache / gate, and the CLI — on the tiny demo export and on hand-made graphs."""

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
from calibration.gate import (Int8Limits, decide, evaluate, refuse_plans, refused_graphs, write_gate_record)
from calibration.int8 import (CacheKey, CalibrationBatches, CalibrationCache, calibrator_factory, entropy_calibrator,
                              fit_feed, parse_trt_cache)
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
# INT8: data loader, cache file, calibrator, factory, gate


def test_fit_feed_crops_and_tiles_dynamic_axes():
    feed = {"x": np.arange(10, dtype=np.float32).reshape(1, 2, 5), "ids": np.int64([[3, 4, 5]])}
    out = fit_feed(feed, {"x": (1, 2, 8), "ids": (1, 2)}, {"ids": "int32"})
    assert out["x"].tolist() == [[[0, 1, 2, 3, 4, 0, 1, 2], [5, 6, 7, 8, 9, 5, 6, 7]]]
    assert out["ids"].tolist() == [[3, 4]] and out["ids"].dtype == np.int32 and out["x"].flags.c_contiguous
    with pytest.raises(InputError, match="rank"):
        fit_feed(feed, {"x": (2, 5), "ids": (1, 2)})
    with pytest.raises(InputError, match="no input 'mask'"):
        fit_feed(feed, {"mask": (1,)})


def test_calibration_batches_are_at_the_profile_opt_shapes(tiny_calib, tiny_export):
    from runtime.trt.engine_plan import engine_profiles

    manifest = read_manifest(tiny_export[0])
    store = FeedStore.open(tiny_calib[0])
    for graph in ("dit_step", "gpt_decode", "bigvgan"):
        entry = manifest.graph(graph)
        profile = engine_profiles(entry)[0]
        opt = {i.name: i.opt for i in profile.inputs}
        batches = CalibrationBatches(store, graph, opt, {t.name: t.dtype for t in entry.inputs})
        got = list(batches)
        assert len(got) == len(store.records(graph)) > 0
        for feed in got:
            assert {k: v.shape for k, v in feed.items()} == {k: tuple(v) for k, v in opt.items()}
            assert all(feed[t.name].dtype == np.dtype(t.dtype) for t in entry.inputs)
        assert batches.digest() == CalibrationBatches(store, graph, opt).digest()
        assert batches.digest() != CalibrationBatches(store, graph, opt, limit=1).digest()


def test_calibration_cache_file_round_trip_and_refusals(tmp_path, caplog):
    key = CacheKey("gpt_decode", "ab" * 32, "feeds1", "cache_len=256", "10")
    cache = CalibrationCache(tmp_path / "int8" / "gpt_decode.cache", key)
    assert cache.read() is None                                     # no file yet: calibrate
    blob = b"TRT-100700-EntropyCalibration2\ninput: 3c010a14\nnode_mul_1: 3d4ccccd\n"
    cache.write(blob)
    assert cache.read() == blob
    head = json.loads(cache.path.read_bytes().split(b"\n", 1)[0])
    assert head["format"] == "indextts2-int8-calibration" and head["graph"] == "gpt_decode"
    assert head["blob_size"] == len(blob)
    for other in (CacheKey("gpt_decode", "cd" * 32, "feeds1", "cache_len=256", "10"),   # another ONNX file
                  CacheKey("gpt_decode", "ab" * 32, "feeds2", "cache_len=256", "10"),   # other feeds
                  CacheKey("gpt_decode", "ab" * 32, "feeds1", "cache_len=256", "11")):  # another TensorRT
        assert CalibrationCache(cache.path, other).read() is None
    data = cache.path.read_bytes()
    cache.path.write_bytes(data[:-3] + b"fff")                      # damaged blob
    assert cache.read() is None and "damaged" in caplog.text
    cache.path.write_bytes(b"TRT-100700-EntropyCalibration2\n")     # TensorRT's raw file, not ours
    assert cache.read() is None
    first, scales = parse_trt_cache(blob)
    assert first.startswith("TRT-") and scales["node_mul_1"] == pytest.approx(0.05)
    assert parse_trt_cache(b"\x00\xff") == ("", {})


class _FakeCuda:
    """runtime.trt.cuda's surface the calibrator uses, over host memory."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        owner = self

        class DeviceBuffer:
            def __init__(self, nbytes, what=""):
                self.nbytes, self.data = nbytes, np.zeros(nbytes, np.uint8)
                self.ptr = self.data.ctypes.data
                owner.memory[self.ptr] = self.data

            def close(self):
                owner.memory.pop(self.ptr, None)

        class Stream:
            synced = 0

            def sync(self):
                Stream.synced += 1

            def close(self):
                pass

        self.DeviceBuffer, self.Stream = DeviceBuffer, Stream

    def memcpy_htod_async(self, dst, src, nbytes, stream):
        import ctypes
        ctypes.memmove(dst, src, nbytes)


class _FakeTrtInt8:
    __version__ = "10.7.0.23"

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            self.base_initialised = True


def test_entropy_calibrator_serves_device_copies_and_uses_the_cache(tiny_calib, tiny_export, tmp_path):
    from runtime.trt.engine_plan import engine_profiles

    manifest = read_manifest(tiny_export[0])
    store = FeedStore.open(tiny_calib[0])
    entry = manifest.graph("bigvgan")
    opt = {i.name: i.opt for i in engine_profiles(entry)[0].inputs}
    batches = CalibrationBatches(store, "bigvgan", opt)
    cuda = _FakeCuda()
    cache = CalibrationCache(tmp_path / "bigvgan.cache", CacheKey("bigvgan", entry.sha256, batches.digest(),
                                                                   "default", "10"))
    cal = entropy_calibrator(_FakeTrtInt8, batches, cache, cuda)
    assert cal.base_initialised and cal.get_batch_size() == 1
    expected = list(batches)
    for want in expected:
        (ptr,) = cal.get_batch(["mel"])
        got = cuda.memory[ptr][:want["mel"].nbytes].view(np.float32).reshape(want["mel"].shape)
        np.testing.assert_array_equal(got, want["mel"])
    assert cal.get_batch(["mel"]) == []                             # done
    assert cal.read_calibration_cache() is None
    cal.write_calibration_cache(memoryview(b"TRT-scales"))
    assert cal.read_calibration_cache() == b"TRT-scales"
    cal.close()
    assert not cuda.memory


def test_calibrator_factory_follows_the_gate_and_reaches_the_builder(tiny_calib, tiny_export, tmp_path):
    from engines.builder import BuildSettings, ensure_plan
    from tests.test_engines import RTX, BuilderFlag, fake_trt_for

    export, _ = tiny_export
    manifest = read_manifest(export)
    calib = tiny_calib[0]
    gate = {"dit_step": decide_from(0.2, 40.0, 30.0), "bigvgan": decide_from(1.0, 40.0, 30.0)}
    write_gate_record(calib, Int8Limits(), gate)
    try:
        assert refused_graphs(calib) == {"dit_step": "greedy-token agreement 0.200 < 0.98"}
        factory = calibrator_factory(calib, trt=_FakeTrtInt8,
                                     cuda=_FakeCuda())
        root = tmp_path / "out"
        (root / "onnx").mkdir(parents=True)
        import shutil
        shutil.copy2(export / "manifest.json", root / "manifest.json")
        for g in ("dit_step", "bigvgan"):
            shutil.copy2(export / "onnx" / f"{g}.onnx", root / "onnx" / f"{g}.onnx")
        trt = fake_trt_for(manifest)
        settings = BuildSettings("int8", default_policy(), calibrator=factory)
        dit = ensure_plan(manifest.graph("dit_step"), root, settings, trt=trt, gpu=RTX)
        voc = ensure_plan(manifest.graph("bigvgan"), root, settings, trt=trt, gpu=RTX)
        (_, cfg_dit), (_, cfg_voc) = trt.builds
        assert cfg_dit.int8_calibrator is None and BuilderFlag.INT8 not in cfg_dit.flags   # refused: fp16
        assert BuilderFlag.INT8 in cfg_voc.flags and cfg_voc.int8_calibrator.base_initialised
        assert dit.record.notes["int8"] is False and voc.record.notes["int8"] is True
    finally:
        (calib / "int8_gate.json").unlink()


def test_int8_command_builds_gates_and_rebuilds_refused_graphs_as_fp16(tiny_calib, tiny_export, tmp_path):
    """`python -m calibration int8`'s flow on the fake TensorRT: INT8 plans with calibrators, the gate over
    the INT8 plans only, the refused plan moved aside and rebuilt as fp16, the record merged on a rerun."""
    import shutil

    from calibration.gate import GATE_NAME
    from calibration.int8_build import Int8Settings, build_int8
    from runtime.trt.engine_plan import plan_paths, read_record
    from tests.test_engines import RTX, BuilderFlag, fake_trt_for

    out = Path(shutil.copytree(tiny_export[0], tmp_path / "out"))
    calib = Path(shutil.copytree(tiny_calib[0], tmp_path / "calib"))
    manifest = read_manifest(out)
    trt = fake_trt_for(manifest)
    trt.IInt8EntropyCalibrator2 = _FakeTrtInt8.IInt8EntropyCalibrator2
    graphs = ("length_regulator", "dit_step", "bigvgan")
    judged = []

    def judge(engines_dir, calib_dir, candidates, n_items, progress, limits):
        judged.append(list(candidates))
        assert (engines_dir, calib_dir, n_items) == (out, calib, 2)
        return {g: decide_from(0.2 if g == "dit_step" else 1.0, 40.0, 30.0) for g in candidates}

    settings = Int8Settings(items=2, graphs=graphs)
    result = build_int8(out, calib, settings, judge=judge, trt=trt, gpu=RTX, cuda=_FakeCuda())
    assert [(o.graph, o.status) for o in result.engines.outcomes] == [(g, "built") for g in graphs]
    assert judged == [list(graphs)] and result.gate.refused == ["dit_step"]
    assert [p.name for p in result.gate.moved] == ["dit_step.int8.plan.refused", "dit_step.int8.json.refused"]
    assert [(o.graph, o.status) for o in result.fallback.outcomes] == [("dit_step", "built")] and result.ok
    flags = [(config.int8_calibrator is not None, BuilderFlag.INT8 in config.flags) for _, config in trt.builds]
    assert flags == [(True, True)] * 3 + [(False, False)]                 # the rebuild has no calibrator
    notes = {g: read_record(plan_paths(out, g, "int8")[1]).notes["int8"] for g in graphs}
    assert notes == {"length_regulator": True, "dit_step": False, "bigvgan": True}
    assert "refused graphs rebuilt as fp16" in "\n".join(result.lines())

    again = build_int8(out, calib, settings, judge=judge, trt=trt, gpu=RTX, cuda=_FakeCuda())
    assert {o.status for o in again.engines.outcomes} == {"reused"} and again.fallback is None
    assert judged[-1] == ["length_regulator", "bigvgan"]                  # the fp16 fallback is not judged
    record = json.loads((calib / GATE_NAME).read_text())["graphs"]
    assert {g: d["accepted"] for g, d in record.items()} == {"length_regulator": True, "dit_step": False,
                                                             "bigvgan": True}   # dit_step's refusal kept
    assert len(trt.builds) == 4


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


def test_gate_judges_each_graph_alone_and_moves_refused_plans_aside(tiny_calib, tiny_export, tmp_path):
    """A graph whose 'INT8' executor is far off is refused; an exact one is accepted."""
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
    engines_dir = tmp_path / "engines"
    engines_dir.mkdir()
    for g in ("bigvgan", "length_regulator"):
        (engines_dir / f"{g}.int8.plan").write_bytes(b"plan")
    moved = refuse_plans(tmp_path, decisions)
    assert [p.name for p in moved] == ["bigvgan.int8.plan.refused"]
    assert (engines_dir / "length_regulator.int8.plan").exists()


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
    assert r.returncode == 2 and "INT8" in r.stderr and "Traceback" not in r.stderr


def test_int8_cli_without_tensorrt_is_a_clear_error(tiny_calib, tiny_export):
    r = _cli("int8", "--engines", str(tiny_export[0]), "--calib", str(tiny_calib[0]))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "INT8 engines are TensorRT plans: " in r.stderr and "TensorRT 10 and an NVIDIA GPU" in r.stderr
    r = _cli("int8", "--engines", str(tiny_export[0]), "--calib", str(tiny_calib[0]), "--graphs", "nope")
    assert r.returncode == 2 and "graphs ['nope'] are not in" in r.stderr


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
