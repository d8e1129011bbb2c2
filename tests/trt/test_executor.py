"""runtime/trt/executor.py: engine refusal, profile choice, and the executor, CUDA-graph replay and the
decode loop with the device cache driven through the fake tensorrt + cudart against ONNX Runtime."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.errors import (
    BackendError,
    CheckpointError,
    ContractError,
    EngineMismatchError,
)
from runtime.trt import api, cuda, gpu
from runtime.trt.engine_plan import decode_buckets, engine_profiles
from tests.trt.fakes import (
    A100,
    RTX3090,
    TRT_VERSION,
    _feed,
    _ort,
    _write_plan,
    host_view,
)

# ---------------------------------------------------------------------------------------------------
# Engine refusal and profile choice (real tiny manifest)


def test_an_engine_built_for_another_gpu_and_tensorrt_is_refused(manifest, tmp_path, monkeypatch) -> None:
    from runtime.trt.executor import TrtExecutor

    entry = manifest.graph("dit_step")
    _write_plan(tmp_path, entry, "fp16", A100, "10.4.0.26")
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: RTX3090)
    monkeypatch.setattr(api, "import_tensorrt", lambda: SimpleNamespace(__version__=TRT_VERSION))
    with pytest.raises(EngineMismatchError) as err:
        TrtExecutor(entry, tmp_path, "fp16")
    message = str(err.value)
    assert "dit_step.fp16.plan: this engine cannot run here" in message
    assert "built for NVIDIA A100-SXM4-80GB (compute capability 8.0), this GPU is NVIDIA GeForce RTX 3090" in message
    assert f"built with TensorRT 10.4.0.26, this is TensorRT {TRT_VERSION}" in message
    assert "Rebuild it on this machine with python -m export.build" in message


def test_a_plan_recorded_before_strong_typing_is_refused(manifest, tmp_path, monkeypatch) -> None:
    """An old sidecar (no graph_form: a weakly typed build) loads as a record, and the runtime refuses its plan."""
    import json

    from runtime.trt.engine_plan import plan_paths
    from runtime.trt.executor import TrtExecutor

    entry = manifest.graph("dit_step")
    _write_plan(tmp_path, entry, "fp16", RTX3090, TRT_VERSION)
    sidecar = plan_paths(tmp_path, "dit_step", "fp16")[1]
    data = json.loads(sidecar.read_text())
    del data["key"]["graph_form"]
    sidecar.write_text(json.dumps(data))
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: RTX3090)
    monkeypatch.setattr(api, "import_tensorrt", lambda: SimpleNamespace(__version__=TRT_VERSION))
    with pytest.raises(EngineMismatchError, match=r"cannot run here: it was built as a weakly typed network .* "
                                                  r"strongly typed from the fp16-mixed graph\. Rebuild"):
        TrtExecutor(entry, tmp_path, "fp16")


def _fake_tensorrt(version: str) -> SimpleNamespace:
    """A stand-in `tensorrt` module for sys.modules (importlib's find_spec needs a __spec__)."""
    return SimpleNamespace(__version__=version, __spec__=SimpleNamespace(name="tensorrt"))


def test_missing_plan_tensorrt_or_gpu_are_clear(manifest, tmp_path, monkeypatch) -> None:
    from runtime.trt.executor import TrtExecutor

    entry = manifest.graph("bigvgan")
    with pytest.raises(CheckpointError, match=r"no fp32 TensorRT engine at .*bigvgan\.fp32\.plan; build .* "
                                              r"python -m export\.build .* --precision fp32"):
        TrtExecutor(entry, tmp_path, "fp32")
    _write_plan(tmp_path, entry, "fp32", RTX3090, TRT_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt", None)             # import tensorrt -> ImportError
    with pytest.raises(BackendError, match=r"tensorrt is not installed .*'tensorrt-cu13>=10\.12,<12'"):
        TrtExecutor(entry, tmp_path, "fp32")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.11.0.33"))
    with pytest.raises(BackendError, match=r"TensorRT 10\.11\.0\.33 is too old: .* needs TensorRT ≥ 10\.12"):
        TrtExecutor(entry, tmp_path, "fp32")
    assert not gpu.tensorrt().ok and "needs TensorRT ≥ 10.12" in gpu.tensorrt().detail
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("12.0.0"))
    with pytest.raises(BackendError, match=r"TensorRT 12\.0\.0 is a major version this toolkit does not know"):
        TrtExecutor(entry, tmp_path, "fp32")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(TRT_VERSION))
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: None)
    with pytest.raises(BackendError, match="no usable CUDA GPU"):
        TrtExecutor(entry, tmp_path, "fp32")


def test_profile_choice_on_the_tiny_manifest(manifest) -> None:
    from runtime.trt.executor import (
        data_dependent_outputs,
        profile_max_bytes,
        select_profile,
    )

    decode = manifest.graph("gpt_decode")
    profiles = engine_profiles(decode)
    buckets = decode_buckets(decode)
    dims = manifest.dims

    def decode_shapes(batch: int, s: int) -> dict:
        shapes = {f"kv_cache.{i}": (2, batch, dims.heads, s, dims.head_dim) for i in range(dims.layers)}
        return {**shapes, "mel_ids": (batch, 1), "mel_pos": (batch, 1), "kv_mask": (batch, s)}

    for i, bucket in enumerate(buckets):
        assert select_profile("gpt_decode", profiles, decode_shapes(3, bucket)) == i
    with pytest.raises(ContractError) as err:
        select_profile("gpt_decode", profiles, decode_shapes(3, 300))
    text = str(err.value)
    assert "no optimization profile" in text and "input 'kv_cache.0' shape (2, 3, 4, 300, 16)" in text
    assert f"min (2, 1, 4, {buckets[0]}, 16) .. max (2, 64, 4, {buckets[0]}, 16)" in text
    for i, bucket in enumerate(buckets):                        # the shared decode batch's rows (engine_plan)
        assert select_profile("gpt_decode", profiles, decode_shapes(64, bucket)) == i
    with pytest.raises(ContractError, match=r"'mel_ids' shape \(65, 1\) is outside min \(1, 1\) \.\. max \(64, 1\)"):
        select_profile("gpt_decode", profiles, decode_shapes(65, buckets[0]))

    dit = manifest.graph("dit_step")
    (profile,) = engine_profiles(dit)
    shapes = {ip.name: ip.opt for ip in profile.inputs}
    assert select_profile("dit_step", [profile], shapes) == 0
    shapes["x"] = shapes["prompt_x"] = (1, 80, 4501)
    with pytest.raises(ContractError, match=r"input 'x' shape \(1, 80, 4501\) is outside min \(1, 80, 3\) \.\. "
                                            r"max \(4, 80, 4500\)"):
        select_profile("dit_step", [profile], shapes)

    assert data_dependent_outputs(manifest.graph("length_regulator")) == ("cond",)
    assert all(data_dependent_outputs(e) == () for n, e in manifest.graphs.items() if n != "length_regulator")
    nbytes = profile_max_bytes(decode, profiles[1])
    assert nbytes["kv_cache.0"] == 2 * 64 * dims.heads * buckets[1] * dims.head_dim * 4
    assert nbytes["logits"] == 64 * dims.vocab * 4 and nbytes["mel_ids"] == 64 * 8
    cond = profile_max_bytes(manifest.graph("length_regulator"), engine_profiles(manifest.graph("length_regulator"))[0])
    assert cond["cond"] == 4 * 3200 * dims.content_dim * 4            # the range maximum of the data-dependent axis


@pytest.mark.parametrize("graph, sizes", [
    ("dit_step", {"batch": 2, "mel_len": 37}),
    ("length_regulator", {"batch": 2, "seq_len": 21}),
    ("gpt_prefill", {"batch": 1, "text_len": 9}),
    ("campplus", "opt"),
])
def test_trt_executor_through_fakes_equals_onnx_runtime(fake_engines, manifest, graph_kit, graph, sizes) -> None:
    from runtime.trt.executor import TrtExecutor

    root, trt = fake_engines
    ort = _ort(root, manifest, graph)
    with TrtExecutor(manifest.graph(graph), root, "fp16", trt=trt) as ex:
        for seed in range(3):                                 # the second and third runs reuse every buffer
            feed = _feed(graph_kit, graph, sizes, seed)
            allocations = len(trt.cudart.device)
            got, want = ex.run(feed), ort.run(feed)
            assert set(got) == set(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{graph} {name} seed {seed}")
            if seed:
                assert len(trt.cudart.device) == allocations, "a run allocated device memory"
            assert ex.last_gpu_ms == 0.25 and ex.last_mode == "plain"
    assert not trt.cudart.device and not trt.cudart.host, "close() left allocations behind"


@pytest.mark.parametrize("version", ["10.12.0.36", "11.4.0.106"])
def test_the_executor_runs_on_tensorrt_10_12_and_11(manifest, tiny_export, graph_kit, tmp_path, monkeypatch,
                                                    fake_cuda, version) -> None:
    """The executor's calls are the same on 10.12+ and 11.x (engines/TENSORRT_API.md §4): the fake engine
    refuses what 11 removed, and a plan recorded by that TensorRT runs under it and equals ONNX Runtime."""
    import shutil

    from runtime.trt.executor import TrtExecutor
    from tests.trt.fakes import FakeTrt

    root = tmp_path / "out"
    shutil.copytree(tiny_export[0], root)
    entry = manifest.graph("dit_step")
    _write_plan(root, entry, "fp16", RTX3090, version)
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: RTX3090)
    trt = FakeTrt(manifest, root, fake_cuda, version=version)
    feed = _feed(graph_kit, "dit_step", {"batch": 1, "mel_len": 40}, 0)
    with TrtExecutor(entry, root, "fp16", trt=trt) as ex:
        got = ex.run(feed)
        with pytest.raises(AttributeError, match="device_memory_size.*removed in TensorRT 11"):
            ex._engine.device_memory_size
    want = _ort(root, manifest, "dit_step").run(feed)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(AttributeError, match="create_execution_context_without_device_memory"):
        trt.engines[0].create_execution_context_without_device_memory()


def test_trt_executor_device_inputs_outputs_and_checks(fake_engines, manifest, graph_kit) -> None:
    from runtime.trt.executor import TrtExecutor

    root, trt = fake_engines
    feed = _feed(graph_kit, "gpt_decode", {"batch": 3, "cache_len": 256}, 4)
    want = _ort(root, manifest, "gpt_decode").run(feed)
    ex = TrtExecutor(manifest.graph("gpt_decode"), root, "fp16", trt=trt)
    kv_in = cuda.DeviceBuffer(feed["kv_cache.0"].nbytes)
    host_view(kv_in.ptr, feed["kv_cache.0"].shape)[...] = feed["kv_cache.0"]
    kv_new = cuda.DeviceBuffer(want["kv_new"].nbytes)
    logits = np.empty_like(want["logits"])
    mixed = {**feed, "kv_cache.0": kv_in.array(feed["kv_cache.0"].shape)}
    got = ex.run(mixed, outputs={"logits": logits, "kv_new": kv_new.array(want["kv_new"].shape)})
    assert got["logits"] is logits and isinstance(got["kv_new"], cuda.DeviceArray)
    np.testing.assert_array_equal(logits, want["logits"])
    np.testing.assert_array_equal(host_view(kv_new.ptr, want["kv_new"].shape), want["kv_new"])
    assert "kv_cache.0" not in ex._contexts[0].device           # bound directly: no executor buffer, no copy
    with pytest.raises(ContractError, match=r"input 'kv_cache.0': axis 3 \('cache_len'\) is 512"):
        ex.run({**feed, "kv_cache.0": cuda.DeviceArray(kv_in.ptr, (2, 3, 4, 512, 16), np.float32)})
    with pytest.raises(ContractError, match="device output 'kv_new' is float32"):
        ex.run(feed, outputs={"kv_new": kv_new.array((2, 2, 2, 4, 1, 16))})
    with pytest.raises(ContractError, match="no optimization profile"):
        ex.run(_feed(graph_kit, "gpt_decode", {"batch": 1, "cache_len": 300}))
    ex.close()
    with pytest.raises(BackendError, match="closed"):
        ex.run(feed)
    kv_in.close()
    kv_new.close()


def test_cuda_graph_replay_equals_plain_runs(fake_engines, manifest, graph_kit) -> None:
    from runtime.trt.executor import TrtExecutor

    root, trt = fake_engines
    ort = _ort(root, manifest, "dit_step")
    ex = TrtExecutor(manifest.graph("dit_step"), root, "fp16", cuda_graphs=True, trt=trt)
    modes = []
    for t, seed in [(40, 0), (40, 1), (40, 2), (40, 3), (41, 4), (41, 5), (40, 6), (40, 7)]:
        feed = _feed(graph_kit, "dit_step", {"batch": 1, "mel_len": t}, seed)
        before = trt.executions
        got = ex.run(feed)
        modes.append(ex.last_mode)
        assert trt.executions == before + 1                  # a replay does the work once, a capture none
        np.testing.assert_array_equal(got["x_next"], ort.run(feed)["x_next"], err_msg=f"T={t} seed={seed}")
    # new shapes drop the context's graph: warm-up, capture, replay again
    assert modes == ["plain", "capture", "replay", "replay", "plain", "capture", "plain", "capture"]
    stats = ex.graph_stats
    assert (stats.plain, stats.captures, stats.replays, stats.failed_captures) == (3, 3, 2, 0)
    ex.close()
    assert not trt.cudart.execs, "graph executables left behind"

    lr = TrtExecutor(manifest.graph("length_regulator"), root, "fp16", cuda_graphs=True, trt=trt)
    assert lr.graph_stats is None                            # data-dependent output: never captured
    lr.close()


@pytest.mark.parametrize("failure", ["execute_false", "invalidated"])
def test_an_uncapturable_engine_runs_plainly(fake_engines, manifest, graph_kit, failure) -> None:
    from runtime.trt.executor import TrtExecutor

    root, trt = fake_engines
    if failure == "execute_false":
        trt.capturable = False
    else:
        trt.cudart.invalidate_captures = True
    ort = _ort(root, manifest, "dit_step")
    ex = TrtExecutor(manifest.graph("dit_step"), root, "fp16", cuda_graphs=True, trt=trt)
    feed = _feed(graph_kit, "dit_step", {"batch": 2, "mel_len": 30}, 1)
    for _ in range(4):
        np.testing.assert_array_equal(ex.run(feed)["x_next"], ort.run(feed)["x_next"])
        assert ex.last_mode == "plain"
    assert ex.graph_stats.failed_captures == 1 and ex.graph_stats.plain == 4
    assert not trt.cudart.graphs and not trt.cudart.capturing
    ex.close()


def _conditioning(manifest, seed: int, text_len: int):
    rng = np.random.default_rng(seed)
    d = manifest.dims.model_dim
    spk = rng.standard_normal((1, 32, d)).astype(np.float32)
    emo = rng.standard_normal((1, d)).astype(np.float32)
    text = rng.integers(2, manifest.dims.text_vocab, text_len).astype(np.int64)
    return spk, emo, text


UNFILTERED = {"top_k": 0, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0}


@pytest.mark.parametrize("config, requests, text_len, grows", [
    # (generation settings, (conditioning seed, sampling seed) per request on the same steps, text length,
    #  whether the cache must grow past the first bucket: prompt 137 rows + > 119 steps; seeds found by search)
    ({"do_sample": False, "num_beams": 1, "max_mel_tokens": 60}, [(0, None), (1, None)], 30, False),
    ({"do_sample": True, "num_beams": 3, "max_mel_tokens": 60}, [(0, 11), (1, 11)], 30, False),
    ({"do_sample": True, "num_beams": 1, "max_mel_tokens": 250, **UNFILTERED}, [(3, 3)], 100, True),
    ({"do_sample": True, "num_beams": 3, "max_mel_tokens": 250, "length_penalty": 1.0, **UNFILTERED}, [(2, 2)], 100,
     True),
])
def test_decode_loop_with_the_device_cache_equals_the_host_loop(fake_engines, manifest, config, requests, text_len,
                                                                 grows) -> None:
    from runtime.gpt.generate import GenerationConfig, generate
    from runtime.gpt.graph_steps import GraphGptSteps, geometry_of
    from runtime.trt.executor import TrtExecutor
    from runtime.trt.gpt_steps import TrtGptSteps

    root, trt = fake_engines
    geometry = geometry_of(manifest)
    host_steps = GraphGptSteps(_ort(root, manifest, "gpt_prefill"), _ort(root, manifest, "gpt_decode"), geometry)
    stream = cuda.Stream()
    prefill = TrtExecutor(manifest.graph("gpt_prefill"), root, "fp16", stream=stream, trt=trt)
    decode = TrtExecutor(manifest.graph("gpt_decode"), root, "fp16", stream=stream, cuda_graphs=True, trt=trt)
    steps = TrtGptSteps(prefill, decode, geometry, owned=(prefill, decode, stream))
    gen = GenerationConfig(**config)
    bindings = set()                # the device cache each request decoded from (its K/V and mask addresses)
    for conditioning, seed in requests:                     # later requests reuse the steps' buffers
        spk, emo, text = _conditioning(manifest, conditioning, text_len)
        want = generate(host_steps, {"spk_latent": spk}, emo, text, gen, seed=seed, record=True)
        replays = decode.graph_stats.replays
        got = generate(steps, {"spk_latent": spk}, emo, text, gen, seed=seed, record=True)
        np.testing.assert_array_equal(got.codes, want.codes, err_msg=f"{config} conditioning {conditioning}")
        assert got.stopped == want.stopped and got.prompt_rows == want.prompt_rows
        decode_steps = len(got.trace.logits) - 1
        assert decode_steps == len(want.trace.logits) - 1 and decode_steps > 3
        np.testing.assert_array_equal(np.stack(got.trace.logits), np.stack(want.trace.logits))
        assert decode.graph_stats.replays >= replays + decode_steps - 2 - (2 if grows else 0)
        assert (steps._cache.capacity > 256) == grows and steps._cache.version == (2 if grows else 1)
        if gen.num_beams > 1:           # recurring beam reorders were replayed as CUDA graphs (kv_device)
            assert steps._cache.reorder_stats.replays > 0
        bindings.add((steps._cache._cache.ptr, steps._cache._mask.ptr))
    stats = decode.graph_stats
    # One capture per distinct binding: a later request whose new cache landed at a freed cache's addresses
    # (the allocator may hand them out again) rightly replays that graph, so the count is per binding, not
    # per request.
    assert stats.failed_captures == 0 and stats.captures >= len(bindings)
    steps.close()
    assert not trt.cudart.device and not trt.cudart.host and not trt.cudart.execs
