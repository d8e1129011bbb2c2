"""The device cache of the shared decode batch (runtime/trt/kv_batch_device.py) and its copy plans
(runtime/trt/kv_plan.py, the batch planners): the plans executed with numpy keep a device-layout cache equal
to the host BatchKVCache through joins, per-row appends at different lengths, per-member beam reorders and
leaves (with compaction and shrinking); at full size they keep to the CUDA copy limits; the class itself,
over the fake cudart, agrees with BatchKVCache operation by operation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from runtime.errors import ContractError
from runtime.gpt.batch_cache import ROW_BUCKETS, BatchKVCache
from runtime.trt import cuda
from runtime.trt.kv_batch_device import DeviceBatchKVCache
from runtime.trt.kv_plan import (
    CACHE,
    KV_NEW,
    MAX_PITCH,
    OLD_CACHE,
    PREFILL,
    SPARE,
    Copy3D,
    Fill,
    KVLayout,
    apply_numpy,
    boxes_overlap,
    check_op,
    plan_compact,
    plan_member_reorder,
    plan_row_appends,
    plan_row_clear,
    plan_row_prefill,
)
from tests.trt.fakes import host_view
from tests.trt.test_kv_device import _CallLog

BUCKETS = (16, 32, 64)


# ---------------------------------------------------------------------------------------------------
# A random walk of the batch: what the scheduler does to it (tests/scheduler/test_gpt_batch.py's walk)


def _walk(seed: int, layers: int, heads: int, head_dim: int, max_rows: int, steps: int = 70) -> list[tuple]:
    """Events (("join", key, kv, beams, max_positions, source), ("leave", key), ("reorder", key, parents),
    ("tokens", key, tokens, position), ("ensure_room",), ("append", kv_new)) found by driving a host
    BatchKVCache: joins when rows are free (batch-1, per-beam or shared prefills: one row of a batch of prompts),
    a new position's K/V drawn from its row's token history (as the model's: beams fed alike hold alike K/V,
    which the host cache relies on to copy only where beams differ), leaves at random and when a member
    is full, a reorder of every member each step (permutations with cycles, duplicates), then a step."""
    rng = np.random.default_rng(seed)
    host = BatchKVCache(layers, heads, head_dim, max_rows=max_rows, buckets=BUCKETS)
    events: list[tuple] = []
    history: dict[int, np.ndarray] = {}       # per member, a hash of each beam's tokens so far

    def do(event: tuple) -> None:
        events.append(event)
        _apply(host, event)

    def kv(beams: int, positions: int) -> np.ndarray:
        shape = (layers, 2, beams, heads, positions, head_dim)
        return (rng.integers(-64, 64, shape) / 64).astype(np.float32)

    for step in range(steps):
        if step % 5 == 0 and host.free_rows() >= 1:
            beams = int(rng.integers(1, min(4, host.free_rows()) + 1))
            pick = rng.random()
            src = 1 if pick < 0.5 else beams if pick < 0.75 else int(rng.integers(2, 5))   # last: a shared prefill
            source = int(rng.integers(0, src)) if pick >= 0.75 else None
            do(("join", step, kv(src, int(rng.integers(3, 20))), beams, int(rng.integers(30, 65)), source))
            history[step] = np.zeros(beams, np.int64)
        members = sorted(host.members)
        full = [k for k in members if host.lengths[host.member_rows(k)[0]] >= host.members[k].max_positions]
        if members and step % 9 == 4:
            full.append(members[int(rng.integers(0, len(members)))])
        for key in sorted(set(full)):
            do(("leave", key))
            history.pop(key, None)
        for key in sorted(host.members):
            beams = len(host.member_rows(key))
            kind = rng.integers(3)
            parents = (rng.permutation(beams) if kind == 0 else np.roll(np.arange(beams), 1) if kind == 1
                       else rng.integers(0, beams, beams))
            do(("reorder", key, parents))
            tokens = rng.integers(0, 3, beams)                # few distinct tokens: beams share histories
            do(("tokens", key, tokens, int(host.lengths[host.member_rows(key)[0]]) - 2))
            history[key] = (history[key][parents] * 7 + tokens + 1) % 1_000_003
        do(("ensure_room",))
        # a row's new K/V follows from its history (as the model's does), other rows' are noise
        new = kv(host.rows, 1)
        for key in host.members:
            for b, r in enumerate(host.member_rows(key)):
                local = np.random.default_rng(int(history[key][b]))
                new[:, :, r] = (local.integers(-64, 64, new[:, :, r].shape) / 64).astype(np.float32)
        do(("append", new))
    for key in sorted(host.members):
        do(("leave", key))
    return events


def _apply(cache: Any, event: tuple) -> None:
    name, *args = event
    if name == "join":
        cache.join(*args)
    elif name == "leave":
        cache.leave(*args)
    elif name == "reorder":
        cache.reorder(*args)
    elif name == "tokens":
        cache.set_tokens(*args)
    elif name == "ensure_room":
        cache.ensure_room()
    else:
        cache.append(args[0])


def _layout(host: BatchKVCache) -> KVLayout:
    return KVLayout(host.layers, host.heads, host.head_dim, host.rows, host.capacity)


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


class _PlannedCache:
    """A device-layout cache as host bytes, kept by executing the planned ops (apply_numpy); which rows and
    positions each op concerns is read from the host BatchKVCache driven beside it."""

    def __init__(self, host: BatchKVCache) -> None:
        self.layout = _layout(host)
        self.cache = np.full(self.layout.cache_bytes, 0xAB, np.uint8)        # cudaMalloc garbage
        apply_numpy(plan_compact(None, self.layout, ()), {CACHE: self.cache})
        self.ops: list = []

    def run(self, host: BatchKVCache, event: tuple) -> None:
        name = event[0]
        before = (host.version, {k: list(m.rows) for k, m in host.members.items()}, host.lengths.copy())
        if name == "reorder":
            key, parents = event[1:]
            rows = host.member_rows(key)
            ops = plan_member_reorder(self.layout, rows, parents, int(host.lengths[rows[0]]))
            self._apply(ops, {SPARE: np.full(self.layout.spare_bytes, 0xEE, np.uint8)})
        elif name == "append":
            rows = sorted(r for m in host.members.values() for r in m.rows)
            ops = plan_row_appends(self.layout, rows, host.lengths[rows].tolist())
            self._apply(ops, {KV_NEW: _bytes(event[1])})
        _apply(host, event)
        if host.version != before[0]:                                       # reallocated: compaction
            old_layout, old_rows, old_lengths = self.layout, before[1], before[2]
            self.layout = _layout(host)
            moves = [(new, old, int(old_lengths[old])) for key, m in host.members.items() if key in old_rows
                     for new, old in zip(m.rows, old_rows[key])]
            new_cache = np.full(self.layout.cache_bytes, 0xCD, np.uint8)
            apply_numpy(plan_compact(old_layout, self.layout, moves), {CACHE: new_cache, OLD_CACHE: self.cache})
            self.cache = new_cache
        if name == "join":
            key, kv, beams, _, source = event[1:6]
            ops = []
            for b, r in enumerate(host.member_rows(key)):
                src_row = source if source is not None else b if kv.shape[2] > 1 else 0
                ops += plan_row_clear(self.layout, r)
                ops += plan_row_prefill(self.layout, r, kv.shape[4], kv.shape[2], src_row)
            self._apply(ops, {PREFILL: _bytes(kv)})

    def _apply(self, ops: list, extra: dict) -> None:
        self.ops += ops
        apply_numpy(ops, {CACHE: self.cache, **extra})

    def array(self) -> np.ndarray:
        return self.cache.view(np.float32).reshape(self.layout.shape())


@pytest.mark.parametrize("seed, geometry, max_rows", [
    (0, (2, 2, 4), 12), (1, (1, 3, 2), 7), (2, (3, 1, 5), 16), (3, (2, 2, 4), 4), (4, (4, 2, 3), 24)])
def test_planned_copies_keep_the_device_layout_equal_to_the_host_batch(seed, geometry, max_rows) -> None:
    layers = geometry[0]
    events = _walk(seed, *geometry, max_rows)
    host = BatchKVCache(*geometry, max_rows=max_rows, buckets=BUCKETS)
    planned = _PlannedCache(host)
    seen_rows, seen_caps, reorders = set(), set(), 0
    for i, event in enumerate(events):
        planned.run(host, event)
        np.testing.assert_array_equal(planned.array(), host.buffer, err_msg=f"event {i}: {event[0]}")
        seen_rows.add(host.rows)
        seen_caps.add(host.capacity)
        reorders += event[0] == "reorder"
    assert len(seen_rows) >= 3 and len(seen_caps) >= 2 and reorders > 20   # grew, compacted, shrank
    assert seen_rows <= {0, max_rows, *ROW_BUCKETS} and seen_caps <= set(BUCKETS)
    copies = [op for op in planned.ops if isinstance(op, Copy3D)]
    assert copies and all(op.depth == 2 * layers for op in copies)       # one copy per row run, any layer count
    assert host.rows == 0 and host.used_rows == 0


def test_appends_copy_once_per_run_of_rows_at_one_position() -> None:
    layout = KVLayout(24, 20, 64, 12, 2048)
    ops = plan_row_appends(layout, [0, 1, 2, 3, 5, 6, 7, 9], [40, 40, 40, 7, 7, 7, 8, 300])
    assert [(op.dst_pos[1] // 20, op.height // 20, op.dst_pos[0] // 256) for op in ops] == \
        [(0, 3, 40), (3, 1, 7), (5, 2, 7), (7, 1, 8), (9, 1, 300)]
    with pytest.raises(ValueError, match="outside a cache"):
        plan_row_appends(layout, [0], [2048])
    with pytest.raises(ValueError, match="must ascend"):
        plan_row_appends(layout, [3, 1], [5, 5])
    with pytest.raises(ValueError, match="not distinct rows"):
        plan_row_appends(layout, [12], [5])
    assert len(plan_member_reorder(layout, [4, 9, 2], [1, 2, 0], 100)) == 4         # a 3-cycle: park, 2, unpark
    assert plan_member_reorder(layout, [4, 9, 2], [0, 1, 2], 100) == []
    with pytest.raises(ValueError, match="beam indices"):
        plan_member_reorder(layout, [4, 9], [0, 2], 100)


def _full_size_sizes(layout: KVLayout, old: KVLayout, prefill_batch: int, prompt: int) -> dict[str, int]:
    return {CACHE: layout.cache_bytes, OLD_CACHE: old.cache_bytes, SPARE: layout.spare_bytes,
            KV_NEW: layout.layers * 2 * layout.batch * layout.heads * layout.row_bytes,
            PREFILL: layout.layers * 2 * prefill_batch * layout.heads * prompt * layout.row_bytes}


@pytest.mark.parametrize("rows, capacity", [(16, 2048), (16, 2688), (24, 2048), (64, 256), (48, 1024)])
def test_full_size_batch_plans_keep_to_the_cuda_limits(rows, capacity) -> None:
    """The real model (24 layers, 20 heads, head_dim 64) at the decode batch's sizes: every planned copy and
    fill stays inside its regions, pitches under the maximum (a 2D memset's pitch is R slots: 1.9 GB at
    156 rows of 2688, so far below), and each row operation is one call whatever the layer count."""
    layout = KVLayout(24, 20, 64, rows, capacity)
    old = KVLayout(24, 20, 64, rows // 2, capacity // 2)
    prompt = min(637, capacity)                                     # 600 text tokens + 37
    sizes = _full_size_sizes(layout, old, 4, prompt)
    plans = {"clear": plan_compact(None, layout, ()), "row clear": plan_row_clear(layout, rows - 1),
             "prefill 1": plan_row_prefill(layout, rows - 1, prompt, 1),
             "prefill 4": plan_row_prefill(layout, rows - 2, prompt, 4, 3),
             "appends": plan_row_appends(layout, list(range(rows)), [capacity - 1 - r // 3 for r in range(rows)]),
             "reorder": plan_member_reorder(layout, [rows - 1, 0, rows // 2], [1, 2, 0], capacity - 1),
             "grow": plan_compact(old, layout, [(r, old.batch - 1 - r, old.capacity) for r in range(old.batch)]),
             "shrink": plan_compact(layout, old, [(r, 2 * r, old.capacity) for r in range(old.batch)])}
    for name, ops in plans.items():
        shrink = name == "shrink"
        for op in ops:
            check_op(op, {**sizes, CACHE: old.cache_bytes, OLD_CACHE: layout.cache_bytes} if shrink else sizes)
            if isinstance(op, Copy3D):
                assert max(op.dpitch, op.spitch) <= MAX_PITCH and op.depth == 48, (name, op)
            if isinstance(op, Fill) and op.height > 1:
                assert op.pitch <= MAX_PITCH and op.height == 48, (name, op)
    assert len(plans["row clear"]) == len(plans["prefill 1"]) == 1
    assert len(plans["appends"]) == -(-rows // 3)                  # beams of 3 at one position: one copy each
    assert len(plans["reorder"]) == 4
    with pytest.raises(ValueError, match="pitch exceeds the maximum"):       # where a 2D memset would break
        check_op(plan_row_clear(KVLayout(24, 20, 64, 160, 2688), 0)[0], {CACHE: 2**40})


def test_check_op_refuses_what_cudamemcpy3dasync_refuses() -> None:
    layout = KVLayout(2, 3, 4, 4, 8)
    sizes = {CACHE: layout.cache_bytes, SPARE: layout.spare_bytes, KV_NEW: 2 * 2 * 4 * 3 * 16}
    (good,) = plan_member_reorder(layout, [0, 1], [1, 1], 8)
    check_op(good, sizes)
    assert not boxes_overlap(good)
    bad = {
        "does not lie inside": Copy3D(CACHE, (16, 0, 0), 128, 12, CACHE, (0, 3, 0), 128, 12, 128, 3, 4),
        "rows": Copy3D(CACHE, (0, 10, 0), 128, 12, CACHE, (0, 0, 0), 128, 12, 16, 3, 4),
        "maximum": Copy3D(CACHE, (0, 0, 0), 2**31, 1, SPARE, (0, 0, 0), 2**31, 1, 16, 1, 1),
        "exceed region": Copy3D(CACHE, (0, 3, 1), 128, 12, CACHE, (0, 0, 0), 128, 12, 16, 3, 4),
        "overlap": Copy3D(CACHE, (0, 1, 0), 128, 12, CACHE, (0, 0, 0), 128, 12, 16, 3, 2),
        "unknown region": Copy3D("nowhere", (0, 0, 0), 128, 12, CACHE, (0, 0, 0), 128, 12, 16, 3, 2),
    }
    for words, op in bad.items():
        with pytest.raises(ValueError, match=words):
            check_op(op, sizes)
    # unequal geometries in one region: compared row by row
    assert boxes_overlap(Copy3D(CACHE, (0, 0, 0), 64, 2, CACHE, (0, 1, 0), 128, 1, 16, 1, 2))
    assert not boxes_overlap(Copy3D(CACHE, (0, 0, 0), 64, 2, CACHE, (16, 0, 0), 128, 1, 16, 1, 2))


# ---------------------------------------------------------------------------------------------------
# The class over the fake cudart vs BatchKVCache


def _compare(device: DeviceBatchKVCache, host: BatchKVCache, where: str) -> None:
    cache, mask = device.download()
    assert (device.rows, device.capacity, device.version, device.used_rows, device.free_rows()) == \
        (host.rows, host.capacity, host.version, host.used_rows, host.free_rows()), where
    np.testing.assert_array_equal(cache, host.buffer, err_msg=where)
    np.testing.assert_array_equal(mask, host.mask, err_msg=where)
    feeds = device.feeds()
    for name in ("kv_mask", "mel_ids", "mel_pos"):
        np.testing.assert_array_equal(feeds[name], host.feeds()[name], err_msg=f"{where}: {name}")
    assert {k: device.member_rows(k) for k in host.members} == {k: host.member_rows(k) for k in host.members}


@pytest.mark.parametrize("seed, geometry, max_rows, on_device", [
    (10, (2, 2, 4), 12, True), (11, (1, 3, 2), 7, False), (12, (3, 2, 5), 16, True), (13, (2, 1, 3), 5, True)])
def test_the_device_batch_agrees_with_the_host_batch(fake_cuda, seed, geometry, max_rows, on_device) -> None:
    """Every event of the walk on both caches; the prefill and kv_new come from device buffers (as from the
    decode executor) or host arrays. Everything freed at the end."""
    layers, heads, head_dim = geometry
    stream = cuda.Stream()
    device = DeviceBatchKVCache(*geometry, max_rows, BUCKETS, stream=stream)
    host = BatchKVCache(*geometry, max_rows=max_rows, buckets=BUCKETS)
    staging: list[cuda.DeviceBuffer] = []

    def on_gpu(a: np.ndarray) -> Any:
        if not on_device:
            return a
        buf = cuda.DeviceBuffer(a.nbytes)
        host_view(buf.ptr, a.shape)[...] = a
        staging.append(buf)
        return buf.array(a.shape)

    versions = set()
    for i, event in enumerate(_walk(seed, *geometry, max_rows)):
        name = event[0]
        _apply(host, event)
        if name == "join":
            event = (name, event[1], on_gpu(event[2]), *event[3:])
        elif name == "append":
            event = (name, on_gpu(event[1]))
        _apply(device, event)
        if name in ("join", "leave", "append") or i % 7 == 0:
            _compare(device, host, f"event {i}: {name}")
        versions.add(device.version)
        if staging:
            stream.sync()                        # an append's copies are queued, not done (the fake asserts it)
            while staging:
                staging.pop().close()
    assert len(versions) >= 4
    device.close()
    stream.close()
    assert not fake_cuda.device and not fake_cuda.host


def test_a_joining_member_never_sees_a_former_members_rows(fake_cuda) -> None:
    """A row freed without a reallocation (the row bucket and capacity stay) is taken by the next member:
    its positions past the prompt are zeros again, even where the former member's K/V went non-finite
    (masked positions must be finite: 0 * NaN is NaN)."""
    g = (2, 2, 3)
    device = DeviceBatchKVCache(*g, 8, BUCKETS)
    host = BatchKVCache(*g, max_rows=8, buckets=BUCKETS)
    ones = lambda beams, n: np.ones((2, 2, beams, 2, n, 3), np.float32)  # noqa: E731
    for cache in (device, host):
        cache.join("a", ones(1, 4), 1, 60)
        cache.join("b", ones(1, 12), 3, 60)            # the longest: its bucket stays when "a" leaves
        cache.join("c", ones(2, 5), 2, 60)
    assert host.rows == 6 and host.member_rows("a") == [0]
    for _ in range(5):
        kv_new = np.full((2, 2, 6, 2, 1, 3), 7.0, np.float32)
        kv_new[:, :, 0] = np.nan                      # "a"'s rows broke
        for cache in (device, host):
            cache.ensure_room()
            cache.append(kv_new)
    version = device.version
    for cache in (device, host):
        cache.leave("a")
        assert cache.join("d", ones(1, 3), 1, 60) == [0]
    assert device.version == version == host.version     # no reallocation: row 0 was reused as it was
    _compare(device, host, "after the reuse")
    assert np.isfinite(device.download()[0]).all()
    device.close()


def test_a_refused_bucket_leaves_the_batch_as_it_was(fake_cuda) -> None:
    device = DeviceBatchKVCache(1, 1, 2, 4, (8, 16))
    device.join("a", np.ones((1, 2, 1, 1, 6, 2), np.float32), 2, 100)
    new = np.full((1, 2, 2, 1, 1, 2), 2.0, np.float32)
    for _ in range(10):
        device.ensure_room()
        device.append(new)
    before = (device.version, device.capacity, device.download()[0].copy(), device.lengths.copy())
    with pytest.raises(ContractError, match=r"largest cache bucket \(16"):
        device.ensure_room()
    assert (device.version, device.capacity) == before[:2]
    np.testing.assert_array_equal(device.download()[0], before[2])
    np.testing.assert_array_equal(device.lengths, before[3])
    with pytest.raises(ContractError, match="prefill of batch 3 cannot fill 2 beams"):
        device.join("b", np.ones((1, 2, 3, 1, 6, 2), np.float32), 2, 10)
    with pytest.raises(ValueError, match="already a member"):
        device.join("a", np.ones((1, 2, 1, 1, 6, 2), np.float32), 1, 10)
    with pytest.raises(ContractError, match="kv_new is float32"):
        device.append(np.ones((1, 2, 3, 1, 1, 2), np.float32))
    device.close()
    device.close()


@pytest.mark.parametrize("layers", [1, 6])
def test_host_calls_per_step_do_not_grow_with_layers(fake_cuda, monkeypatch, layers) -> None:
    """Appends: one cudaMemcpy3DAsync per run of adjacent rows at one position (3 members -> 3 calls); a
    beam move: one call; a join: one 2D memset and one 3D copy per row - at any layer count."""
    log = _CallLog(fake_cuda)
    monkeypatch.setattr(cuda, "cudart", lambda: log)
    stream = cuda.Stream()
    device = DeviceBatchKVCache(layers, 2, 4, 8, BUCKETS, stream=stream)
    kv = lambda beams, n: np.ones((layers, 2, beams, 2, n, 4), np.float32)  # noqa: E731
    device.join("a", kv(1, 5), 3, 60)
    device.join("b", kv(1, 7), 2, 60)
    device.join("c", kv(1, 9), 1, 60)
    assert device.rows == 6 and device.member_rows("b") == [3, 4]
    log.calls.clear()
    device.join("d", kv(2, 4), 2, 60)                     # fits the 8-row bucket? no: 8 rows, reallocation
    assert log.calls.count("cudaMemset2DAsync") == 2 and log.calls.count("cudaMemcpy3DAsync") == 3 + 2
    log.calls.clear()
    device.ensure_room()
    device.append(np.ones((layers, 2, device.rows, 2, 1, 4), np.float32))
    assert log.calls.count("cudaMemcpy3DAsync") == 4                     # a, b, c, d: one run each
    log.calls.clear()
    device.reorder("a", np.array([1, 2, 0]))                                # a 3-cycle: park, 2 moves, unpark
    assert log.calls == ["cudaMalloc"] + ["cudaMemcpy3DAsync"] * 4
    log.calls.clear()
    device.reorder("a", np.array([2, 0, 1]))                                 # the spare row is kept
    assert log.calls == ["cudaMemcpy3DAsync"] * 4
    device.close()
    stream.close()
