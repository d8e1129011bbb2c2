"""The TensorRT executor's memory and binding rules through fakes that enforce what TensorRT and CUDA
enforce: activation memory strategies (ON_PROFILE_CHANGE, user-managed sized for the run's shapes), tensor
locations, 256-byte aligned addresses, the output allocator's per-run state, and asynchronous copies
that land only at a stream synchronisation."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from runtime.errors import BackendError, ContractError, EngineMismatchError
from runtime.trt import cuda
from runtime.trt.engine_plan import decode_buckets
from tests.trt.fakes import FakeTrt, _activation_bytes, _feed, _ort, host_view

STRATEGY = FakeTrt.ExecutionContextAllocationStrategy


def _executor(fake_engines, manifest, graph, **kw):
    from runtime.trt.executor import TrtExecutor

    root, trt = fake_engines
    return TrtExecutor(manifest.graph(graph), root, "fp16", trt=trt, **kw)


def _engine(trt, graph):
    return [e for e in trt.engines if e.entry.name == graph][-1]


# ---------------------------------------------------------------------------------------------------
# (10) activation memory


def test_each_decode_context_holds_only_its_own_profiles_memory(fake_engines, manifest, graph_kit) -> None:
    root, trt = fake_engines
    ort = _ort(root, manifest, "gpt_decode")
    ex = _executor(fake_engines, manifest, "gpt_decode")
    buckets = decode_buckets(manifest.graph("gpt_decode"))
    assert len(buckets) >= 2 and ex.memory_strategy == "ON_PROFILE_CHANGE"
    for bucket in buckets[:2]:
        feed = _feed(graph_kit, "gpt_decode", {"batch": 2, "cache_len": bucket}, 3)
        got, want = ex.run(feed), ort.run(feed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"bucket {bucket} {name}")
    engine = _engine(trt, "gpt_decode")
    assert [c.strategy for c in engine.created] == [STRATEGY.ON_PROFILE_CHANGE] * 2
    own = [engine.get_device_memory_size_for_profile_v2(i) for i in range(2)]
    assert engine.activation_bytes() == sum(own) < 2 * engine.device_memory_size_v2   # not 2x the largest
    ex.close()


def test_user_managed_memory_is_sized_for_each_runs_shapes(fake_engines, manifest, graph_kit) -> None:
    root, trt = fake_engines
    ort = _ort(root, manifest, "dit_step")
    ex = _executor(fake_engines, manifest, "dit_step", cuda_graphs=True, user_memory_min_bytes=0)
    assert ex.memory_strategy == "USER_MANAGED"
    entry, sizes, modes = manifest.graph("dit_step"), [], []
    for t, seed in [(30, 0), (30, 1), (30, 2), (90, 3), (90, 4), (90, 5), (30, 6), (30, 7)]:
        feed = _feed(graph_kit, "dit_step", {"batch": 1, "mel_len": t}, seed)
        np.testing.assert_array_equal(ex.run(feed)["x_next"], ort.run(feed)["x_next"], err_msg=f"T={t} seed={seed}")
        memory = ex._contexts[0].memory
        assert memory.needed == _activation_bytes(entry, {n: v.shape for n, v in feed.items()})
        assert memory.buffer.nbytes >= memory.needed
        sizes.append(memory.buffer.nbytes)
        modes.append(ex.last_mode)
    engine = _engine(trt, "dit_step")
    (context,) = engine.created
    assert context.strategy == STRATEGY.USER_MANAGED and engine.activation_bytes() == 0
    assert sizes[0] == sizes[1] == sizes[2] < sizes[3] == sizes[-1]            # grown once, never shrunk
    assert sizes[-1] < engine.get_device_memory_size_for_profile_v2(0)          # far below the profile maximum
    # the growth moved the activation block: the captured graph was dropped and captured again
    assert modes == ["plain", "capture", "replay", "plain", "capture", "replay", "plain", "capture"]
    ex.close()
    assert not trt.cudart.device and not trt.cudart.host


def test_small_single_profile_engines_stay_on_profile_change(fake_engines, manifest, graph_kit) -> None:
    root, _ = fake_engines
    ex = _executor(fake_engines, manifest, "campplus")          # default threshold: 64 MiB
    feed = _feed(graph_kit, "campplus", "opt")
    np.testing.assert_array_equal(ex.run(feed)["style"], _ort(root, manifest, "campplus").run(feed)["style"])
    assert ex.memory_strategy == "ON_PROFILE_CHANGE" and ex._contexts[0].memory is None
    ex.close()


def test_the_fake_runs_a_user_managed_context_only_with_enough_memory(fake_engines, manifest, graph_kit) -> None:
    root, _ = fake_engines
    ex = _executor(fake_engines, manifest, "campplus")
    engine = ex._engine
    ctx = engine.create_execution_context(STRATEGY.USER_MANAGED)
    stream = cuda.Stream()
    ctx.set_optimization_profile_async(0, stream.handle)
    feed = _feed(graph_kit, "campplus", "opt")
    want = _ort(root, manifest, "campplus").run(feed)["style"]
    assert ctx.update_device_memory_size_for_shapes() == 0                # no shapes yet: "0 if error"
    buffers = {name: cuda.DeviceBuffer(value.nbytes) for name, value in (("fbank", feed["fbank"]), ("style", want))}
    for name, buf in buffers.items():
        assert ctx.set_tensor_address(name, buf.ptr)
    host_view(buffers["fbank"].ptr, feed["fbank"].shape)[...] = feed["fbank"]
    assert ctx.set_input_shape("fbank", feed["fbank"].shape)
    assert not ctx.execute_async_v3(stream.handle)                        # no memory given
    need = ctx.update_device_memory_size_for_shapes()
    small = cuda.DeviceBuffer(need - 256)
    ctx.set_device_memory(small.ptr, small.nbytes)
    assert not ctx.execute_async_v3(stream.handle)                        # too little
    block = cuda.DeviceBuffer(need)
    ctx.set_device_memory(block.ptr, block.nbytes)
    assert ctx.execute_async_v3(stream.handle)
    stream.sync()
    np.testing.assert_array_equal(host_view(buffers["style"].ptr, want.shape), want)
    for buf in (*buffers.values(), small, block):
        buf.close()
    stream.close()
    ex.close()


# ---------------------------------------------------------------------------------------------------
# (11) tensor locations


def test_an_input_tensorrt_wants_on_the_host_is_refused_at_load(fake_engines, manifest) -> None:
    _, trt = fake_engines
    trt.host_inputs = {"ylens"}
    with pytest.raises(EngineMismatchError) as err:
        _executor(fake_engines, manifest, "length_regulator")
    message = str(err.value)
    assert "length_regulator.fp16.plan: TensorRT wants input(s) ['ylens'] on the host" in message
    assert "set_shape_input" in message and "re-export and rebuild" in message


def test_input_locations_are_logged_on_load(fake_engines, manifest, caplog) -> None:
    _, trt = fake_engines
    trt.shape_io = {"ylens"}
    with caplog.at_level(logging.INFO, logger="runtime.trt.executor"):
        ex = _executor(fake_engines, manifest, "length_regulator")
    assert "length_regulator: input 'ylens' location DEVICE, shape-inference input True" in caplog.text
    assert "length_regulator: input 's' location DEVICE, shape-inference input False" in caplog.text
    ex.close()


def test_the_fake_enforces_alignment_and_location(fake_engines, manifest) -> None:
    _, trt = fake_engines
    ex = _executor(fake_engines, manifest, "length_regulator")
    ctx = ex._engine.create_execution_context()
    buf = cuda.DeviceBuffer(4096)
    assert buf.ptr % 256 == 0                                            # cudaMalloc's alignment
    assert ctx.set_tensor_address("s", buf.ptr) and ctx.set_tensor_address("s", buf.ptr + 256)
    assert not ctx.set_tensor_address("s", buf.ptr + 4)                  # "at least 256-byte alignment"
    assert not ctx.set_tensor_address("no_such_tensor", buf.ptr)
    trt.host_inputs = {"ylens"}
    assert not ctx.set_tensor_address("ylens", buf.ptr)                  # a device pointer for a HOST tensor
    host = np.zeros(4, np.int64)
    assert ctx.set_tensor_address("ylens", host.ctypes.data)
    buf.close()
    ex.close()


def test_a_misaligned_device_array_is_a_contract_error(fake_engines, manifest, graph_kit) -> None:
    ex = _executor(fake_engines, manifest, "gpt_decode")
    feed = _feed(graph_kit, "gpt_decode", {"batch": 1, "cache_len": decode_buckets(ex.entry)[0]}, 1)
    kv = feed["kv_cache.0"]
    buf = cuda.DeviceBuffer(kv.nbytes + 256)
    with pytest.raises(ContractError, match=r"device input 'kv_cache.0' at address 0x[0-9a-f]+ is not 256-byte "
                                            r"aligned \(offset 16\)"):
        ex.run({**feed, "kv_cache.0": cuda.DeviceArray(buf.ptr + 16, kv.shape, np.float32)})
    out = cuda.DeviceBuffer(4096 * 64)
    with pytest.raises(ContractError, match="device output 'kv_new' at address"):
        ex.run(feed, outputs={"kv_new": cuda.DeviceArray(out.ptr + 4, _kv_new_shape(manifest, 1), np.float32)})
    ex.close()
    buf.close()
    out.close()


def _kv_new_shape(manifest, batch):
    d = manifest.dims
    return (d.layers, 2, batch, d.heads, 1, d.head_dim)


# ---------------------------------------------------------------------------------------------------
# (13) the output allocator


def test_the_output_allocator_overrides_only_the_async_reallocation(fake_engines) -> None:
    from runtime.trt.output_allocator import output_allocator_class

    _, trt = fake_engines
    cls = output_allocator_class(trt)
    assert "reallocate_output_async" in cls.__dict__ and "reallocate_output" not in cls.__dict__
    alloc = cls("cond", 0, "a test")
    trt.cudart.fail_mallocs = 1
    assert alloc.reallocate_output_async("cond", 0, 1000, 256, 0) == 0      # a null pointer, not None
    assert "out of memory" in str(alloc.error)
    alloc.begin_run()
    assert alloc.error is None and alloc.shape is None
    ptr = alloc.reallocate_output_async("cond", 0, 1000, 256, 0)
    assert ptr and ptr % 256 == 0 and alloc.buffer.nbytes >= 1000
    alloc.close()


def test_one_failed_growth_does_not_fail_later_runs(fake_engines, manifest, graph_kit) -> None:
    root, trt = fake_engines
    ort = _ort(root, manifest, "length_regulator")
    ex = _executor(fake_engines, manifest, "length_regulator")
    feed = _feed(graph_kit, "length_regulator", {"batch": 1, "seq_len": 9}, 0)
    small = {**feed, "ylens": np.array([12], np.int64)}
    large = {**feed, "ylens": np.array([13000], np.int64)}    # past the preallocated 4 x 3200 frames
    np.testing.assert_array_equal(ex.run(small)["cond"], ort.run(small)["cond"])
    trt.cudart.fail_mallocs = 1
    with pytest.raises(BackendError, match="execute_async_v3 failed: cudaMalloc.*out of memory"):
        ex.run(large)
    for run in (small, large, small):                                     # the failure does not stick
        got = ex.run(run)["cond"]
        assert got.shape == (1, int(run["ylens"][0]), manifest.dims.content_dim)
        np.testing.assert_array_equal(got, ort.run(run)["cond"])
    ex.close()
    assert not trt.cudart.device and not trt.cudart.host


# ---------------------------------------------------------------------------------------------------
# (16) asynchronous copies land at the synchronisation


def test_async_copies_land_only_at_the_stream_sync(fake_cuda) -> None:
    stream = cuda.Stream()
    device = cuda.DeviceBuffer(64)
    data = np.arange(16, dtype=np.float32)
    cuda.memcpy_htod_async(device.ptr, data.ctypes.data, data.nbytes, stream)
    assert not np.array_equal(host_view(device.ptr, (16,)), data)       # still in flight
    with pytest.raises(AssertionError, match="queued work on stream"):
        fake_cuda.cudaFree(device.ptr)                                   # freeing what a copy still writes
    stream.sync()
    np.testing.assert_array_equal(host_view(device.ptr, (16,)), data)
    device.close()
    stream.close()


def test_a_missing_sync_fails_the_executor(fake_engines, manifest, graph_kit) -> None:
    root, _ = fake_engines
    ex = _executor(fake_engines, manifest, "campplus")
    feed = _feed(graph_kit, "campplus", "opt")
    want = _ort(root, manifest, "campplus").run(feed)["style"]
    np.testing.assert_array_equal(ex.run(feed)["style"], want)
    real_sync = ex.stream.sync
    ex.stream.sync = lambda: None                                        # the read-back's sync forgotten
    try:
        assert not np.array_equal(ex.run(_feed(graph_kit, "campplus", "opt", 5))["style"],
                                  _ort(root, manifest, "campplus").run(_feed(graph_kit, "campplus", "opt", 5))["style"])
    finally:
        ex.stream.sync = real_sync
    ex.close()
