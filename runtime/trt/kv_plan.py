"""Copy plans of the device KV cache (runtime/trt/kv_device.py): pure data, no CUDA, so the CPU tests run
them with numpy against the host KVCache (runtime/gpt/kv_cache.py) and at full size against the CUDA limits.

Every operation is planned first and executed second. The planners (`plan_*`) are pure functions that
return copy descriptors (`Copy2D`: rows of `width` bytes from src + r*spitch to dst + r*dpitch, i.e.
exactly cudaMemcpy2DAsync's arguments; `Fill`: a memset) over named regions; the CPU tests execute the
same descriptors with numpy (`apply_numpy`) and compare against the host KVCache, and DeviceKVCache
executes them with runtime.trt.cuda on one stream. Why 2D copies: the cache is a stack of
layers*2*B*heads rows of S*head_dim floats, so
- append (a step's kv_new (layers, 2, B, heads, 1, head_dim) at row r) is ONE copy: height
  layers*2*B*heads, width head_dim*4, dst pitch S*head_dim*4, src pitch head_dim*4, dst offset
  r*head_dim*4; plus mask[:, r] = 1 (height B, width 4, from a pinned buffer of ones);
- a beam move (reorder, runtime.gpt.kv_cache.reorder_moves) is ONE copy of the beam's whole slot: a
  slot (one beam, every layer, K/V, head and all S rows) is `layers*2` rows of heads*S*head_dim*4 bytes
  with pitch B*heads*S*head_dim*4 (why whole slots: runtime/trt/kv_device.py, "Beam reorders");
- growth to the next bucket is one copy of the filled rows from the old allocation (new pitch);
- the prefill K/V (layers, 2, 1 or B, heads, P, head_dim) is one copy when it has every beam, else one
  per (layer, K/V, beam) (a batch-1 prefill broadcast to the beams, once per request).
- a download (tests, debugging) is one contiguous copy each of the cache and the mask.

Copy limits (cuda-bindings 13.x docstrings, engines/TENSORRT_API.md §7): cudaMemcpy2DAsync needs width
<= both pitches, each pitch <= the device's maximum (cudaDevAttrMaxPitch, 2^31 - 1 bytes on current
GPUs: MAX_PITCH) and non-overlapping areas; contiguous copies (one row, or width = both pitches) are
issued as cudaMemcpyAsync, which has no pitch (the whole cache at 4 beams x 2688 is 2.6 GB: as one 2D
row its pitch would exceed the maximum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from runtime.gpt.kv_cache import PARKED, reorder_moves

FLOAT = 4                        # the cache and mask are float32
MAX_PITCH = 2**31 - 1            # cudaMemcpy2DAsync's largest pitch (cudaDevAttrMaxPitch on current GPUs)
# Region names of the copy descriptors
CACHE, MASK, SPARE, ONES = "cache", "mask", "spare", "ones"
KV_NEW, PREFILL, OLD_CACHE, OLD_MASK = "kv_new", "prefill", "old_cache", "old_mask"
HOST_CACHE, HOST_MASK = "host_cache", "host_mask"


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
    def slot_bytes(self) -> int:         # one beam in one (layer, K/V): (heads, S, head_dim)
        return self.heads * self.seq_bytes

    @property
    def spare_bytes(self) -> int:        # one beam: (layers, 2, heads, S, head_dim)
        return self.layers * 2 * self.slot_bytes

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


def plan_reorder(layout: KVLayout, beam_indices: Sequence[int] | np.ndarray) -> list[Op]:
    """Beam b takes the slot of beam beam_indices[b]: runtime.gpt.kv_cache.reorder_moves' moves (PARKED =
    the spare slot), each ONE copy of the whole slot: `layers*2` rows of slot_bytes, pitch B*slot_bytes
    in the cache, slot_bytes in the spare. The same copies at any number of filled rows (capturable)."""
    indices = np.asarray(beam_indices).reshape(-1)
    if indices.size != layout.batch or (indices.size and (indices.min() < 0 or indices.max() >= layout.batch)):
        raise ValueError(f"beam indices {indices.tolist()} for {layout.batch} beams")
    slot, height = layout.slot_bytes, layout.layers * 2
    pitch = layout.batch * slot
    ops: list[Op] = []
    for dst, src in reorder_moves(indices):
        if dst == PARKED:
            ops.append(Copy2D(SPARE, 0, slot, CACHE, src * slot, pitch, slot, height))
        elif src == PARKED:
            ops.append(Copy2D(CACHE, dst * slot, pitch, SPARE, 0, slot, slot, height))
        else:
            ops.append(Copy2D(CACHE, dst * slot, pitch, CACHE, src * slot, pitch, slot, height))
    return ops


def plan_download(layout: KVLayout) -> list[Op]:
    """The whole cache and mask to host regions HOST_CACHE / HOST_MASK: contiguous, so each is issued as
    one cudaMemcpyAsync (the cache can exceed MAX_PITCH, so it must not be a one-row 2D copy)."""
    return [Copy2D(HOST_CACHE, 0, layout.cache_bytes, CACHE, 0, layout.cache_bytes, layout.cache_bytes, 1),
            Copy2D(HOST_MASK, 0, layout.mask_bytes, MASK, 0, layout.mask_bytes, layout.mask_bytes, 1)]


def is_contiguous(op: Copy2D) -> bool:
    """One block of width*height bytes on both sides: issued as cudaMemcpyAsync (no pitch limit)."""
    return op.height == 1 or op.width == op.dpitch == op.spitch


def rows_overlap(a: int, a_pitch: int, b: int, b_pitch: int, width: int, height: int) -> bool:
    """Whether the `height` rows of `width` bytes at a + r*a_pitch and at b + r*b_pitch share a byte
    (interleaved rows that share none are fine: a beam move within the cache is such a copy)."""
    if a + (height - 1) * a_pitch + width <= b or b + (height - 1) * b_pitch + width <= a:
        return False                                    # disjoint spans
    starts = sorted([(a + r * a_pitch, 0) for r in range(height)] + [(b + r * b_pitch, 1) for r in range(height)])
    ends = [-1, -1]
    for start, side in starts:
        if start < ends[1 - side]:
            return True
        ends[side] = max(ends[side], start + width)
    return False


def check_op(op: Op, sizes: Mapping[str, int]) -> None:
    """Every byte an op touches lies inside its regions (a planning bug must never write past an
    allocation on the device), and a copy obeys cudaMemcpy2DAsync's rules (width <= pitches <= MAX_PITCH,
    no overlap) unless it is contiguous, when it runs as cudaMemcpyAsync."""
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
    if not op.width or not op.height:
        return
    if not is_contiguous(op) and max(op.dpitch, op.spitch) > MAX_PITCH:
        raise ValueError(f"{op}: a pitch exceeds cudaMemcpy2DAsync's maximum of {MAX_PITCH} bytes "
                         "(cudaDevAttrMaxPitch); plan it as smaller copies")
    inside(op.dst, op.dst_offset, op.dpitch, op.width, op.height)
    inside(op.src, op.src_offset, op.spitch, op.width, op.height)
    if op.src == op.dst and rows_overlap(op.dst_offset, op.dpitch, op.src_offset, op.spitch, op.width, op.height):
        raise ValueError(f"{op}: source and destination overlap (CUDA copies may not overlap)")


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
