"""runtime/trt/kv_plan.py and kv_device.py: the device KV cache's copy plans executed in numpy and checked
against CUDA's copy limits at full size, and the cache itself through the fake cudart (host calls counted),
against the host KVCache."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import BackendError, ContractError
from runtime.gpt.kv_cache import KVCache
from runtime.trt import cuda
from runtime.trt.kv_device import DeviceKVCache
from runtime.trt.kv_plan import (
    CACHE,
    HOST_CACHE,
    HOST_MASK,
    KV_NEW,
    MASK,
    MAX_PITCH,
    OLD_CACHE,
    OLD_MASK,
    ONES,
    PREFILL,
    SPARE,
    Copy2D,
    KVLayout,
    apply_numpy,
    check_op,
    is_contiguous,
    plan_append,
    plan_clear,
    plan_download,
    plan_grow,
    plan_load_prefill,
    plan_reorder,
    rows_overlap,
)
from tests.trt.fakes import FakeCudart, host_view

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
            ops = plan_reorder(layout, indices)
            assert all(op.height == 2 * layers for op in ops)               # one copy per move, any layer count
            apply_numpy(ops, regions)
            _assert_same(regions, host, f"reorder {indices.tolist()} at step {step}")
            kv_new = rng.standard_normal((layers, 2, batch, heads, 1, head_dim)).astype(np.float32)
            if host.length < layout.capacity:
                regions[KV_NEW] = kv_new.reshape(-1).view(np.uint8)
                apply_numpy(plan_append(layout, host.length), regions)
                host.append(kv_new)
                _assert_same(regions, host, f"append after reorder {step}")
    assert plan_reorder(layout, np.arange(layout.batch)) == []          # identity: no copies
    with pytest.raises(ValueError):
        plan_reorder(layout, np.arange(layout.batch + 1))


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
                apply_numpy(plan_reorder(layout, indices), regions)
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


def _full_size_plans(layout: KVLayout) -> dict[str, list]:
    """Every plan the device cache issues, at one full-size layout (index patterns with cycles and duplicates)."""
    plans = {"clear": plan_clear(layout), "download": plan_download(layout),
             "append": plan_append(layout, layout.capacity - 1),
             "prefill 1": plan_load_prefill(layout, min(137, layout.capacity), 1),
             "prefill B": plan_load_prefill(layout, min(137, layout.capacity), layout.batch)}
    for indices in ([1, 0, 3, 2], [1, 2, 3, 0], [0, 0, 0, 0], [3, 3, 1, 0]):
        plans[f"reorder {indices}"] = plan_reorder(layout, indices[:layout.batch])
    smaller = KVLayout(layout.layers, layout.heads, layout.head_dim, layout.batch, layout.capacity // 2)
    plans["grow"] = plan_grow(smaller, layout, smaller.capacity)
    return plans


@pytest.mark.parametrize("capacity", [256, 2048, 2688])
def test_full_size_plans_keep_to_the_cuda_copy_limits(capacity) -> None:
    """The real model (24 layers, 20 heads, head_dim 64) at 4 beams: a 2D copy's pitch stays under
    cudaMemcpy2DAsync's maximum, copies past it are contiguous (issued as cudaMemcpyAsync), and a beam
    move is one copy whatever the layer count."""
    layout = KVLayout(24, 20, 64, 4, capacity)
    sizes = {CACHE: layout.cache_bytes, MASK: layout.mask_bytes, SPARE: layout.spare_bytes,
             ONES: layout.ones_bytes, KV_NEW: layout.rows * layout.row_bytes, HOST_CACHE: layout.cache_bytes,
             HOST_MASK: layout.mask_bytes, PREFILL: layout.cache_bytes,
             OLD_CACHE: layout.cache_bytes, OLD_MASK: layout.mask_bytes}
    for name, ops in _full_size_plans(layout).items():
        for op in ops:
            check_op(op, sizes)
            if isinstance(op, Copy2D) and not is_contiguous(op):
                assert max(op.dpitch, op.spitch) <= MAX_PITCH, (name, op)
    (cache_copy, _) = plan_download(layout)
    assert is_contiguous(cache_copy) and cache_copy.width * cache_copy.height == layout.cache_bytes
    if capacity == 2688:
        assert layout.cache_bytes > MAX_PITCH                  # 2.6 GB: one 2D row would be refused
    assert len(plan_reorder(layout, [1, 2, 3, 0])) == 5         # 4-cycle: park, 3 moves, unpark


def test_check_op_refuses_what_cudamemcpy2dasync_refuses() -> None:
    big = {CACHE: 2**33, HOST_CACHE: 2**33}
    with pytest.raises(ValueError, match="pitch exceeds cudaMemcpy2DAsync's maximum"):
        check_op(Copy2D(HOST_CACHE, 0, 2**31, CACHE, 0, 2**31, 16, 2), big)
    check_op(Copy2D(HOST_CACHE, 0, 2**32, CACHE, 0, 2**32, 2**32, 1), big)    # one row: cudaMemcpyAsync
    layout = KVLayout(2, 3, 4, 3, 8)
    sizes = {CACHE: layout.cache_bytes}
    slot, pitch = layout.slot_bytes, 3 * layout.slot_bytes
    check_op(Copy2D(CACHE, 0, pitch, CACHE, slot, pitch, slot, 4), sizes)         # interleaved beam slots
    with pytest.raises(ValueError, match="overlap"):
        check_op(Copy2D(CACHE, 0, pitch, CACHE, slot // 2, pitch, slot, 4), sizes)
    assert not rows_overlap(0, 10, 5, 10, 5, 3) and rows_overlap(0, 10, 4, 10, 5, 3)
    assert not rows_overlap(0, 10, 13, 20, 3, 2) and rows_overlap(0, 10, 11, 20, 3, 2)   # unequal pitches


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




class _CallLog:
    """The fake cudart behind a proxy that logs every cuda* call the code under test makes."""

    def __init__(self, fake: FakeCudart) -> None:
        self._fake, self.calls = fake, []

    def __getattr__(self, name: str):
        attr = getattr(self._fake, name)
        if name.startswith("cuda") and callable(attr) and not isinstance(attr, type):
            def logged(*args):
                self.calls.append(name)
                return attr(*args)
            return logged
        return attr


CAPTURE_TAIL = ["cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphDestroy", "cudaGraphLaunch"]


def _decode_steps_calls(fake: FakeCudart, monkeypatch, layers: int, patterns: list[tuple[int, ...]]) -> list[list]:
    """Decode steps (append kv_new on the device, reorder by the pattern) on a 4-beam device cache; -> each
    step's cuda calls. The cache is compared with the host KVCache after every step."""
    log = _CallLog(fake)
    monkeypatch.setattr(cuda, "cudart", lambda: log)
    rng = np.random.default_rng(layers)
    heads, head_dim, batch = 2, 3, 4
    kv = rng.standard_normal((layers, 2, 1, heads, 3, head_dim)).astype(np.float32)
    device = DeviceKVCache.from_prefill(kv, batch, 16, (16,))
    host = KVCache.from_prefill(kv, batch, 16, (16,))
    shape = (layers, 2, batch, heads, 1, head_dim)
    kv_new = cuda.DeviceBuffer(int(np.prod(shape)) * 4)
    steps = []
    for pattern in patterns:
        value = rng.standard_normal(shape).astype(np.float32)
        host_view(kv_new.ptr, shape)[...] = value
        start = len(log.calls)
        device.append(kv_new.array(shape))
        device.reorder(np.array(pattern))
        steps.append(log.calls[start:])
        host.append(value)
        host.reorder(np.array(pattern))
        _compare_device(device, host, f"{layers} layers, pattern {pattern}")
    device.close()
    kv_new.close()
    assert not fake.device and not fake.execs, "allocations or graph executables left behind"
    return steps


def test_reorder_host_calls_do_not_grow_with_layers_or_moves(fake_cuda, monkeypatch) -> None:
    """Point (12): the first occurrence of a reorder pattern issues one copy per move, the second captures
    those copies into a CUDA graph, every later one is one cudaGraphLaunch; a decode step's host calls
    then are the same 3 for any number of layers and moves."""
    patterns = [(1, 0, 3, 2), (1, 2, 3, 0), (0, 0, 0, 0), (0, 1, 2, 3)] * 3
    moves = {p: len(plan_reorder(KVLayout(1, 1, 1, 4, 1), p)) for p in patterns}
    assert moves == {(1, 0, 3, 2): 6, (1, 2, 3, 0): 5, (0, 0, 0, 0): 3, (0, 1, 2, 3): 0}
    append = ["cudaMemcpy2DAsync"] * 2                        # kv_new rows, mask column
    by_layers = {}
    for layers in (1, 3):
        steps = _decode_steps_calls(fake_cuda, monkeypatch, layers, patterns)
        for i, (pattern, calls) in enumerate(zip(patterns, steps)):
            occurrence, copies = i // 4, ["cudaMemcpy2DAsync"] * moves[pattern]
            assert calls[:2] == append, calls
            reorder = [c for c in calls[2:] if c != "cudaMalloc"]      # the spare slot, once, before any capture
            if not moves[pattern]:
                assert reorder == []
            elif occurrence == 0:
                assert reorder == copies
            elif occurrence == 1:
                assert reorder == ["cudaStreamBeginCapture"] + copies + CAPTURE_TAIL
            else:
                assert reorder == ["cudaGraphLaunch"]
                assert len(calls) == 3
        flat = [c for step in steps for c in step]
        assert flat.count("cudaMalloc") == 1
        begin = [i for i, c in enumerate(flat) if c == "cudaStreamBeginCapture"]
        assert all("cudaMalloc" not in flat[b:flat.index("cudaStreamEndCapture", b)] for b in begin)
        assert "cudaStreamSynchronize" not in flat            # no host sync in a decode step
        by_layers[layers] = steps
    assert by_layers[1] == by_layers[3]                       # the same calls for 1 and 3 layers


def test_download_is_one_plain_copy_past_the_2d_pitch_limit(fake_cuda) -> None:
    """Point (14): the whole cache comes down with cudaMemcpyAsync; as a one-row cudaMemcpy2DAsync its
    pitch (the cache's size) would exceed the device's maximum pitch and CUDA would refuse it."""
    rng = np.random.default_rng(7)
    kv = rng.standard_normal((2, 2, 1, 2, 5, 3)).astype(np.float32)
    device = DeviceKVCache.from_prefill(kv, 3, 16, (8, 16))
    host = KVCache.from_prefill(kv, 3, 16, (8, 16))
    fake_cuda.max_pitch = device.layout.cache_bytes // 2      # below the cache, above every 2D pitch used
    for step in range(6):
        new = rng.standard_normal((2, 2, 3, 2, 1, 3)).astype(np.float32)
        device.append(new)
        host.append(new)
        for pattern in ([2, 0, 1], [0, 0, 1]):
            device.reorder(np.array(pattern))
            host.reorder(np.array(pattern))
    _compare_device(device, host, "after reorders under a low pitch limit")
    out = np.empty(device.layout.cache_bytes, np.uint8)
    n = device.layout.cache_bytes
    with pytest.raises(BackendError, match="cudaErrorInvalidPitchValue"):
        cuda.memcpy2d_async(out.ctypes.data, n, device.buffer.ptr, n, n, 1, "dtoh", device.stream)   # the old way
    device.close()


def test_the_fake_refuses_overlapping_copies(fake_cuda) -> None:
    """cudaMemcpy(2D)Async: "the memory areas may not overlap"; interleaved rows that share no byte are fine."""
    buf = cuda.DeviceBuffer(64)
    cuda.memcpy2d_async(buf.ptr, 16, buf.ptr + 8, 16, 8, 4, "dtod", None)
    with pytest.raises(BackendError, match="cudaErrorInvalidValue"):
        cuda.memcpy2d_async(buf.ptr, 16, buf.ptr + 4, 16, 8, 4, "dtod", None)
    with pytest.raises(BackendError, match="cudaErrorInvalidValue"):
        cuda.memcpy_async(buf.ptr, buf.ptr + 8, 16, "dtod", None)
    fake_cuda.cudaStreamSynchronize(0)          # the accepted copy lands before its memory is freed
    buf.close()


def test_reorders_stay_right_when_captures_fail(fake_cuda) -> None:
    """An invalidated capture marks the pattern uncapturable (cuda_graphs.GraphCache): plain copies from
    then on, the same results, nothing left behind."""
    fake_cuda.invalidate_captures = True
    rng = np.random.default_rng(3)
    kv = rng.standard_normal((2, 2, 3, 2, 4, 3)).astype(np.float32)
    device = DeviceKVCache.from_prefill(kv, 3, 16, (16,))
    host = KVCache.from_prefill(kv, 3, 16, (16,))
    for step in range(5):
        new = rng.standard_normal((2, 2, 3, 2, 1, 3)).astype(np.float32)
        device.append(new)
        host.append(new)
        device.reorder(np.array([2, 0, 1]))
        host.reorder(np.array([2, 0, 1]))
        _compare_device(device, host, f"step {step}")
    stats = device.reorder_stats
    assert (stats.failed_captures, stats.replays, stats.plain) == (1, 0, 5)
    device.close()
    assert not fake_cuda.device and not fake_cuda.graphs and not fake_cuda.execs and not fake_cuda.capturing
