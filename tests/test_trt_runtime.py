"""The TensorRT executor side on the CPU (no GPU, no tensorrt here): cuda-python error handling, the CUDA
graph policy, the device KV cache's copy planning against the host KVCache, engine refusal, profile
choice, and the executor / decode loop driven through fakes.

The fakes: `FakeCudart` stands in for cuda.bindings.runtime with host memory (ctypes allocations filled
with garbage, every copy bounds-checked against live allocations, stream capture recording the work
into a replayable "graph"); `FakeTrt` stands in for tensorrt with engines that run the tiny export's
ONNX graph in ONNX Runtime on whatever the bound addresses hold. So the executor's buffers, staging,
bindings, output allocator, CUDA-graph policy and the device cache run unchanged, and their results are
compared with ONNX Runtime / the host cache exactly.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime import cuda, gpu
from runtime.cuda_graphs import GraphCache
from runtime.engine_plan import (EngineKey, GpuInfo, PlanRecord, decode_buckets, engine_profiles, plan_paths,
                                 write_record)
from runtime.errors import BackendError, CheckpointError, ContractError, EngineMismatchError
from runtime.kv_cache import KVCache
from runtime.kv_device import (CACHE, KV_NEW, MASK, OLD_CACHE, OLD_MASK, ONES, SPARE, DeviceKVCache, KVLayout,
                               apply_numpy, plan_append, plan_grow, plan_load_prefill, plan_reorder)
from runtime.manifest import read_manifest

RTX3090 = GpuInfo("NVIDIA GeForce RTX 3090", "8.6")
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
TRT_VERSION = "10.13.0.35"


# ---------------------------------------------------------------------------------------------------
# Fake cuda-python runtime (host memory)


class FakeCudart:
    """cuda.bindings.runtime over host memory: every call returns (cudaError_t, ...) like the real one."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2
        cudaErrorInsufficientDriver = 35
        cudaErrorStreamCaptureInvalidated = 901

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3
        cudaMemcpyDefault = 4

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1
        cudaStreamCaptureModeRelaxed = 2

    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        self.device: dict[int, ctypes.Array] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.capturing: dict[int, list] = {}
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.invalidate_captures = False
        self.copies = 0
        self._ids = itertools.count(1000)

    OK = cudaError_t.cudaSuccess

    # errors
    def cudaGetErrorName(self, err):
        return self.OK, self.cudaError_t(int(err)).name.encode()

    def cudaGetErrorString(self, err):
        return self.OK, {2: b"out of memory", 35: b"CUDA driver version is insufficient for CUDA runtime version",
                         901: b"operation failed due to a previous error during capture"}.get(int(err), b"bad")

    def cudaGetLastError(self):
        return (self.OK,)

    # memory
    def _alloc(self, table, n):
        buf = (ctypes.c_ubyte * n)()
        ctypes.memset(buf, 0xAB, n)                  # cudaMalloc does not zero: garbage shows a missed clear
        ptr = ctypes.addressof(buf)
        table[ptr] = buf
        return self.OK, ptr

    def cudaMalloc(self, n):
        return self._alloc(self.device, n)

    def cudaMallocHost(self, n):
        return self._alloc(self.host, n)

    def cudaFree(self, ptr):
        return (self.OK,) if self.device.pop(ptr, None) is not None else (self.cudaError_t.cudaErrorInvalidValue,)

    def cudaFreeHost(self, ptr):
        return (self.OK,) if self.host.pop(ptr, None) is not None else (self.cudaError_t.cudaErrorInvalidValue,)

    def inside(self, table, ptr, n) -> bool:
        return any(p <= ptr and ptr + n <= p + len(b) for p, b in table.items())

    def _check(self, ptr, n, device: bool, what: str) -> None:
        if device:
            assert self.inside(self.device, ptr, n), f"{what}: [{ptr}, +{n}) is not inside a live device allocation"
        else:
            assert not self.inside(self.device, ptr, 1), f"{what}: a device pointer used as a host pointer"

    def _sides(self, kind):
        k = self.cudaMemcpyKind(int(kind))
        return {0: (False, False), 1: (False, True), 2: (True, False), 3: (True, True)}[int(k)]

    def _enqueue(self, stream, work) -> None:
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(work)
        else:
            work()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        return self.cudaMemcpy2DAsync(dst, n, src, n, n, 1, kind, stream)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        if width > dpitch or width > spitch:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        src_dev, dst_dev = self._sides(kind)
        span = lambda pitch: (height - 1) * pitch + width  # noqa: E731
        self._check(src, span(spitch), src_dev, "copy source")
        self._check(dst, span(dpitch), dst_dev, "copy destination")
        self.copies += 1

        def work():
            for r in range(height):
                ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self._enqueue(stream, work)
        return (self.OK,)

    def cudaMemsetAsync(self, ptr, value, n, stream):
        self._check(ptr, n, True, "memset")
        self._enqueue(stream, lambda: ctypes.memset(ptr, value, n))
        return (self.OK,)

    # streams, events
    def cudaStreamCreateWithFlags(self, flags):
        return self.OK, next(self._ids)

    def cudaStreamSynchronize(self, stream):
        assert int(stream) not in self.capturing, "synchronising a capturing stream"
        return (self.OK,)

    def cudaStreamDestroy(self, stream):
        return (self.OK,)

    def cudaEventCreate(self):
        return self.OK, next(self._ids)

    def cudaEventRecord(self, event, stream):
        return (self.OK,)

    def cudaEventSynchronize(self, event):
        return (self.OK,)

    def cudaEventElapsedTime(self, start, end):
        return self.OK, 0.25

    def cudaEventDestroy(self, event):
        return (self.OK,)

    # graphs
    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = []
        return (self.OK,)

    def cudaStreamEndCapture(self, stream):
        work = self.capturing.pop(int(stream))
        if self.invalidate_captures:
            return self.cudaError_t.cudaErrorStreamCaptureInvalidated, None
        graph = next(self._ids)
        self.graphs[graph] = work
        return self.OK, graph

    def cudaGraphInstantiate(self, graph, flags):
        exec_ = next(self._ids)
        self.execs[exec_] = list(self.graphs[graph])
        return self.OK, exec_

    def cudaGraphLaunch(self, exec_, stream):
        for work in self.execs[exec_]:
            work()
        return (self.OK,)

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(graph)
        return (self.OK,)

    def cudaGraphExecDestroy(self, exec_):
        self.execs.pop(exec_)
        return (self.OK,)


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    return fake


def host_view(ptr: int, shape, dtype=np.float32) -> np.ndarray:
    """Fake device memory as numpy (it is host memory)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_ubyte * max(n, 1)).from_address(ptr), np.uint8)[:n].view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# runtime.cuda


def test_check_unwraps_results_and_names_failures(fake_cuda) -> None:
    ok = FakeCudart.OK
    assert cuda.check((ok,), "x") is None
    assert cuda.check((ok, 7), "x") == 7
    assert cuda.check((ok, 1, 2), "x") == (1, 2)
    with pytest.raises(BackendError) as err:
        cuda.check((FakeCudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc(64 bytes for 'x')")
    assert str(err.value).startswith("cudaMalloc(64 bytes for 'x') failed: cudaErrorMemoryAllocation (out of memory)")
    assert "out of memory" in str(err.value).split(";", 1)[1]


def test_a_device_buffer_without_a_usable_gpu_is_a_clear_backend_error() -> None:
    """Real cuda-python on this machine (no driver): an error code, turned into one clear message."""
    if gpu.cudart() is None:
        pytest.skip("cuda-python is not installed")
    if gpu.cuda_devices().ok:
        pytest.skip("this machine has a usable CUDA GPU")
    with pytest.raises(BackendError) as err:
        cuda.DeviceBuffer(16, "a test")
    message = str(err.value)
    assert message.startswith("cudaMalloc(16 bytes for a test) failed: cudaError"), message
    assert "Traceback" not in message and err.value.__cause__ is None and err.value.__context__ is None
    if "cudaErrorInsufficientDriver" in message:
        assert "CUDA driver version is insufficient" in message and "NVIDIA GPU" in message
    with pytest.raises(BackendError, match=r"cudaStreamCreateWithFlags failed: cudaError"):
        cuda.Stream()


def test_device_array_views(fake_cuda) -> None:
    buf = cuda.DeviceBuffer(2 * 3 * 4 * 4)
    whole = buf.array((2, 3, 4), np.float32)
    assert whole.nbytes == 96 and whole.offset(1) == 48 and whole.offset(1, 2) == 48 + 32
    assert whole.at(1) == cuda.DeviceArray(buf.ptr + 48, (3, 4), np.float32)
    with pytest.raises(IndexError):
        whole.offset(2)
    with pytest.raises(ValueError, match="does not fit"):
        buf.array((2, 3, 5), np.float32)
    buf.close()
    assert buf.closed and not fake_cuda.device
    pinned = cuda.PinnedBuffer(8)
    pinned.view(np.float16, (4,))[:] = 1.5                  # float16: no ctypes type needed
    assert pinned.bytes().view(np.float16).tolist() == [1.5] * 4
    pinned.close()
    assert not fake_cuda.host


# ---------------------------------------------------------------------------------------------------
# CUDA graph policy


class GraphLog:
    def __init__(self, fail_keys=()) -> None:
        self.events: list[tuple] = []
        self.fail_keys = set(fail_keys)
        self.ids = itertools.count()

    def capture(self, key):
        if key in self.fail_keys:
            self.events.append(("capture-failed", key))
            raise BackendError("execute_async_v3 returned False under stream capture")
        exec_ = (key, next(self.ids))
        self.events.append(("capture", key))
        return exec_

    def launch(self, exec_):
        self.events.append(("launch", exec_))

    def destroy(self, exec_):
        self.events.append(("destroy", exec_))

    def plain(self, key):
        return lambda: self.events.append(("plain", key))


def test_graph_policy_warm_up_capture_then_replay() -> None:
    g = GraphLog()
    cache = GraphCache(4, g.capture, g.launch, g.destroy)
    key = ("dit_step", 0, (("x", (1, 80, 10), 1234),))
    assert [cache.run(key, g.plain(key)) for _ in range(4)] == ["plain", "capture", "replay", "replay"]
    exec_ = (key, 0)
    assert g.events == [("plain", key), ("capture", key), ("launch", exec_), ("launch", exec_), ("launch", exec_)]
    assert (cache.stats.plain, cache.stats.captures, cache.stats.replays) == (1, 1, 2)
    other = ("dit_step", 0, (("x", (1, 80, 11), 1234),))
    assert cache.run(other, g.plain(other)) == "plain"         # a new shape warms up first
    assert cache.state(key) == "graph" and cache.state(other) == "warm"


def test_a_failed_capture_falls_back_to_plain_runs_for_good() -> None:
    bad = ("gpt_decode", 1, ())
    g = GraphLog(fail_keys=[bad])
    cache = GraphCache(4, g.capture, g.launch, g.destroy)
    assert [cache.run(bad, g.plain(bad)) for _ in range(5)] == ["plain"] * 5
    assert [e[0] for e in g.events] == ["plain", "capture-failed", "plain", "plain", "plain", "plain"]
    assert cache.stats.failed_captures == 1 and cache.stats.plain == 5 and len(cache) == 0
    assert cache.state(bad) == "uncapturable"
    assert cache.invalidate(("gpt_decode",)) == 0 and cache.state(bad) == "uncapturable"


def test_graph_eviction_is_lru_and_destroys() -> None:
    g = GraphLog()
    cache = GraphCache(2, g.capture, g.launch, g.destroy)
    keys = [("g", i, ()) for i in range(3)]
    for key in keys[:2]:
        cache.run(key, g.plain(key))
        cache.run(key, g.plain(key))
    cache.run(keys[0], g.plain(keys[0]))                       # key 0 is now the most recently used
    cache.run(keys[2], g.plain(keys[2]))
    cache.run(keys[2], g.plain(keys[2]))                       # third executable: evicts key 1
    assert ("destroy", (keys[1], 1)) in g.events
    assert keys[0] in cache and keys[2] in cache and keys[1] not in cache
    assert cache.stats.evictions == 1
    assert cache.run(keys[1], g.plain(keys[1])) == "plain"     # evicted: warm-up again
    assert cache.invalidate(("g", 0)) == 1 and keys[0] not in cache and cache.state(keys[0]) is None
    cache.clear()
    assert len(cache) == 0 and g.events[-1] == ("destroy", (keys[2], 2))
    with pytest.raises(ValueError):
        GraphCache(0, g.capture, g.launch, g.destroy)


# ---------------------------------------------------------------------------------------------------
# Device KV cache: copy planning executed with numpy vs the host KVCache


def _regions(layout: KVLayout, cache: KVCache, **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {CACHE: cache.buffer.copy().reshape(-1).view(np.uint8), MASK: cache.mask.copy().reshape(-1).view(np.uint8),
            ONES: np.ones(layout.batch * layout.capacity, np.float32).view(np.uint8),
            SPARE: np.full(layout.spare_bytes, 0xAB, np.uint8),
            **{k: np.ascontiguousarray(v).reshape(-1).view(np.uint8) for k, v in extra.items()}}


def _assert_same(regions: dict[str, np.ndarray], cache: KVCache, where: str) -> None:
    got_cache = regions[CACHE].view(np.float32).reshape(cache.buffer.shape)
    got_mask = regions[MASK].view(np.float32).reshape(cache.mask.shape)
    np.testing.assert_array_equal(got_cache, cache.buffer, err_msg=where)
    np.testing.assert_array_equal(got_mask, cache.mask, err_msg=where)


def _geometries(rng: np.random.Generator, n: int):
    for _ in range(n):
        yield (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 5)))


def test_planned_prefill_and_appends_equal_the_host_cache() -> None:
    rng = np.random.default_rng(0)
    for layers, heads, head_dim, batch in _geometries(rng, 12):
        for src_batch in sorted({1, batch}):
            rows = int(rng.integers(1, 8))
            kv = rng.standard_normal((layers, 2, src_batch, heads, rows, head_dim)).astype(np.float32)
            host = KVCache.from_prefill(kv, batch, 40, buckets=(8, 16, 40))
            layout = KVLayout(layers, heads, head_dim, batch, host.capacity)
            regions = _regions(layout, KVCache(layers, heads, head_dim, batch, 40, buckets=(8, 16, 40), rows=rows),
                               prefill=kv)
            apply_numpy(plan_load_prefill(layout, rows, src_batch), regions)
            _assert_same(regions, host, f"prefill {layers, heads, head_dim, batch, src_batch, rows}")
            for row in range(rows, layout.capacity):
                kv_new = rng.standard_normal((layers, 2, batch, heads, 1, head_dim)).astype(np.float32)
                host.write(kv_new, row)
                regions[KV_NEW] = kv_new.reshape(-1).view(np.uint8)
                apply_numpy(plan_append(layout, row), regions)
                _assert_same(regions, host, f"append at row {row}")


def _beam_indices(rng: np.random.Generator, batch: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:
        return rng.permutation(batch)                        # permutations: cycles need the spare slot
    if kind == 1:
        return np.roll(np.arange(batch), int(rng.integers(1, batch + 1)))    # one long cycle
    return rng.integers(0, batch, batch)                     # beam sampling: duplicates and drops


def test_planned_reorders_equal_the_host_cache() -> None:
    rng = np.random.default_rng(1)
    for layers, heads, head_dim, batch in _geometries(rng, 20):
        rows = int(rng.integers(1, 6))
        kv = rng.standard_normal((layers, 2, batch, heads, rows, head_dim)).astype(np.float32)
        host = KVCache.from_prefill(kv, batch, 16, buckets=(8, 16))
        layout = KVLayout(layers, heads, head_dim, batch, host.capacity)
        regions = _regions(layout, host)
        for step in range(6):
            indices = _beam_indices(rng, batch)
            host.reorder(indices)
            ops = plan_reorder(layout, indices, host.length)
            apply_numpy(ops, regions)
            _assert_same(regions, host, f"reorder {indices.tolist()} at step {step}")
            kv_new = rng.standard_normal((layers, 2, batch, heads, 1, head_dim)).astype(np.float32)
            if host.length < layout.capacity:
                regions[KV_NEW] = kv_new.reshape(-1).view(np.uint8)
                apply_numpy(plan_append(layout, host.length), regions)
                host.append(kv_new)
                _assert_same(regions, host, f"append after reorder {step}")
    assert plan_reorder(layout, np.arange(layout.batch), 3) == []          # identity: no copies
    with pytest.raises(ValueError):
        plan_reorder(layout, np.arange(layout.batch + 1), 3)


def test_planned_growth_across_buckets_equals_the_host_cache() -> None:
    rng = np.random.default_rng(2)
    for layers, heads, head_dim, batch in _geometries(rng, 10):
        buckets = (4, 8, 16)
        rows = int(rng.integers(1, 4))
        kv = rng.standard_normal((layers, 2, 1, heads, rows, head_dim)).astype(np.float32)
        host = KVCache.from_prefill(kv, batch, 16, buckets=buckets)
        layout = KVLayout(layers, heads, head_dim, batch, host.capacity)
        regions = _regions(layout, host)
        grew = 0
        while host.length < 16:
            kv_new = rng.standard_normal((layers, 2, batch, heads, 1, head_dim)).astype(np.float32)
            if host.length >= layout.capacity:               # the host grows inside append
                old_layout, n = layout, host.length
                host.append(kv_new)
                layout = KVLayout(layers, heads, head_dim, batch, host.capacity)
                new = {CACHE: np.full(layout.cache_bytes, 0xAB, np.uint8),
                       MASK: np.full(layout.mask_bytes, 0xCD, np.uint8),
                       OLD_CACHE: regions[CACHE], OLD_MASK: regions[MASK],
                       ONES: np.ones(layout.batch * layout.capacity, np.float32).view(np.uint8),
                       KV_NEW: kv_new.reshape(-1).view(np.uint8)}
                apply_numpy(plan_grow(old_layout, layout, n), new)
                apply_numpy(plan_append(layout, n), new)
                regions = {CACHE: new[CACHE], MASK: new[MASK], ONES: new[ONES]}
                grew += 1
            else:
                regions[KV_NEW] = kv_new.reshape(-1).view(np.uint8)
                apply_numpy(plan_append(layout, host.length), regions)
                host.append(kv_new)
            _assert_same(regions, host, f"length {host.length}, capacity {layout.capacity}")
            if host.length > 1 and rng.random() < 0.3:
                indices = _beam_indices(rng, batch)
                regions[SPARE] = np.zeros(layout.spare_bytes, np.uint8)
                apply_numpy(plan_reorder(layout, indices, host.length), regions)
                host.reorder(indices)
                _assert_same(regions, host, "reorder after growth")
        assert grew >= 2


def test_every_planned_copy_stays_inside_its_regions() -> None:
    layout = KVLayout(2, 3, 4, 2, 8)
    with pytest.raises(ValueError, match="outside a cache"):
        plan_append(layout, 8)
    with pytest.raises(ValueError, match="exceed region"):
        apply_numpy(plan_append(layout, 7), {CACHE: np.zeros(layout.cache_bytes - 1, np.uint8),
                                             MASK: np.zeros(layout.mask_bytes, np.uint8),
                                             KV_NEW: np.zeros(layout.rows * layout.row_bytes, np.uint8),
                                             ONES: np.zeros(layout.ones_bytes, np.uint8)})
    with pytest.raises(ValueError, match="prefill batch 3"):
        plan_load_prefill(KVLayout(2, 3, 4, 4, 8), 2, 3)


# ---------------------------------------------------------------------------------------------------
# Device KV cache class through the fake cudart vs the host KVCache


def _compare_device(device: DeviceKVCache, host: KVCache, where: str) -> None:
    cache, mask = device.download()
    assert (device.length, device.capacity, device.version) == (host.length, host.capacity, host.version), where
    np.testing.assert_array_equal(cache, host.buffer, err_msg=where)
    np.testing.assert_array_equal(mask, host.mask, err_msg=where)


@pytest.mark.parametrize("seed", range(6))
def test_device_cache_mirrors_the_host_cache(fake_cuda, seed) -> None:
    rng = np.random.default_rng(100 + seed)
    layers, heads, head_dim, batch = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 5)),
                                      int(rng.integers(1, 5)))
    buckets, max_rows = (8, 16, 32), 32
    rows = int(rng.integers(1, 10))                        # may start past the first bucket
    kv = rng.standard_normal((layers, 2, int(rng.choice([1, batch])), heads, rows, head_dim)).astype(np.float32)
    stream = cuda.Stream()
    kv_dev = cuda.DeviceBuffer(kv.nbytes)
    host_view(kv_dev.ptr, kv.shape)[...] = kv
    device = DeviceKVCache.from_prefill(kv_dev.array(kv.shape), batch, max_rows, buckets, stream=stream)
    host = KVCache.from_prefill(kv, batch, max_rows, buckets)
    _compare_device(device, host, "prefill")
    feeds = device.feeds()
    assert feeds["kv_cache.0"].shape == (2, batch, heads, device.capacity, head_dim)
    assert feeds[f"kv_cache.{layers - 1}"].ptr == device.buffer.ptr + (layers - 1) * device.layout.layer_bytes
    assert feeds["kv_mask"].shape == (batch, device.capacity)
    kv_new_dev = cuda.DeviceBuffer(layers * 2 * batch * heads * head_dim * 4)
    shape = (layers, 2, batch, heads, 1, head_dim)
    while host.length < max_rows:
        kv_new = rng.standard_normal(shape).astype(np.float32)
        host_view(kv_new_dev.ptr, shape)[...] = kv_new
        device.append(kv_new_dev.array(shape))
        host.append(kv_new)
        if rng.random() < 0.5:
            indices = _beam_indices(rng, batch)
            device.reorder(indices)
            host.reorder(indices)
        _compare_device(device, host, f"length {host.length}")
    with pytest.raises(ValueError, match="sized for 32"):
        device.append(kv_new_dev.array(shape))
    with pytest.raises(ContractError, match="kv_new is float32"):
        device.append(cuda.DeviceArray(kv_new_dev.ptr, (layers, 2, batch + 1, heads, 1, head_dim), np.float32))
    device.close()
    kv_dev.close()
    kv_new_dev.close()
    assert not fake_cuda.device and not fake_cuda.host      # every allocation freed


def test_device_cache_refuses_to_grow_past_the_largest_bucket(fake_cuda) -> None:
    kv = np.zeros((1, 2, 1, 1, 6, 2), np.float32)
    device = DeviceKVCache.from_prefill(kv, 2, 100, (8,))      # host source: copied, then synchronised
    new = np.ones((1, 2, 2, 1, 1, 2), np.float32)
    device.append(new)
    device.append(new)
    with pytest.raises(ContractError, match=r"largest cache bucket \(8"):
        device.append(new)
    cache, mask = device.download()                         # a refused growth leaves the cache as it was
    assert device.length == 8 and mask.sum() == 16 and cache[:, :, :, :, 6:].min() == 1
    device.close()


# ---------------------------------------------------------------------------------------------------
# Engine refusal and profile choice (real tiny manifest)


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


def _write_plan(root: Path, entry, precision: str, gpu_info: GpuInfo, trt_version: str, policy: str = "p") -> Path:
    plan, sidecar = plan_paths(root, entry.name, precision)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(json.dumps({"graph": entry.name}).encode())
    key = EngineKey(entry.name, entry.sha256, precision, engine_profiles(entry), trt_version, gpu_info, policy)
    write_record(sidecar, PlanRecord(key, "0" * 64))
    return plan


def test_an_engine_built_for_another_gpu_and_tensorrt_is_refused(manifest, tmp_path, monkeypatch) -> None:
    from runtime.executors.trt import TrtExecutor

    entry = manifest.graph("dit_step")
    _write_plan(tmp_path, entry, "fp16", A100, "10.4.0.26")
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: RTX3090)
    monkeypatch.setattr(gpu, "import_tensorrt", lambda: SimpleNamespace(__version__=TRT_VERSION))
    with pytest.raises(EngineMismatchError) as err:
        TrtExecutor(entry, tmp_path, "fp16")
    message = str(err.value)
    assert "dit_step.fp16.plan: this engine cannot run here" in message
    assert "built for NVIDIA A100-SXM4-80GB (compute capability 8.0), this GPU is NVIDIA GeForce RTX 3090" in message
    assert "built with TensorRT 10.4.0.26, this is TensorRT 10.13.0.35" in message
    assert "Rebuild it on this machine with python -m export.build" in message


def _fake_tensorrt(version: str) -> SimpleNamespace:
    """A stand-in `tensorrt` module for sys.modules (importlib's find_spec needs a __spec__)."""
    return SimpleNamespace(__version__=version, __spec__=SimpleNamespace(name="tensorrt"))


def test_missing_plan_tensorrt_or_gpu_are_clear(manifest, tmp_path, monkeypatch) -> None:
    from runtime.executors.trt import TrtExecutor

    entry = manifest.graph("bigvgan")
    with pytest.raises(CheckpointError, match=r"no fp32 TensorRT engine at .*bigvgan\.fp32\.plan; build .* "
                                              r"python -m export\.build .* --precision fp32"):
        TrtExecutor(entry, tmp_path, "fp32")
    _write_plan(tmp_path, entry, "fp32", RTX3090, TRT_VERSION)
    monkeypatch.setitem(sys.modules, "tensorrt", None)             # import tensorrt -> ImportError
    with pytest.raises(BackendError, match="tensorrt is not installed: pip install 'tensorrt>=10,<11'"):
        TrtExecutor(entry, tmp_path, "fp32")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.1.0"))
    with pytest.raises(BackendError, match=r"TensorRT 11\.1\.0 is installed; .* written for TensorRT 10"):
        TrtExecutor(entry, tmp_path, "fp32")
    assert not gpu.tensorrt().ok and "written for TensorRT 10" in gpu.tensorrt().detail
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(TRT_VERSION))
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: None)
    with pytest.raises(BackendError, match="no usable CUDA GPU"):
        TrtExecutor(entry, tmp_path, "fp32")


def test_profile_choice_on_the_tiny_manifest(manifest) -> None:
    from runtime.executors.trt import (data_dependent_outputs, profile_max_bytes, select_profile)

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
    assert f"min (2, 1, 4, {buckets[0]}, 16) .. max (2, 4, 4, {buckets[0]}, 16)" in text
    with pytest.raises(ContractError, match=r"'mel_ids' shape \(5, 1\) is outside min \(1, 1\) \.\. max \(4, 1\)"):
        select_profile("gpt_decode", profiles, decode_shapes(5, buckets[0]))

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
    assert nbytes["kv_cache.0"] == 2 * 4 * dims.heads * buckets[1] * dims.head_dim * 4
    assert nbytes["logits"] == 4 * dims.vocab * 4 and nbytes["mel_ids"] == 4 * 8
    cond = profile_max_bytes(manifest.graph("length_regulator"), engine_profiles(manifest.graph("length_regulator"))[0])
    assert cond["cond"] == 4 * 3200 * dims.content_dim * 4            # the range maximum of the data-dependent axis


# ---------------------------------------------------------------------------------------------------
# Fake TensorRT over ONNX Runtime: the executor and the decode loop end to end


class FakeTrt:
    """tensorrt as far as the executor uses it; engines run the export's ONNX graph in ONNX Runtime."""

    __version__ = TRT_VERSION

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class ILogger:
        def __init__(self) -> None:
            pass

    class IOutputAllocator:
        def __init__(self) -> None:
            pass

    def __init__(self, manifest, root: Path, cudart: FakeCudart, capturable: bool = True) -> None:
        self.manifest, self.root, self.cudart, self.capturable = manifest, root, cudart, capturable
        self.executions = 0
        self.sessions: dict = {}

    @staticmethod
    def nptype(dtype):
        return dtype

    def Runtime(self, logger):  # noqa: N802 — tensorrt's spelling
        fake = self

        class _Runtime:
            def deserialize_cuda_engine(self, data: bytes):
                return FakeEngine(fake, fake.manifest.graph(json.loads(bytes(data))["graph"]))
        return _Runtime()

    def session(self, entry):
        import onnxruntime as ort

        if entry.name not in self.sessions:
            self.sessions[entry.name] = ort.InferenceSession(str(entry.path(self.root)),
                                                             providers=["CPUExecutionProvider"])
        return self.sessions[entry.name]


class FakeEngine:
    def __init__(self, trt: FakeTrt, entry) -> None:
        self.trt, self.entry = trt, entry
        self.names = [t.name for t in (*entry.inputs, *entry.outputs)]
        self.inputs = {t.name for t in entry.inputs}
        self.dtypes = {t.name: np.dtype(t.dtype) for t in (*entry.inputs, *entry.outputs)}
        self.profiles = engine_profiles(entry)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(self.profiles)
        self.contexts = 0

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if name in self.inputs else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        self.contexts += 1
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.profile = engine, None
        self.shapes: dict = {}
        self.addresses: dict = {}
        self.allocators: dict = {}
        self.shape_calls = 0

    def set_optimization_profile_async(self, index, stream):
        self.profile = self.engine.profiles[index]
        self.shapes.clear()
        return True

    def set_input_shape(self, name, shape):
        (ip,) = [i for i in self.profile.inputs if i.name == name]
        if len(shape) != len(ip.min) or any(not lo <= v <= hi for v, lo, hi in zip(shape, ip.min, ip.max)):
            return False
        self.shapes[name] = tuple(shape)
        self.shape_calls += 1
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)
        return True

    def set_output_allocator(self, name, allocator):
        self.allocators[name] = allocator
        return True

    def _sizes(self) -> dict:
        sizes = {}
        for spec in self.engine.entry.inputs:
            for d, v in zip(spec.shape, self.shapes[spec.name]):
                if isinstance(d, str):
                    sizes[d] = v
        return sizes

    def get_tensor_shape(self, name):
        spec = next(t for t in self.engine.entry.outputs if t.name == name)
        try:
            return spec.concrete(self._sizes())
        except KeyError:
            return tuple(-1 if isinstance(d, str) else d for d in spec.shape)

    def execute_async_v3(self, stream):
        cudart, trt = self.engine.trt.cudart, self.engine.trt
        capturing = int(stream) in cudart.capturing
        if capturing and not trt.capturable:
            return False
        entry = self.engine.entry
        shapes, addresses = dict(self.shapes), dict(self.addresses)      # baked in, as in a CUDA graph
        if set(shapes) != self.engine.inputs:
            return False

        def work() -> None:
            trt.executions += 1
            feed = {}
            for spec in entry.inputs:
                dtype, shape = np.dtype(spec.dtype), shapes[spec.name]
                cudart._check(addresses[spec.name], int(np.prod(shape)) * dtype.itemsize, True, spec.name)
                feed[spec.name] = host_view(addresses[spec.name], shape, dtype).copy()
            names = [t.name for t in entry.outputs]
            for name, value in zip(names, trt.session(entry).run(names, feed)):
                value = np.ascontiguousarray(value, self.engine.dtypes[name])
                address = addresses.get(name)
                alloc = self.allocators.get(name)
                if alloc is not None:
                    address = alloc.reallocate_output_async(name, address or 0, max(value.nbytes, 1), 256, stream)
                    assert address, "the output allocator failed"
                    alloc.notify_shape(name, value.shape)
                cudart._check(address, value.nbytes, True, name)
                host_view(address, value.shape, value.dtype)[...] = value
        cudart._enqueue(stream, work)
        return True


@pytest.fixture
def fake_engines(manifest, tiny_export, tmp_path, monkeypatch, fake_cuda):
    """An export directory with fake plans for every graph (the ONNX files are the tiny export's)."""
    import shutil

    root = tmp_path / "out"
    shutil.copytree(tiny_export[0], root)
    for entry in manifest.graphs.values():
        _write_plan(root, entry, "fp16", RTX3090, TRT_VERSION)
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: RTX3090)
    return root, FakeTrt(manifest, root, fake_cuda)


def _feed(graph_kit, graph: str, sizes, seed: int = 0) -> dict:
    from export.dummy import feed_for

    dims, contracts, wrappers = graph_kit
    return {k: np.ascontiguousarray(v) for k, v in feed_for(contracts[graph], wrappers[graph], dims, sizes,
                                                            rng=seed).items()}


def _ort(root: Path, manifest, graph: str):
    from runtime.executors.ort import OrtExecutor

    return OrtExecutor(manifest.graph(graph), root, "ort-cpu")


@pytest.mark.parametrize("graph, sizes", [
    ("dit_step", {"batch": 2, "mel_len": 37}),
    ("length_regulator", {"batch": 2, "seq_len": 21}),
    ("gpt_prefill", {"batch": 1, "text_len": 9}),
    ("campplus", "opt"),
])
def test_trt_executor_through_fakes_equals_onnx_runtime(fake_engines, manifest, graph_kit, graph, sizes) -> None:
    from runtime.executors.trt import TrtExecutor

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


def test_trt_executor_device_inputs_outputs_and_checks(fake_engines, manifest, graph_kit) -> None:
    from runtime.executors.trt import TrtExecutor

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
    from runtime.executors.trt import TrtExecutor

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
    from runtime.executors.trt import TrtExecutor

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
    from runtime.executors.trt import TrtExecutor
    from runtime.generate import GenerationConfig, generate
    from runtime.gpt_graphs import GraphGptSteps, geometry_of
    from runtime.gpt_trt import TrtGptSteps

    root, trt = fake_engines
    geometry = geometry_of(manifest)
    host_steps = GraphGptSteps(_ort(root, manifest, "gpt_prefill"), _ort(root, manifest, "gpt_decode"), geometry)
    stream = cuda.Stream()
    prefill = TrtExecutor(manifest.graph("gpt_prefill"), root, "fp16", stream=stream, trt=trt)
    decode = TrtExecutor(manifest.graph("gpt_decode"), root, "fp16", stream=stream, cuda_graphs=True, trt=trt)
    steps = TrtGptSteps(prefill, decode, geometry, owned=(prefill, decode, stream))
    gen = GenerationConfig(**config)
    for conditioning, seed in requests:                     # later requests reuse the steps' buffers
        spk, emo, text = _conditioning(manifest, conditioning, text_len)
        want = generate(host_steps, spk, emo, text, gen, seed=seed, record=True)
        replays = decode.graph_stats.replays
        got = generate(steps, spk, emo, text, gen, seed=seed, record=True)
        np.testing.assert_array_equal(got.codes, want.codes, err_msg=f"{config} conditioning {conditioning}")
        assert got.stopped == want.stopped and got.prompt_rows == want.prompt_rows
        decode_steps = len(got.trace.logits) - 1
        assert decode_steps == len(want.trace.logits) - 1 and decode_steps > 3
        np.testing.assert_array_equal(np.stack(got.trace.logits), np.stack(want.trace.logits))
        assert decode.graph_stats.replays >= replays + decode_steps - 2 - (2 if grows else 0)
        assert (steps._cache.capacity > 256) == grows and steps._cache.version == (2 if grows else 1)
    stats = decode.graph_stats
    assert stats.failed_captures == 0 and stats.captures >= len(requests)
    steps.close()
    assert not trt.cudart.device and not trt.cudart.host and not trt.cudart.execs
