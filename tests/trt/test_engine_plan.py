"""What a TensorRT plan is keyed by (runtime/trt/engine_plan.py): profiles from the manifest, key differences
in words, the sidecar round trip, and the GPU probes on a machine without a GPU."""

from __future__ import annotations

import dataclasses
import json

import pytest

from runtime.contracts import ModelDims, build_contracts
from runtime.errors import EngineMismatchError
from runtime.gpt.batch_cache import ROW_BUCKETS
from runtime.manifest import graph_entry, read_manifest
from runtime.trt import gpu
from runtime.trt.engine_plan import (
    DECODE_KV_CEILING_BYTES,
    GRAPH_FORMS,
    LEGACY_GRAPH_FORM,
    EngineKey,
    GpuInfo,
    PlanRecord,
    Profile,
    check_record,
    decode_batch_max,
    decode_buckets,
    decode_row_bytes,
    decode_rows_bound,
    engine_profiles,
    plan_paths,
    read_record,
    write_record,
)

RTX3090 = GpuInfo("NVIDIA GeForce RTX 3090", "8.6")


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


def _key(manifest, graph="gpt_decode", **changes) -> EngineKey:
    entry = manifest.graph(graph)
    key = EngineKey(graph, entry.sha256, "fp16", engine_profiles(entry), "10.13.0.35", RTX3090, "abc")
    return dataclasses.replace(key, **changes)


def test_decode_has_one_static_profile_per_bucket(manifest) -> None:
    entry = manifest.graph("gpt_decode")
    r = entry.ranges["cache_len"]
    assert decode_buckets(entry) == (256, 512, 1024, 2048, r.max)
    profiles = engine_profiles(entry)
    assert [p.label for p in profiles] == [f"cache_len={b}" for b in decode_buckets(entry)]
    for bucket, profile in zip(decode_buckets(entry), profiles):
        shapes = profile.shapes()
        lo, opt, hi = shapes["kv_cache.0"]
        assert lo[3] == opt[3] == hi[3] == bucket                         # cache_len fixed
        assert (lo[1], opt[1], hi[1]) == (1, 3, 64)                       # a tiny model's rows fit 64 at any bucket
        assert shapes["kv_mask"][2] == (64, bucket) and shapes["mel_ids"][2] == (64, 1)
        assert profile.admits({n: s[1] for n, s in shapes.items()})
    other = {n: s[1] for n, s in profiles[0].shapes().items()}
    other["kv_mask"] = (3, 300)
    assert not profiles[0].admits(other)


def _full_size_decode():
    dims = ModelDims()
    return graph_entry(build_contracts(dims)["gpt_decode"], dims, file="gpt_decode.onnx", sha256="0" * 64, opset=18,
                       exporter="dynamo", fingerprint="f")


def test_decode_batch_ranges_follow_the_kv_memory_of_each_bucket() -> None:
    """The real model: a row takes 245,764 bytes per position (24 layers of K/V in float32 + the mask), so a
    12 GiB allocation holds 204 rows at 256 positions but 19 at 2688; rounded down to row buckets: 64, 64, 48,
    24, 16. The batch bound at every bucket is 16."""
    entry = _full_size_decode()
    assert decode_row_bytes(entry) == 24 * 2 * 20 * 64 * 4 + 4 == 245_764
    buckets = decode_buckets(entry)
    maxima = [decode_batch_max(entry, b) for b in buckets]
    assert buckets == (256, 512, 1024, 2048, 2688) and maxima == [64, 64, 48, 24, 16]
    for bucket, rows in zip(buckets, maxima):
        assert rows * bucket * decode_row_bytes(entry) <= DECODE_KV_CEILING_BYTES
        assert rows in ROW_BUCKETS
    assert decode_rows_bound(entry) == 16 and decode_rows_bound(entry, (256, 512)) == 64
    for bucket, rows, profile in zip(buckets, maxima, engine_profiles(entry)):
        shapes = profile.shapes()
        assert shapes["mel_ids"] == ((1, 1), (3, 1), (rows, 1)) and shapes["kv_mask"][2] == (rows, bucket)
        assert shapes["kv_cache.23"] == ((2, 1, 20, bucket, 64), (2, 3, 20, bucket, 64), (2, rows, 20, bucket, 64))
        assert profile.admits({n: s[2] for n, s in shapes.items()})


def test_a_plan_with_the_old_decode_profiles_is_rebuilt_saying_why(manifest, tmp_path) -> None:
    """Plans built before the batch ranges (beams 1..4 at every bucket) differ in their key: the builder
    rebuilds them and the runtime refuses them, naming the profile and input that changed."""
    entry = manifest.graph("gpt_decode")
    old = tuple(Profile(p.label, tuple(dataclasses.replace(i, max=(4, *i.max[1:])) if i.name != "kv_cache.0" else
                                       dataclasses.replace(i, max=(2, 4, *i.max[2:])) for i in p.inputs))
                for p in engine_profiles(entry))
    want = _key(manifest)
    (reason,) = want.differences(dataclasses.replace(want, profiles=old))
    assert reason.startswith("its optimization profiles differ from the ones this build makes")
    assert "profile cache_len=256, input 'kv_cache.0': min (2, 1, 4, 256, 16) opt (2, 3, 4, 256, 16) max " \
           "(2, 4, 4, 256, 16) in the plan, min (2, 1, 4, 256, 16) opt (2, 3, 4, 256, 16) max (2, 64, 4, 256, 16) " \
           "now" in reason
    plan, sidecar = plan_paths(tmp_path, "gpt_decode", "fp16")
    plan.parent.mkdir()
    write_record(sidecar, PlanRecord(dataclasses.replace(want, profiles=old), "f" * 64))
    with pytest.raises(EngineMismatchError, match=r"cannot run here: its optimization profiles differ .* Rebuild it"):
        check_record(read_record(sidecar), want, plan)
    fewer = dataclasses.replace(want, profiles=old[:2])
    assert "it has profiles ['cache_len=256', 'cache_len=512'], this build makes" in want.differences(fewer)[0]


def test_other_graphs_take_the_manifest_ranges(manifest) -> None:
    entry = manifest.graph("dit_step")
    (profile,) = engine_profiles(entry)
    assert profile.shapes()["x"] == ((1, 80, 3), (1, 80, 800), (4, 80, 4500))
    assert profile.shapes()["cfg_rate"] == ((1,), (1,), (1,))


@pytest.mark.parametrize("change, words", [
    ({"gpu": GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")}, "built for NVIDIA A100-SXM4-80GB (compute capability 8.0), "
                                                       "this GPU is NVIDIA GeForce RTX 3090 (compute capability 8.6)"),
    ({"trt_version": "10.4.0"}, "built with TensorRT 10.4.0, this is TensorRT 10.13.0.35"),
    ({"onnx_sha256": "0" * 64}, "another ONNX file"),
    ({"precision": "fp32"}, "built for fp32, not fp16"),
    ({"policy_sha256": "zzz"}, "another precision policy"),
    ({"graph_form": "int8-qdq"}, "built from the int8-qdq graph, this build is strongly typed from the fp16-mixed graph"),
])
def test_key_differences_are_said_in_words(manifest, change, words) -> None:
    want = _key(manifest)
    got = dataclasses.replace(want, **change)
    assert want.digest() != got.digest()
    reasons = want.differences(got)
    assert len(reasons) == 1 and words in reasons[0]


def test_record_round_trip_and_refusal(manifest, tmp_path) -> None:
    plan, sidecar = plan_paths(tmp_path, "gpt_decode", "fp16")
    assert (plan.name, sidecar.name, plan.parent.name) == ("gpt_decode.fp16.plan", "gpt_decode.fp16.json", "engines")
    plan.parent.mkdir()
    record = PlanRecord(_key(manifest), "f" * 64, ("a/b/Softmax",), 12.5, {"workspace_gib": 4})
    write_record(sidecar, record)
    assert read_record(sidecar) == record
    check_record(record, _key(manifest), plan)                            # same key: accepted
    with pytest.raises(EngineMismatchError, match=r"cannot run here: it was built for NVIDIA GeForce RTX 3090 \(compute "
                       r"capability 8.6\), this GPU is NVIDIA A100"):
        check_record(record, _key(manifest, gpu=GpuInfo("NVIDIA A100", "8.0")), plan)


def test_the_graph_form_follows_the_precision_unless_given(manifest) -> None:
    entry = manifest.graph("dit_step")
    forms = [EngineKey("dit_step", entry.sha256, p, engine_profiles(entry), "11.4.0.106", RTX3090).graph_form
             for p in ("fp32", "fp16", "int8")]
    assert forms == ["fp32", "fp16-mixed", "int8-qdq"]
    assert GRAPH_FORMS == {"fp32": "fp32", "fp16": "fp16-mixed", "int8": "int8-qdq"}
    assert _key(manifest, graph_form="int8-qdq").graph_form == "int8-qdq"
    assert _key(manifest).digest() != _key(manifest, graph_form="int8-qdq").digest()


def test_an_old_sidecar_without_a_graph_form_reads_as_weakly_typed_and_differs(manifest, tmp_path) -> None:
    """A record written before strong typing has no graph_form: it reads (no crash), as the legacy form, and its
    key differs from any key built now, so the builder rebuilds the plan and the runtime refuses it."""
    plan, sidecar = plan_paths(tmp_path, "gpt_decode", "fp16")
    plan.parent.mkdir()
    write_record(sidecar, PlanRecord(_key(manifest), "f" * 64, ("a/b/Softmax",), 3.0, {"flags_set": ["FP16"]}))
    data = json.loads(sidecar.read_text())
    del data["key"]["graph_form"]
    sidecar.write_text(json.dumps(data))
    old = read_record(sidecar)
    assert old.key.graph_form == LEGACY_GRAPH_FORM and old.fp32_layers == ("a/b/Softmax",)
    (reason,) = _key(manifest).differences(old.key)
    assert "built as a weakly typed network" in reason and "strongly typed from the fp16-mixed graph" in reason
    with pytest.raises(EngineMismatchError, match="weakly typed network"):
        check_record(old, _key(manifest), plan)


def test_unreadable_records_are_named(tmp_path) -> None:
    path = tmp_path / "x.json"
    with pytest.raises(EngineMismatchError, match="record is missing"):
        read_record(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(EngineMismatchError, match="unreadable plan record"):
        read_record(path)


def test_gpu_probes_without_a_gpu() -> None:
    """cuda-python is installed by the test extra; without a driver it returns error codes, never raises."""
    devices = gpu.cuda_devices()
    if devices.ok:
        pytest.skip("this machine has a GPU")
    assert devices.detail and gpu.gpu_info() is None
    trt = gpu.tensorrt()
    assert not trt.ok and trt.detail
