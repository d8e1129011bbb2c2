"""runtime/trt/kv_device.py: the device KV cache's copy plans executed in numpy, and the cache itself through
the fake cudart, against the host KVCache."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ContractError
from runtime.gpt.kv_cache import KVCache
from runtime.trt import cuda
from runtime.trt.kv_device import (
    CACHE,
    KV_NEW,
    MASK,
    OLD_CACHE,
    OLD_MASK,
    ONES,
    SPARE,
    DeviceKVCache,
    KVLayout,
    apply_numpy,
    plan_append,
    plan_grow,
    plan_load_prefill,
    plan_reorder,
)
from tests.trt.fakes import host_view

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


