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

The decode batch shared by many requests (runtime/trt/kv_batch_device.py, the device twin of
runtime/gpt/batch_cache.py:BatchKVCache) has the same (layers, 2, R, heads, S, head_dim) layout with R rows
(KVLayout.batch), but each row at its own length. One row is not equally spaced across (layer, K/V) blocks
(pitch heads*S*head_dim*4 within a block, R times that between blocks), so a row's copy is a 3D copy
(`Copy3D`: cudaMemcpy3DAsync's cudaMemcpy3DParms over linear memory: each side a pitched object of slices of
`rows` rows of `pitch` bytes, a position (x bytes, y rows, z slices) and an extent): the cache seen as
2*layers slices of R*heads rows of S*head_dim*4 bytes, a row r being rows [r*heads, (r+1)*heads) of every
slice. So, whatever the layer count:
- a step's append (`plan_row_appends`) is ONE 3D copy per run of consecutive rows at one position (a
  request's beams: same length, usually adjacent), 2*layers copies per row with 2D copies;
- a row's prefix from a prefill (`plan_row_prefill`) is one 3D copy, after one 2D memset of the row
  (`plan_row_clear`: it may hold a former member's K/V, possibly non-finite);
- a beam move within a member (`plan_member_reorder`, the spare slot breaking cycles as in `plan_reorder`)
  is one 3D copy of the member's filled positions only (rows of one batch have very different lengths,
  so whole-slot moves as in `plan_reorder` would copy up to S / length times the bytes);
- a reallocation (`plan_compact`) clears the new allocation and copies each member row's filled positions
  from the old one (rows compacted to the front), one 3D copy per run of consecutive rows.
The mask, tokens and positions of the batch stay on the host (the decode executor stages them with each
call, one upload each): rows at different positions would otherwise need one mask copy per row per step.
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
    """`nbytes` bytes of `dst` from `offset` set to byte `value`; with `height` > 1, `height` rows of `nbytes`
    bytes at offset + r*pitch (cudaMemset2DAsync's arguments: width = nbytes)."""

    dst: str
    offset: int
    nbytes: int
    value: int = 0
    pitch: int = 0
    height: int = 1


@dataclass(frozen=True)
class Copy3D:
    """cudaMemcpy3DAsync between two pitched objects of linear memory (cudaMemcpy3DParms: srcPtr / dstPtr =
    make_cudaPitchedPtr(region start, pitch, pitch, rows), srcPos / dstPos = make_cudaPos(x, y, z), extent =
    make_cudaExtent(width, height, depth), all in bytes and rows). Byte i of row j of slice k of the extent
    goes from src + (sz + k)*spitch*src_rows + (sy + j)*spitch + sx + i to the same place of dst."""

    dst: str
    dst_pos: tuple[int, int, int]        # (x bytes, y rows, z slices)
    dpitch: int
    dst_rows: int                        # rows per slice (cudaPitchedPtr.ysize)
    src: str
    src_pos: tuple[int, int, int]
    spitch: int
    src_rows: int
    width: int
    height: int
    depth: int


Op = Copy2D | Fill | Copy3D


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


# ---------------------------------------------------------------------------------------------------
# Planning for the decode batch shared by requests (rows at their own lengths; module docstring)


def _check_rows(layout: KVLayout, rows: Sequence[int], what: str = "rows") -> None:
    if any(not 0 <= r < layout.batch for r in rows) or len(set(rows)) != len(rows):
        raise ValueError(f"{what} {list(rows)}: not distinct rows of a batch of {layout.batch}")


def _cache_box(layout: KVLayout, row: int, position: int = 0) -> tuple[tuple[int, int, int], int, int]:
    """(position, pitch, rows per slice) of (row, position) in the cache seen as a pitched object: 2*layers
    slices of R*heads rows of S*head_dim*4 bytes."""
    return (position * layout.row_bytes, row * layout.heads, 0), layout.seq_bytes, layout.batch * layout.heads


def _runs(rows: Sequence[int], keys: Sequence[object]) -> list[tuple[int, int, object]]:
    """(first row, count, key) of each run of consecutive ascending rows sharing a key."""
    runs: list[tuple[int, int, object]] = []
    for row, key in zip(rows, keys):
        if runs and runs[-1][0] + runs[-1][1] == row and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, key)
        else:
            runs.append((row, 1, key))
    return runs


def plan_row_clear(layout: KVLayout, row: int) -> list[Op]:
    """Row `row` all zeros in every (layer, K/V) block: ONE 2D memset (2*layers rows of slot_bytes, pitch
    R*slot_bytes). A joining member's row may hold a former member's K/V (non-finite ones included, when
    that member failed), and masked positions must be finite."""
    _check_rows(layout, [row], "row")
    slot = layout.slot_bytes
    return [Fill(CACHE, row * slot, slot, 0, pitch=layout.batch * slot, height=layout.layers * 2)]


def plan_row_prefill(layout: KVLayout, row: int, positions: int, src_batch: int, src_row: int = 0) -> list[Op]:
    """Row `src_row` of a prefill's K/V (layers, 2, src_batch, heads, positions, head_dim) into positions
    [0, positions) of cache row `row`: ONE 3D copy."""
    _check_rows(layout, [row], "row")
    if not 0 <= src_row < src_batch:
        raise ValueError(f"prefill row {src_row} of a batch of {src_batch}")
    if positions > layout.capacity:
        raise ValueError(f"prefill of {positions} positions does not fit a cache of {layout.capacity}")
    if positions <= 0:
        return []
    width, heads = positions * layout.row_bytes, layout.heads
    pos, pitch, rows = _cache_box(layout, row)
    return [Copy3D(CACHE, pos, pitch, rows, PREFILL, (0, src_row * heads, 0), width, src_batch * heads,
                   width, heads, layout.layers * 2)]


def plan_row_appends(layout: KVLayout, rows: Sequence[int], positions: Sequence[int]) -> list[Op]:
    """A step's kv_new (layers, 2, R, heads, 1, head_dim): row rows[i] into position positions[i] of the same
    cache row (rows ascending). A run of consecutive rows at one position is ONE 3D copy."""
    rows, positions = [int(r) for r in rows], [int(p) for p in positions]
    _check_rows(layout, rows)
    if rows != sorted(rows) or len(rows) != len(positions):
        raise ValueError(f"rows {rows} must ascend, one position each (got {positions})")
    rb, heads, stack = layout.row_bytes, layout.heads, layout.batch * layout.heads
    ops: list[Op] = []
    for first, count, position in _runs(rows, positions):
        assert isinstance(position, int)
        if not 0 <= position < layout.capacity:
            raise ValueError(f"position {position} is outside a cache of {layout.capacity}")
        pos, pitch, slice_rows = _cache_box(layout, first, position)
        ops.append(Copy3D(CACHE, pos, pitch, slice_rows, KV_NEW, (0, first * heads, 0), rb, stack,
                          rb, count * heads, layout.layers * 2))
    return ops


def plan_member_reorder(layout: KVLayout, rows: Sequence[int], beam_indices: Sequence[int] | np.ndarray,
                        filled: int, moves: Sequence[tuple[int, int, int]] | None = None) -> list[Op]:
    """A member's beam b (cache row rows[b]) takes the `filled` positions of its beam beam_indices[b]:
    runtime.gpt.kv_cache.reorder_moves' moves mapped onto the member's rows (PARKED = the spare slot, one row
    (layers, 2, heads, S, head_dim)), each ONE 3D copy of the filled positions only — from the move's first
    position when `moves` gives them ((dst, src, first position), runtime.gpt.batch_cache.beam_moves)."""
    indices = np.asarray(beam_indices).reshape(-1)
    rows = [int(r) for r in rows]
    _check_rows(layout, rows)
    if indices.size != len(rows) or (indices.size and (indices.min() < 0 or indices.max() >= len(rows))):
        raise ValueError(f"beam indices {indices.tolist()} for {len(rows)} beams")
    if not 0 <= filled <= layout.capacity:
        raise ValueError(f"{filled} filled positions in a cache of {layout.capacity}")
    if filled == 0:
        return []
    heads, depth = layout.heads, layout.layers * 2
    if moves is None:
        moves = [(dst, src, 0) for dst, src in reorder_moves(indices)]
    ops: list[Op] = []
    for dst, src, first in moves:
        if not 0 <= first < filled:
            raise ValueError(f"a move from position {first} of {filled} filled")
        spare = ((first * layout.row_bytes, 0, 0), layout.seq_bytes, heads)
        to = (SPARE, *spare) if dst == PARKED else (CACHE, *_cache_box(layout, rows[dst], first))
        frm = (SPARE, *spare) if src == PARKED else (CACHE, *_cache_box(layout, rows[src], first))
        ops.append(Copy3D(*to, *frm, (filled - first) * layout.row_bytes, heads, depth))
    return ops


def plan_compact(old: KVLayout | None, new: KVLayout, moves: Sequence[tuple[int, int, int]]) -> list[Op]:
    """A new allocation of the batch: cleared (one memset), then each (new row, old row, filled positions) of
    `moves` copied from the old allocation (OLD_CACHE). Consecutive rows moving together with equal fill
    (a member's beams) are ONE 3D copy."""
    ops: list[Op] = [Fill(CACHE, 0, new.cache_bytes)]
    if not moves:
        return ops
    if old is None or (old.layers, old.heads, old.head_dim) != (new.layers, new.heads, new.head_dim):
        raise ValueError(f"compaction cannot change the cache's geometry ({old} -> {new})")
    moves = sorted((int(d), int(s), int(n)) for d, s, n in moves)
    _check_rows(new, [d for d, _, _ in moves], "new rows")
    _check_rows(old, [s for _, s, _ in moves], "old rows")
    heads, depth = new.heads, new.layers * 2
    runs: list[list[int]] = []                               # [dst, src, count, filled]
    for dst, src, n in moves:
        if n > min(old.capacity, new.capacity):
            raise ValueError(f"{n} filled positions do not fit (capacity {old.capacity} -> {new.capacity})")
        if runs and runs[-1][0] + runs[-1][2] == dst and runs[-1][1] + runs[-1][2] == src and runs[-1][3] == n:
            runs[-1][2] += 1
        else:
            runs.append([dst, src, 1, n])
    for dst, src, count, n in runs:
        if n:
            ops.append(Copy3D(CACHE, *_cache_box(new, dst), OLD_CACHE, *_cache_box(old, src),
                              n * new.row_bytes, count * heads, depth))
    return ops


def is_contiguous(op: Copy2D) -> bool:
    """One block of width*height bytes on both sides: issued as cudaMemcpyAsync (no pitch limit)."""
    return op.height == 1 or op.width == op.dpitch == op.spitch


def fill_is_contiguous(op: Fill) -> bool:
    """One block of nbytes*height bytes: issued as cudaMemsetAsync, else as cudaMemset2DAsync."""
    return op.height <= 1 or op.nbytes == op.pitch


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
    no overlap) unless it is contiguous, when it runs as cudaMemcpyAsync; a Copy3D cudaMemcpy3DAsync's
    (_check_copy3d), a 2D fill cudaMemset2DAsync's (width <= pitch <= MAX_PITCH)."""
    def inside(region: str, offset: int, pitch: int, width: int, height: int) -> None:
        if region not in sizes:
            raise ValueError(f"{op}: unknown region {region!r}")
        end = offset + (height - 1) * pitch + width
        if offset < 0 or end > sizes[region]:
            raise ValueError(f"{op}: bytes [{offset}, {end}) exceed region {region!r} of {sizes[region]} bytes")

    if isinstance(op, Fill):
        if op.height > 1 and op.nbytes != op.pitch:              # cudaMemset2DAsync
            if op.nbytes > op.pitch:
                raise ValueError(f"{op}: width exceeds the pitch")
            if op.pitch > MAX_PITCH:
                raise ValueError(f"{op}: the pitch exceeds the maximum of {MAX_PITCH} bytes; plan smaller fills")
        if op.height < 1:
            inside(op.dst, op.offset, 0, 0, 1)
            return
        inside(op.dst, op.offset, op.pitch, op.nbytes, op.height)
        return
    if isinstance(op, Copy3D):
        _check_copy3d(op, sizes)
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


def _box_start(pos: tuple[int, int, int], pitch: int, rows: int) -> int:
    x, y, z = pos
    return (z * rows + y) * pitch + x


def _check_copy3d(op: Copy3D, sizes: Mapping[str, int]) -> None:
    """Copy3D: both boxes inside their objects' rows and slices (cudaMemcpy3DAsync: "the source object must lie
    entirely within the region defined by srcPos and extent"), pitches <= MAX_PITCH ("returns an error if the
    pitch of srcPtr or dstPtr exceeds the maximum allowed"), every byte inside its region, no overlap."""
    sides = (("dst", op.dst, op.dst_pos, op.dpitch, op.dst_rows), ("src", op.src, op.src_pos, op.spitch, op.src_rows))
    for _, region, *_ in sides:
        if region not in sizes:
            raise ValueError(f"{op}: unknown region {region!r}")
    if not (op.width and op.height and op.depth):
        return
    for side, region, pos, pitch, rows in sides:
        x, y, z = pos
        if min(x, y, z) < 0 or x + op.width > pitch or y + op.height > rows:
            raise ValueError(f"{op}: the {side} box (x {x} + {op.width} bytes, y {y} + {op.height} rows) does not lie "
                             f"inside its object's rows ({pitch} bytes) and slices ({rows} rows)")
        if pitch > MAX_PITCH:
            raise ValueError(f"{op}: the {side} pitch exceeds cudaMemcpy3DAsync's maximum of {MAX_PITCH} bytes "
                             "(cudaDevAttrMaxPitch)")
        start = _box_start(pos, pitch, rows)
        end = start + ((op.depth - 1) * rows + op.height - 1) * pitch + op.width
        if end > sizes[region]:
            raise ValueError(f"{op}: bytes [{start}, {end}) exceed region {region!r} of {sizes[region]} bytes")
    if op.src == op.dst and boxes_overlap(op):
        raise ValueError(f"{op}: source and destination overlap (CUDA copies may not overlap)")


def boxes_overlap(op: Copy3D) -> bool:
    """Whether a Copy3D's source and destination boxes (in one region) share a byte. With one geometry on
    both sides (the planners' case) a byte has one (x, y, z) position, so the boxes overlap iff their
    intervals meet on all three axes; otherwise every row of both boxes is compared."""
    if (op.dpitch, op.dst_rows) == (op.spitch, op.src_rows):
        extent = (op.width, op.height, op.depth)
        return all(a < b + n and b < a + n for a, b, n in zip(op.dst_pos, op.src_pos, extent))

    def starts(pos: tuple[int, int, int], pitch: int, rows: int) -> list[int]:
        base = _box_start(pos, pitch, rows)
        return [base + (k * rows + j) * pitch for k in range(op.depth) for j in range(op.height)]

    spans = sorted([(a, 0) for a in starts(op.dst_pos, op.dpitch, op.dst_rows)]
                   + [(b, 1) for b in starts(op.src_pos, op.spitch, op.src_rows)])
    ends = [-1, -1]
    for start, side in spans:
        if start < ends[1 - side]:
            return True
        ends[side] = max(ends[side], start + op.width)
    return False


def apply_numpy(ops: Sequence[Op], regions: Mapping[str, np.ndarray]) -> None:
    """Execute descriptors on host byte arrays (flat uint8, one per region): the reference semantics of
    what the device caches (kv_device.py, kv_batch_device.py) ask the GPU to do."""
    sizes = {name: arr.size for name, arr in regions.items()}
    strided = np.lib.stride_tricks.as_strided
    for op in ops:
        check_op(op, sizes)
        if isinstance(op, Fill):
            if op.height > 1:
                if op.nbytes:
                    strided(regions[op.dst][op.offset:], (op.height, op.nbytes), (op.pitch, 1))[...] = op.value
            else:
                regions[op.dst][op.offset:op.offset + op.nbytes] = op.value
            continue
        if isinstance(op, Copy3D):
            if not (op.width and op.height and op.depth):
                continue
            shape = (op.depth, op.height, op.width)
            src = strided(regions[op.src][_box_start(op.src_pos, op.spitch, op.src_rows):], shape,
                          (op.spitch * op.src_rows, op.spitch, 1))
            dst = strided(regions[op.dst][_box_start(op.dst_pos, op.dpitch, op.dst_rows):], shape,
                          (op.dpitch * op.dst_rows, op.dpitch, 1))
            np.copyto(dst, src.copy() if op.src == op.dst else src)
            continue
        if not (op.width and op.height):
            continue
        src = np.lib.stride_tricks.as_strided(regions[op.src][op.src_offset:], (op.height, op.width), (op.spitch, 1))
        dst = np.lib.stride_tricks.as_strided(regions[op.dst][op.dst_offset:], (op.height, op.width), (op.dpitch, 1))
        np.copyto(dst, src.copy() if op.src == op.dst else src)
