"""The decode loop's KV cache kept on the GPU, for the TensorRT executor: the device twin of
runtime/gpt/kv_cache.py:KVCache (same layout, same operations, same results), so the cache never crosses
the PCIe bus during generation (DESIGN.md §3 "the runtime owns one preallocated cache allocation").

Layout: ONE device allocation (layers, 2, B, heads, S, head_dim) float32 with S a bucket of the decode
plan (runtime.trt.engine_plan.decode_buckets: one static optimization profile per bucket), a device mask
(B, S) float32, and a one-beam spare slot (layers, 2, heads, S, head_dim) allocated on first use (it
breaks beam-permutation cycles, as on the host). Decode feeds: `kv_cache.<i>` = DeviceArray views of
the layer slices (contiguous (2, B, heads, S, head_dim)) and `kv_mask`.

Every operation is planned first and executed second. The planners (`plan_*`) are pure functions that
return copy descriptors (`Copy2D`: rows of `width` bytes from src + r*spitch to dst + r*dpitch, i.e.
exactly cudaMemcpy2DAsync's arguments; `Fill`: a memset) over named regions; the CPU tests execute the
same descriptors with numpy (`apply_numpy`) and compare against the host KVCache, and DeviceKVCache
executes them with runtime.trt.cuda on one stream. Why 2D copies: the cache is a stack of
layers*2*B*heads rows of S*head_dim floats, so
- append (a step's kv_new (layers, 2, B, heads, 1, head_dim) at row r) is ONE copy: height
  layers*2*B*heads, width head_dim*4, dst pitch S*head_dim*4, src pitch head_dim*4, dst offset
  r*head_dim*4; plus mask[:, r] = 1 (height B, width 4, from a pinned buffer of ones);
- a beam move (reorder, runtime.gpt.kv_cache.reorder_moves) is one copy per (layer, K/V): `heads` rows of
  n*head_dim*4 bytes (n = filled rows) with pitch S*head_dim*4 (a beam's rows are not equally spaced
  across layers, so it cannot be a single copy);
- growth to the next bucket is one copy of the filled rows from the old allocation (new pitch);
- the prefill K/V (layers, 2, 1 or B, heads, P, head_dim) is one copy when it has every beam, else one
  per (layer, K/V, beam) (a batch-1 prefill broadcast to the beams, once per request).
All copies go on the decode executor's stream, so they are ordered with the decode steps without any
host synchronisation; the host waits only before freeing memory a pending copy may still read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.contracts import kv_cache_name
from runtime.errors import ContractError
from runtime.gpt.kv_cache import PARKED, bucket_for, reorder_moves
from runtime.trt import cuda
from runtime.trt.cuda import DeviceArray, DeviceBuffer, PinnedBuffer, Stream

log = logging.getLogger(__name__)

FLOAT = 4                        # the cache and mask are float32
# Region names of the copy descriptors
CACHE, MASK, SPARE, ONES = "cache", "mask", "spare", "ones"
KV_NEW, PREFILL, OLD_CACHE, OLD_MASK = "kv_new", "prefill", "old_cache", "old_mask"


@dataclass(frozen=True)
class KVLayout:
    """Sizes of one cache allocation; byte offsets of its rows."""

    layers: int
    heads: int
    head_dim: int
    batch: int
    capacity: int                # S

    @property
    def row_bytes(self) -> int:          # one position of one (layer, K/V, beam, head)
        return self.head_dim * FLOAT

    @property
    def seq_bytes(self) -> int:          # all S positions of one (layer, K/V, beam, head)
        return self.capacity * self.row_bytes

    @property
    def rows(self) -> int:               # number of (layer, K/V, beam, head) sequences
        return self.layers * 2 * self.batch * self.heads

    @property
    def cache_bytes(self) -> int:
        return self.rows * self.seq_bytes

    @property
    def layer_bytes(self) -> int:
        return 2 * self.batch * self.heads * self.seq_bytes

    @property
    def spare_bytes(self) -> int:        # one beam: (layers, 2, heads, S, head_dim)
        return self.layers * 2 * self.heads * self.seq_bytes

    @property
    def mask_bytes(self) -> int:
        return self.batch * self.capacity * FLOAT

    @property
    def ones_bytes(self) -> int:         # enough ones for mask[:, :S] of every beam
        return self.batch * self.capacity * FLOAT

    def block(self, lk: int, beam: int) -> int:
        """Byte offset of (layer*2 + kv = lk, beam, head 0, row 0) in the cache."""
        return (lk * self.batch + beam) * self.heads * self.seq_bytes

    def shape(self) -> tuple[int, ...]:
        return (self.layers, 2, self.batch, self.heads, self.capacity, self.head_dim)


@dataclass(frozen=True)
class Copy2D:
    """`height` rows of `width` bytes: row r from src+src_offset+r*spitch to dst+dst_offset+r*dpitch."""

    dst: str
    dst_offset: int
    dpitch: int
    src: str
    src_offset: int
    spitch: int
    width: int
    height: int


@dataclass(frozen=True)
class Fill:
    """`nbytes` bytes of `dst` from `offset` set to byte `value`."""

    dst: str
    offset: int
    nbytes: int
    value: int = 0


Op = Copy2D | Fill


# ---------------------------------------------------------------------------------------------------
# Planning (pure)


def plan_clear(layout: KVLayout) -> list[Op]:
    """A new allocation holds zeros (rows past the filled ones are masked, but must be finite)."""
    return [Fill(CACHE, 0, layout.cache_bytes), Fill(MASK, 0, layout.mask_bytes)]


def plan_load_prefill(layout: KVLayout, rows: int, src_batch: int) -> list[Op]:
    """Prefill K/V (layers, 2, src_batch, heads, rows, head_dim) into rows [0, rows) of every beam
    (src_batch 1 is broadcast); mask[:, :rows] = 1, mask[:, rows:] = 0."""
    if rows > layout.capacity:
        raise ValueError(f"prefill of {rows} rows does not fit a cache of {layout.capacity}")
    src_seq = rows * layout.row_bytes
    ops: list[Op] = [Fill(MASK, 0, layout.mask_bytes)]
    if rows == 0:
        return ops
    if src_batch == layout.batch:
        ops.append(Copy2D(CACHE, 0, layout.seq_bytes, PREFILL, 0, src_seq, src_seq, layout.rows))
    elif src_batch == 1:
        for lk in range(layout.layers * 2):
            for beam in range(layout.batch):
                ops.append(Copy2D(CACHE, layout.block(lk, beam), layout.seq_bytes, PREFILL,
                                  lk * layout.heads * src_seq, src_seq, src_seq, layout.heads))
    else:
        raise ValueError(f"prefill batch {src_batch} cannot fill {layout.batch} beams (needs 1 or {layout.batch})")
    ops.append(Copy2D(MASK, 0, layout.capacity * FLOAT, ONES, 0, rows * FLOAT, rows * FLOAT, layout.batch))
    return ops


def plan_append(layout: KVLayout, row: int) -> list[Op]:
    """A step's kv_new (layers, 2, B, heads, 1, head_dim) into row `row`; mask[:, row] = 1."""
    if not 0 <= row < layout.capacity:
        raise ValueError(f"row {row} is outside a cache of {layout.capacity}")
    rb = layout.row_bytes
    return [Copy2D(CACHE, row * rb, layout.seq_bytes, KV_NEW, 0, rb, rb, layout.rows),
            Copy2D(MASK, row * FLOAT, layout.capacity * FLOAT, ONES, 0, FLOAT, FLOAT, layout.batch)]


def plan_grow(old: KVLayout, new: KVLayout, filled: int) -> list[Op]:
    """Clear the new allocation, then copy the `filled` rows (and their mask) from the old one."""
    if (old.layers, old.heads, old.head_dim, old.batch) != (new.layers, new.heads, new.head_dim, new.batch):
        raise ValueError(f"growth cannot change the cache's geometry ({old} -> {new})")
    if filled > min(old.capacity, new.capacity):
        raise ValueError(f"{filled} filled rows do not fit (capacity {old.capacity} -> {new.capacity})")
    ops = plan_clear(new)
    if filled:
        width = filled * new.row_bytes
        ops.append(Copy2D(CACHE, 0, new.seq_bytes, OLD_CACHE, 0, old.seq_bytes, width, new.rows))
        ops.append(Copy2D(MASK, 0, new.capacity * FLOAT, OLD_MASK, 0, old.capacity * FLOAT, filled * FLOAT,
                          new.batch))
    return ops


def plan_reorder(layout: KVLayout, beam_indices: Sequence[int] | np.ndarray, filled: int) -> list[Op]:
    """Beam b takes the `filled` rows of beam beam_indices[b]: runtime.gpt.kv_cache.reorder_moves' moves
    (PARKED = the spare slot), each one copy per (layer, K/V) of `heads` rows."""
    indices = np.asarray(beam_indices).reshape(-1)
    if indices.size != layout.batch or (indices.size and (indices.min() < 0 or indices.max() >= layout.batch)):
        raise ValueError(f"beam indices {indices.tolist()} for {layout.batch} beams")
    if filled == 0:
        return []
    width, pitch = filled * layout.row_bytes, layout.seq_bytes
    spare_block = layout.heads * layout.seq_bytes          # one (layer, K/V) of the spare slot
    ops: list[Op] = []
    for dst, src in reorder_moves(indices):
        for lk in range(layout.layers * 2):
            if dst == PARKED:
                ops.append(Copy2D(SPARE, lk * spare_block, pitch, CACHE, layout.block(lk, src), pitch, width,
                                  layout.heads))
            elif src == PARKED:
                ops.append(Copy2D(CACHE, layout.block(lk, dst), pitch, SPARE, lk * spare_block, pitch, width,
                                  layout.heads))
            else:
                ops.append(Copy2D(CACHE, layout.block(lk, dst), pitch, CACHE, layout.block(lk, src), pitch, width,
                                  layout.heads))
    return ops


def check_op(op: Op, sizes: Mapping[str, int]) -> None:
    """Every byte an op touches lies inside its regions (a planning bug must never write past an
    allocation on the device)."""
    def inside(region: str, offset: int, pitch: int, width: int, height: int) -> None:
        if region not in sizes:
            raise ValueError(f"{op}: unknown region {region!r}")
        end = offset + (height - 1) * pitch + width
        if offset < 0 or end > sizes[region]:
            raise ValueError(f"{op}: bytes [{offset}, {end}) exceed region {region!r} of {sizes[region]} bytes")

    if isinstance(op, Fill):
        inside(op.dst, op.offset, 0, op.nbytes, 1)
        return
    if op.width > op.dpitch or op.width > op.spitch:
        raise ValueError(f"{op}: width exceeds a pitch")
    if op.width and op.height:
        inside(op.dst, op.dst_offset, op.dpitch, op.width, op.height)
        inside(op.src, op.src_offset, op.spitch, op.width, op.height)


def apply_numpy(ops: Sequence[Op], regions: Mapping[str, np.ndarray]) -> None:
    """Execute descriptors on host byte arrays (flat uint8, one per region): the reference semantics of
    what DeviceKVCache asks the GPU to do."""
    sizes = {name: arr.size for name, arr in regions.items()}
    for op in ops:
        check_op(op, sizes)
        if isinstance(op, Fill):
            regions[op.dst][op.offset:op.offset + op.nbytes] = op.value
            continue
        if not (op.width and op.height):
            continue
        src = np.lib.stride_tricks.as_strided(regions[op.src][op.src_offset:], (op.height, op.width), (op.spitch, 1))
        dst = np.lib.stride_tricks.as_strided(regions[op.dst][op.dst_offset:], (op.height, op.width), (op.dpitch, 1))
        np.copyto(dst, src.copy() if op.src == op.dst else src)


# ---------------------------------------------------------------------------------------------------
# The device cache


@dataclass(frozen=True)
class _Region:
    ptr: int
    nbytes: int
    device: bool


_KIND = {(True, True): "dtod", (False, True): "htod", (True, False): "dtoh", (False, False): "htoh"}


class DeviceKVCache:
    """Static KV cache on the GPU for `batch` beams that all hold the same number of filled rows
    (KVCacheLike; the device twin of runtime.gpt.kv_cache.KVCache, which it mirrors operation by operation).

    `buckets`: the capacities the decode plan has a profile for; with `fixed_buckets` (the default) a
    request that would need a larger cache than the largest bucket is refused when it gets there."""

    def __init__(self, layers: int, heads: int, head_dim: int, batch: int, max_rows: int,
                 buckets: Sequence[int], rows: int = 1, stream: Stream | None = None,
                 fixed_buckets: bool = True) -> None:
        self.layers, self.heads, self.head_dim, self.batch = layers, heads, head_dim, batch
        self.max_rows = max_rows
        self.buckets = tuple(sorted(buckets))
        self.fixed_buckets = fixed_buckets
        self.dtype = np.dtype(np.float32)
        self._own_stream = stream is None       # never the legacy default stream: it does not order with
        self.stream = stream if stream is not None else Stream()     # the executor's non-blocking stream
        self.length = 0
        self.version = 0
        self._cache: DeviceBuffer | None = None
        self._mask: DeviceBuffer | None = None
        self._spare: DeviceBuffer | None = None
        self._ones: PinnedBuffer | None = None
        self._feeds: dict[str, Any] | None = None
        self.layout = KVLayout(layers, heads, head_dim, batch, 0)
        self._allocate(bucket_for(rows, self.buckets, max_rows))

    @classmethod
    def from_prefill(cls, kv: DeviceArray | np.ndarray, beams: int, max_rows: int, buckets: Sequence[int],
                     stream: Stream | None = None, fixed_buckets: bool = True) -> "DeviceKVCache":
        """A cache for `beams` beams holding the prefill's K/V (layers, 2, 1 or beams, heads, P, head_dim),
        on the device (DeviceArray) or the host (numpy)."""
        if len(kv.shape) != 6 or np.dtype(kv.dtype) != np.float32:
            raise ContractError(f"prefill kv: expected float32 (layers, 2, batch, heads, P, head_dim), "
                                f"got {np.dtype(kv.dtype)}{tuple(kv.shape)}")
        layers, _, _, heads, rows, head_dim = kv.shape
        cache = cls(layers, heads, head_dim, beams, max(max_rows, rows), buckets, rows=rows, stream=stream,
                    fixed_buckets=fixed_buckets)
        cache.load_prefill(kv)
        return cache

    # -- state -------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.layout.capacity

    @property
    def buffer(self) -> DeviceArray:
        """The whole cache (layers, 2, B, heads, S, head_dim) as a device view."""
        assert self._cache is not None, "the cache is closed"
        return DeviceArray(self._cache.ptr, self.layout.shape(), np.float32)

    @property
    def mask(self) -> DeviceArray:
        assert self._mask is not None, "the cache is closed"
        return DeviceArray(self._mask.ptr, (self.batch, self.capacity), np.float32)

    def feeds(self) -> dict[str, Any]:
        """Decode inputs `kv_cache.<i>` (device views of the layer slices) and `kv_mask`; valid until
        `version` changes."""
        if self._feeds is None:
            whole = self.buffer
            feeds: dict[str, Any] = {kv_cache_name(i): whole.at(i) for i in range(self.layers)}
            feeds["kv_mask"] = self.mask
            self._feeds = feeds
        return dict(self._feeds)

    # -- operations (mirroring KVCache) -----------------------------------------------------------

    def load_prefill(self, kv: DeviceArray | np.ndarray) -> None:
        """Write the prefill rows, broadcasting a batch-1 prefill to every beam."""
        _check_kv(kv, (self.layers, 2, None, self.heads, None, self.head_dim), "prefill kv")
        rows = kv.shape[4]
        if rows > self.capacity:
            self.grow(rows)
        self._execute(plan_load_prefill(self.layout, rows, kv.shape[2]), {PREFILL: _source(kv)})
        if isinstance(kv, np.ndarray):
            self._sync()                        # the caller may reuse its host array at once
        self.length = rows

    def append(self, kv_new: DeviceArray | np.ndarray) -> None:
        """Write a decode step's `kv_new` (layers, 2, B, heads, 1, head_dim) at the next position."""
        self.write(kv_new, self.length)
        self.length += 1

    def write(self, kv_new: DeviceArray | np.ndarray, position: int) -> None:
        """One strided copy of the new rows into `position` (growing to the next bucket first if needed)."""
        _check_kv(kv_new, (self.layers, 2, self.batch, self.heads, 1, self.head_dim), "kv_new")
        if position >= self.capacity:
            self.grow(position + 1)
        self._execute(plan_append(self.layout, position), {KV_NEW: _source(kv_new)})
        if isinstance(kv_new, np.ndarray):
            self._sync()

    def grow(self, rows: int) -> None:
        """Move to the bucket holding `rows` positions: a new allocation and one copy of the filled rows."""
        if rows > self.max_rows:
            raise ValueError(f"KV cache: {rows} positions requested, this request was sized for {self.max_rows}")
        size = bucket_for(rows, self.buckets, self.max_rows)
        self._check_bucket(size)                # before touching anything: a refused growth keeps the cache
        old_layout, old_cache, old_mask = self.layout, self._cache, self._mask
        assert old_cache is not None and old_mask is not None, "the cache is closed"
        self._cache = self._mask = None
        try:
            self._allocate(size, clear=False)
            self._execute(plan_grow(old_layout, self.layout, self.length),
                          {OLD_CACHE: _Region(old_cache.ptr, old_cache.nbytes, True),
                           OLD_MASK: _Region(old_mask.ptr, old_mask.nbytes, True)})
        finally:
            self._sync()                        # the copies read the old allocation: wait before freeing it
            old_cache.close()
            old_mask.close()

    def reorder(self, beam_indices: np.ndarray) -> None:
        """Beam b takes the filled rows of beam `beam_indices[b]` (in place; the spare slot breaks cycles)."""
        ops = plan_reorder(self.layout, beam_indices, self.length)
        if any(isinstance(op, Copy2D) and SPARE in (op.src, op.dst) for op in ops) and self._spare is None:
            self._spare = DeviceBuffer(self.layout.spare_bytes, "the KV cache's spare beam slot")
        self._execute(ops)

    def download(self) -> tuple[np.ndarray, np.ndarray]:
        """(cache, mask) copied to the host (tests and debugging; synchronises)."""
        cache = np.empty(self.layout.shape(), np.float32)
        mask = np.empty((self.batch, self.capacity), np.float32)
        self._execute([Copy2D("host_cache", 0, cache.nbytes, CACHE, 0, cache.nbytes, cache.nbytes, 1),
                       Copy2D("host_mask", 0, mask.nbytes, MASK, 0, mask.nbytes, mask.nbytes, 1)],
                      {"host_cache": _Region(cache.ctypes.data, cache.nbytes, False),
                       "host_mask": _Region(mask.ctypes.data, mask.nbytes, False)})
        self._sync()
        return cache, mask

    def close(self) -> None:
        """Free the device memory (after the stream's pending copies)."""
        if self._cache is None and self._mask is None and self._spare is None and self._ones is None:
            return
        self._sync()
        for buf in (self._cache, self._mask, self._spare, self._ones):
            if buf is not None:
                buf.close()
        self._cache = self._mask = self._spare = None
        self._ones = None
        self._feeds = None
        if self._own_stream:
            self.stream.close()

    # -- internals --------------------------------------------------------------------------------

    def _check_bucket(self, size: int) -> None:
        if self.fixed_buckets and size not in self.buckets:
            raise ContractError(f"KV cache: {size} positions are needed, past the decode engine's largest cache "
                                f"bucket ({self.buckets[-1]}, the manifest's cache_len maximum); shorten the "
                                "text or lower max_mel_tokens, or re-export with a larger cache_len range")

    def _allocate(self, size: int, clear: bool = True) -> None:
        self._check_bucket(size)
        layout = KVLayout(self.layers, self.heads, self.head_dim, self.batch, size)
        if self._spare is not None:             # the spare slot has the old capacity: drop it (lazily remade)
            self._sync()
            self._spare.close()
            self._spare = None
        if self._ones is None or self._ones.nbytes < layout.ones_bytes:
            if self._ones is not None:
                self._sync()
                self._ones.close()
            self._ones = PinnedBuffer(layout.ones_bytes, "the KV cache mask's ones")
            self._ones.view(np.float32, (layout.ones_bytes // FLOAT,)).fill(1.0)
        self._cache = DeviceBuffer(layout.cache_bytes, f"the KV cache {layout.shape()}")
        self._mask = DeviceBuffer(layout.mask_bytes, f"the KV mask ({self.batch}, {size})")
        self.layout = layout
        self._feeds = None
        self.version += 1
        if clear:
            self._execute(plan_clear(layout))
        # (grow: plan_grow clears the new allocation itself before copying the filled rows)

    def _regions(self) -> dict[str, _Region]:
        regions = {}
        for name, buf, device in ((CACHE, self._cache, True), (MASK, self._mask, True),
                                  (SPARE, self._spare, True), (ONES, self._ones, False)):
            if buf is not None:
                regions[name] = _Region(buf.ptr, buf.nbytes, device)
        return regions

    def _execute(self, ops: Sequence[Op], extra: Mapping[str, _Region] | None = None) -> None:
        regions = {**self._regions(), **(extra or {})}
        sizes = {name: r.nbytes for name, r in regions.items()}
        for op in ops:
            check_op(op, sizes)
            if isinstance(op, Fill):
                cuda.memset_async(regions[op.dst].ptr + op.offset, op.value, op.nbytes, self.stream)
                continue
            dst, src = regions[op.dst], regions[op.src]
            cuda.memcpy2d_async(dst.ptr + op.dst_offset, op.dpitch, src.ptr + op.src_offset, op.spitch, op.width,
                                op.height, _KIND[(src.device, dst.device)], self.stream)

    def _sync(self) -> None:
        self.stream.sync()


def _check_kv(kv: Any, shape: tuple[int | None, ...], what: str) -> None:
    got = tuple(kv.shape)
    if np.dtype(kv.dtype) != np.float32 or len(got) != len(shape) or any(
            w is not None and g != w for g, w in zip(got, shape)):
        want = tuple("*" if w is None else w for w in shape)
        raise ContractError(f"KV cache: {what} is {np.dtype(kv.dtype)}{got}, expected float32{want}")
    if isinstance(kv, np.ndarray) and not kv.flags.c_contiguous:
        raise ContractError(f"KV cache: {what} must be C-contiguous")


def _source(value: DeviceArray | np.ndarray) -> _Region:
    if isinstance(value, DeviceArray):
        return _Region(value.ptr, value.nbytes, True)
    return _Region(int(value.ctypes.data), int(value.nbytes), False)
