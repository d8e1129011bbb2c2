"""The decode loop's KV cache kept on the GPU, for the TensorRT executor: the device twin of
runtime/gpt/kv_cache.py:KVCache (same layout, same operations, same results), so the cache never crosses
the PCIe bus during generation (DESIGN.md §3 "the runtime owns one preallocated cache allocation").

Layout: ONE device allocation (layers, 2, B, heads, S, head_dim) float32 with S a bucket of the decode
plan (runtime.trt.engine_plan.decode_buckets: one static optimization profile per bucket), a device mask
(B, S) float32, and a one-beam spare slot (layers, 2, heads, S, head_dim) allocated on first use (it
breaks beam-permutation cycles, as on the host). Decode feeds: `kv_cache.<i>` = DeviceArray views of
the layer slices (contiguous (2, B, heads, S, head_dim)) and `kv_mask`.

Every operation is planned first (runtime/trt/kv_plan.py: pure copy descriptors, one 2D copy per
append, growth or beam move, tested with numpy against the host KVCache) and executed here with
runtime.trt.cuda on the decode executor's stream, so the copies are ordered with the decode steps without
any host synchronisation; the host waits only before freeing memory a pending copy may still read.
Contiguous copies go out as cudaMemcpyAsync, the others as cudaMemcpy2DAsync (limits: kv_plan).

Beam reorders: O(1) host calls per decode step. Copying only the filled rows of a beam takes one 2D
copy per (layer, K/V) (a beam's rows are not equally spaced across layers), i.e. 2*layers calls per
move, ~200 cudaMemcpy2DAsync calls per step at full size (24 layers, 3 beams, up to 4 moves) - as many
host calls as the replayed decode step saves. Options weighed: a gather kernel (needs NVRTC or a shipped
cubin: a new dependency for one copy); a double-buffered cache gathered with one strided copy per K/V
(twice the memory, the decode step's bindings alternating between two sets of addresses, and a gather
into the other buffer still one copy per destination beam). The choice here: copy whole slots, ONE 2D
copy per move, and capture the moves of one permutation pattern into a CUDA graph, replayed with ONE
cudaGraphLaunch whenever the pattern recurs.
A whole-slot copy no longer depends on the number of filled rows, so the moves of a pattern are the
same copies at every step of a bucket: the graph is keyed by (bucket, beams, pattern), and the graphs of
a cache are dropped when it grows (new addresses). Policy (runtime/trt/cuda_graphs.py:GraphCache, LRU
of REORDER_GRAPHS): first occurrence of a pattern runs plainly (one call per move, <= beams + 1), the
second captures (begin, one call per move, end, instantiate, graph destroy, launch), every later one is
a single cudaGraphLaunch - so a pattern that occurs once never pays for an instantiation. Measured in
the fake (tests/trt/test_kv_device.py::test_reorder_host_calls_do_not_grow_with_layers_or_moves): a
decode step with a replayed reorder is 3 host calls (kv_new copy, mask copy, graph launch) for any
number of layers and moves; before, 2 + 2*layers*moves.
Trade-off: a whole slot moves S rows where only the filled ones matter. Past the first bucket the
filled rows exceed half the bucket (buckets double), so at most ~2x the bytes; in the first bucket the
prompt fills at least its 38 rows of 256. At full size a slot is 63 MB at S=256 and 660 MB at S=2688, so
reorders at large buckets are bandwidth-bound either way (~1 ms a move); only an indirection (a beam ->
slot map the attention reads) would remove them, which the decode graph's contract does not have.
Rows past the filled ones are zeros in every beam (appends write row `length`), so moving them keeps
the device cache equal to the host KVCache, which moves only the filled rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.contracts import kv_cache_name
from runtime.errors import ContractError
from runtime.gpt.kv_cache import bucket_for
from runtime.trt import cuda
from runtime.trt.cuda import DeviceArray, DeviceBuffer, PinnedBuffer, Stream
from runtime.trt.cuda_graphs import GraphCache, GraphStats
from runtime.trt.kv_plan import (
    CACHE,
    FLOAT,
    HOST_CACHE,
    HOST_MASK,
    KV_NEW,
    MASK,
    OLD_CACHE,
    OLD_MASK,
    ONES,
    PREFILL,
    SPARE,
    Copy2D,
    Copy3D,
    Fill,
    KVLayout,
    Op,
    check_op,
    fill_is_contiguous,
    is_contiguous,
    plan_append,
    plan_clear,
    plan_download,
    plan_grow,
    plan_load_prefill,
    plan_reorder,
)

log = logging.getLogger(__name__)

REORDER_GRAPHS = 32              # instantiated reorder graphs kept per cache (LRU; 3 beams have 26 patterns)


# ---------------------------------------------------------------------------------------------------
# The device cache


@dataclass(frozen=True)
class Region:
    """A named memory region of a plan (runtime/trt/kv_plan.py): where it starts, its size, device or host."""

    ptr: int
    nbytes: int
    device: bool


_KIND = {(True, True): "dtod", (False, True): "htod", (True, False): "dtoh", (False, False): "htoh"}


class DeviceKVCache:
    """Static KV cache on the GPU for `batch` beams that all hold the same number of filled rows
    (KVCacheLike; the device twin of runtime.gpt.kv_cache.KVCache, which it mirrors operation by operation).

    `buckets`: the capacities the decode plan has a profile for; with `fixed_buckets` (the default) a
    request that would need a larger cache than the largest bucket is refused when it gets there.
    `reorder_graphs`: replay recurring beam reorders as CUDA graphs (module docstring); False issues every
    move's copy from Python (one call per move)."""

    def __init__(self, layers: int, heads: int, head_dim: int, batch: int, max_rows: int,
                 buckets: Sequence[int], rows: int = 1, stream: Stream | None = None,
                 fixed_buckets: bool = True, reorder_graphs: bool = True) -> None:
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
        self._graphs = (GraphCache(REORDER_GRAPHS, self._capture_reorder, self._launch, cuda.destroy_exec)
                        if reorder_graphs else None)
        self.layout = KVLayout(layers, heads, head_dim, batch, 0)
        self._allocate(bucket_for(rows, self.buckets, max_rows))

    @classmethod
    def from_prefill(cls, kv: DeviceArray | np.ndarray, beams: int, max_rows: int, buckets: Sequence[int],
                     stream: Stream | None = None, fixed_buckets: bool = True,
                     reorder_graphs: bool = True) -> "DeviceKVCache":
        """A cache for `beams` beams holding the prefill's K/V (layers, 2, 1 or beams, heads, P, head_dim),
        on the device (DeviceArray) or the host (numpy)."""
        if len(kv.shape) != 6 or np.dtype(kv.dtype) != np.float32:
            raise ContractError(f"prefill kv: expected float32 (layers, 2, batch, heads, P, head_dim), "
                                f"got {np.dtype(kv.dtype)}{tuple(kv.shape)}")
        layers, _, _, heads, rows, head_dim = kv.shape
        cache = cls(layers, heads, head_dim, beams, max(max_rows, rows), buckets, rows=rows, stream=stream,
                    fixed_buckets=fixed_buckets, reorder_graphs=reorder_graphs)
        cache.load_prefill(kv)
        return cache

    # -- state -------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.layout.capacity

    @property
    def reorder_stats(self) -> GraphStats | None:
        """Plain runs, captures and replays of the beam reorders (None without reorder graphs)."""
        return None if self._graphs is None else self._graphs.stats

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
        check_kv(kv, (self.layers, 2, None, self.heads, None, self.head_dim), "prefill kv")
        rows = kv.shape[4]
        if rows > self.capacity:
            self.grow(rows)
        self._execute(plan_load_prefill(self.layout, rows, kv.shape[2]), {PREFILL: source_region(kv)})
        if isinstance(kv, np.ndarray):
            self._sync()                        # the caller may reuse its host array at once
        self.length = rows

    def append(self, kv_new: DeviceArray | np.ndarray) -> None:
        """Write a decode step's `kv_new` (layers, 2, B, heads, 1, head_dim) at the next position."""
        self.write(kv_new, self.length)
        self.length += 1

    def write(self, kv_new: DeviceArray | np.ndarray, position: int) -> None:
        """One strided copy of the new rows into `position` (growing to the next bucket first if needed)."""
        check_kv(kv_new, (self.layers, 2, self.batch, self.heads, 1, self.head_dim), "kv_new")
        if position >= self.capacity:
            self.grow(position + 1)
        self._execute(plan_append(self.layout, position), {KV_NEW: source_region(kv_new)})
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
                          {OLD_CACHE: Region(old_cache.ptr, old_cache.nbytes, True),
                           OLD_MASK: Region(old_mask.ptr, old_mask.nbytes, True)})
        finally:
            self._sync()                        # the copies read the old allocation: wait before freeing it
            old_cache.close()
            old_mask.close()

    def reorder(self, beam_indices: np.ndarray) -> None:
        """Beam b takes the slot of beam `beam_indices[b]` (in place; the spare slot breaks cycles): one copy
        per move, or one graph launch for a pattern seen before (module docstring)."""
        indices = tuple(int(i) for i in np.asarray(beam_indices).reshape(-1))
        ops = plan_reorder(self.layout, indices)
        if not ops or self.length == 0:
            return
        if any(isinstance(op, Copy2D) and SPARE in (op.src, op.dst) for op in ops) and self._spare is None:
            self._spare = DeviceBuffer(self.layout.spare_bytes, "the KV cache's spare beam slot")  # never mid-capture
        if self._graphs is None:
            self._execute(ops)
        else:
            self._graphs.run(("reorder", self.capacity, self.batch, indices), lambda: self._execute(ops))

    def download(self) -> tuple[np.ndarray, np.ndarray]:
        """(cache, mask) copied to the host (tests and debugging; synchronises)."""
        cache = np.empty(self.layout.shape(), np.float32)
        mask = np.empty((self.batch, self.capacity), np.float32)
        self._execute(plan_download(self.layout),
                      {HOST_CACHE: Region(cache.ctypes.data, cache.nbytes, False),
                       HOST_MASK: Region(mask.ctypes.data, mask.nbytes, False)})
        self._sync()
        return cache, mask

    def close(self) -> None:
        """Free the device memory (after the stream's pending copies)."""
        if self._cache is None and self._mask is None and self._spare is None and self._ones is None:
            return
        self._sync()
        if self._graphs is not None:
            self._graphs.clear()
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
        if self._graphs is not None and len(self._graphs):     # they copy between the old addresses
            self._sync()                        # (a launched one may still be running)
            self._graphs.clear()
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

    def _regions(self) -> dict[str, Region]:
        regions = {}
        for name, buf, device in ((CACHE, self._cache, True), (MASK, self._mask, True),
                                  (SPARE, self._spare, True), (ONES, self._ones, False)):
            if buf is not None:
                regions[name] = Region(buf.ptr, buf.nbytes, device)
        return regions

    def _execute(self, ops: Sequence[Op], extra: Mapping[str, Region] | None = None) -> None:
        execute_ops(ops, {**self._regions(), **(extra or {})}, self.stream)

    def _capture_reorder(self, key: tuple) -> Any:
        """The copies of one reorder pattern (key[-1]) captured into an instantiated CUDA graph (no host
        synchronisation: the capture records the copies, the launch runs them in stream order)."""
        ops = plan_reorder(self.layout, key[-1])
        cuda.begin_capture(self.stream, "thread_local")
        try:
            self._execute(ops)
        except BaseException:
            cuda.destroy_graph(cuda.end_capture(self.stream))     # end the capture whatever happened
            raise
        return cuda.instantiate(cuda.end_capture(self.stream))

    def _launch(self, graph_exec: Any) -> None:
        cuda.launch(graph_exec, self.stream)

    def _sync(self) -> None:
        self.stream.sync()


def execute_ops(ops: Sequence[Op], regions: Mapping[str, Region], stream: Stream) -> None:
    """Issue planned ops (runtime/trt/kv_plan.py) on `stream`, each checked against its regions first:
    contiguous copies as cudaMemcpyAsync, the others as cudaMemcpy2DAsync / cudaMemcpy3DAsync, fills as
    cudaMemsetAsync / cudaMemset2DAsync. Shared by both device caches."""
    sizes = {name: r.nbytes for name, r in regions.items()}
    for op in ops:
        check_op(op, sizes)
        if isinstance(op, Fill):
            ptr = regions[op.dst].ptr + op.offset
            if fill_is_contiguous(op):
                cuda.memset_async(ptr, op.value, op.nbytes * max(op.height, 0), stream)
            else:
                cuda.memset2d_async(ptr, op.pitch, op.value, op.nbytes, op.height, stream)
            continue
        dst, src = regions[op.dst], regions[op.src]
        kind = _KIND[(src.device, dst.device)]
        if isinstance(op, Copy3D):
            cuda.memcpy3d_async(dst.ptr, op.dpitch, op.dst_rows, op.dst_pos, src.ptr, op.spitch, op.src_rows,
                                op.src_pos, op.width, op.height, op.depth, kind, stream)
        elif is_contiguous(op):
            cuda.memcpy_async(dst.ptr + op.dst_offset, src.ptr + op.src_offset, op.width * op.height, kind, stream)
        else:
            cuda.memcpy2d_async(dst.ptr + op.dst_offset, op.dpitch, src.ptr + op.src_offset, op.spitch,
                                op.width, op.height, kind, stream)


def check_kv(kv: Any, shape: tuple[int | None, ...], what: str) -> None:
    """K/V handed to a device cache (None = any size on that axis): the plans size their copies from the shape,
    so a wrong one is refused before any copy is issued."""
    got = tuple(kv.shape)
    if np.dtype(kv.dtype) != np.float32 or len(got) != len(shape) or any(
            w is not None and g != w for g, w in zip(got, shape)):
        want = tuple("*" if w is None else w for w in shape)
        raise ContractError(f"KV cache: {what} is {np.dtype(kv.dtype)}{got}, expected float32{want}")
    if isinstance(kv, np.ndarray) and not kv.flags.c_contiguous:
        raise ContractError(f"KV cache: {what} must be C-contiguous")


def source_region(value: DeviceArray | np.ndarray) -> Region:
    """A copy source on the device (DeviceArray) or the host (numpy: the caller synchronises before reusing it)."""
    if isinstance(value, DeviceArray):
        return Region(value.ptr, value.nbytes, True)
    return Region(int(value.ctypes.data), int(value.nbytes), False)
