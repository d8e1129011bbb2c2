"""The KV cache of a decode batch shared by many requests, kept on the GPU for the TensorRT executor: the
device twin of runtime/gpt/batch_cache.py:BatchKVCache (same interface, same row and position buckets, same
compaction and shrinking, same results), so continuous batching (runtime/scheduler/gpt_batch.py) runs on
TensorRT without the cache crossing the PCIe bus.

What lives where:
- the K/V: ONE device allocation (layers, 2, R, heads, S, head_dim) float32, R a row bucket, S a decode plan
  bucket (every S must have a `gpt_decode` optimization profile whose batch range holds R:
  runtime/trt/engine_plan.py:decode_rows_bound); `kv_cache.<i>` feeds are DeviceArray views of its layer
  slices, bound by pointer;
- the bookkeeping (members, rows, lengths) and the small per-row inputs `kv_mask` (R, S), `mel_ids` and
  `mel_pos` (R, 1): host numpy arrays, exactly BatchKVCache's, fed as they are (the executor stages them with
  each call). Why the mask is not on the device as in DeviceKVCache: rows append at different positions, so
  keeping a device mask current costs one copy per row per step, while the staged host mask is one upload;
- a one-row spare slot (layers, 2, heads, S, head_dim) on the device, made on the first reorder that parks
  a beam (a permutation cycle), dropped with its allocation.

Every copy is planned first (runtime/trt/kv_plan.py: `plan_row_clear`, `plan_row_prefill`,
`plan_row_appends`, `plan_member_reorder`, `plan_compact`; tested with numpy against BatchKVCache and at full
size against the CUDA limits) and issued here on the decode executor's stream (kv_device.execute_ops), so
appends and reorders are ordered with the decode steps without host synchronisation. The host waits after a
join (the prefill buffer and host arrays may be reused at once), after copies from host arrays, and before
freeing an allocation a queued copy may still read (a reallocation).

Host calls per decode step: one 3D copy per run of adjacent rows at one position (a member's beams), plus
one 3D copy per beam move, whatever the layer count. Reorders are not replayed as CUDA graphs as in
DeviceKVCache: they copy only the filled positions, whose count changes every step.

Positions past a row's length are zero in every member row (a join clears its rows, appends write at the
length, a reallocation starts from zeros), so a member's rows equal its host twin's in full.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable, Sequence

import numpy as np

from runtime.contracts import kv_cache_name
from runtime.errors import ContractError
from runtime.gpt.batch_cache import IDLE_POSITION, ROW_BUCKETS, BatchMember, row_bucket
from runtime.gpt.kv_cache import bucket_for
from runtime.trt.cuda import DeviceArray, DeviceBuffer, Stream
from runtime.trt.kv_device import Region, check_kv, execute_ops, source_region
from runtime.trt.kv_plan import (
    CACHE,
    HOST_CACHE,
    KV_NEW,
    OLD_CACHE,
    PREFILL,
    SPARE,
    Copy2D,
    Copy3D,
    KVLayout,
    Op,
    plan_compact,
    plan_member_reorder,
    plan_row_appends,
    plan_row_clear,
    plan_row_prefill,
)

log = logging.getLogger(__name__)


class DeviceBatchKVCache:
    """Rows of many members in one static device cache (BatchKVCache's interface; module docstring).

    `buckets`: the capacities the decode plan has a profile for; with `fixed_buckets` (the default) a
    reallocation to a capacity that is not one of them is refused (ContractError) before anything changes.
    `stream`: the decode executor's (so the copies are ordered with the decode steps)."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_rows: int, buckets: Sequence[int],
                 row_buckets: Sequence[int] = ROW_BUCKETS, idle_token: int = 0, stream: Stream | None = None,
                 fixed_buckets: bool = True) -> None:
        if max_rows < 1:
            raise ValueError(f"a decode batch needs at least 1 row, got {max_rows}")
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.max_rows = max_rows
        self.dtype = np.dtype(np.float32)
        self.buckets, self.row_buckets = tuple(sorted(buckets)), tuple(row_buckets)
        self.fixed_buckets = fixed_buckets
        self.idle_token = idle_token
        self.members: dict[Hashable, BatchMember] = {}
        self.version = 0                      # bumped when the arrays are reallocated (feeds must be rebuilt)
        self._own_stream = stream is None
        self.stream = stream if stream is not None else Stream()
        self._cache: DeviceBuffer | None = None
        self._spare: DeviceBuffer | None = None
        self._feeds: dict[str, Any] | None = None
        self.layout = KVLayout(layers, heads, head_dim, 0, 0)
        self._allocate(0, self.buckets[0])
        self._execute(plan_compact(None, self.layout, ()))

    # -- shape ------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows of the decode call (a row bucket; idle rows included)."""
        return self.layout.batch

    @property
    def capacity(self) -> int:
        return self.layout.capacity

    @property
    def used_rows(self) -> int:
        return sum(len(m.rows) for m in self.members.values())

    def free_rows(self) -> int:
        """Rows a new member could take now or after growing to the largest row bucket allowed."""
        return self.max_rows - self.used_rows

    @property
    def buffer(self) -> DeviceArray:
        """The whole cache (layers, 2, R, heads, S, head_dim) as a device view."""
        assert self._cache is not None, "the cache is closed"
        return DeviceArray(self._cache.ptr, self.layout.shape(), np.float32)

    def feeds(self) -> dict[str, Any]:
        """The whole decode feed: `kv_cache.<i>` device views, and the host arrays kv_mask, mel_ids, mel_pos
        (updated in place by the operations); valid until `version` changes."""
        if self._feeds is None:
            whole = self.buffer
            feeds: dict[str, Any] = {kv_cache_name(i): whole.at(i) for i in range(self.layers)}
            feeds.update(kv_mask=self.mask, mel_ids=self.mel_ids, mel_pos=self.mel_pos)
            self._feeds = feeds
        return dict(self._feeds)

    # -- members ------------------------------------------------------------------------------------
    def join(self, key: Hashable, kv: DeviceArray | np.ndarray, beams: int, max_positions: int,
             source: int | None = None) -> list[int]:
        """Give `key` `beams` rows holding the prefill's K/V (layers, 2, 1 or beams, heads, P, head_dim), on the
        device (DeviceArray) or the host; with `source`, row `source` of a shared prefill's K/V for every beam.
        Raises ValueError when the batch has no room (check `free_rows`)."""
        if key in self.members:
            raise ValueError(f"decode batch: {key!r} is already a member")
        check_kv(kv, (self.layers, 2, None, self.heads, None, self.head_dim), "prefill kv")
        src_batch, prompt = int(kv.shape[2]), int(kv.shape[4])
        if source is not None and not 0 <= source < src_batch:
            raise ValueError(f"decode batch: prefill row {source} of a batch of {src_batch}")
        if source is None and src_batch not in (1, beams):
            raise ContractError(f"KV cache: a prefill of batch {src_batch} cannot fill {beams} beams (needs 1 or "
                                f"{beams})")
        if beams > self.free_rows():
            raise ValueError(f"decode batch: {beams} rows requested, {self.free_rows()} free of {self.max_rows}")
        free = [r for r in range(self.rows) if r not in self._taken()]
        if len(free) < beams or prompt > self.capacity:
            need_rows = row_bucket(self.used_rows + beams, self.max_rows, self.row_buckets)
            self._reallocate(max(need_rows, self.rows), max(prompt, self._longest()), max_positions)
            free = [r for r in range(self.rows) if r not in self._taken()]
        rows = free[:beams]
        ops: list[Op] = []
        for b, r in enumerate(rows):
            ops += plan_row_clear(self.layout, r)
            src_row = source if source is not None else (b if src_batch > 1 else 0)
            ops += plan_row_prefill(self.layout, r, prompt, src_batch, src_row)
        self._execute(ops, {PREFILL: source_region(kv)})
        self._sync()                  # the prefill buffer (or host array) may be rewritten as soon as we return
        self.members[key] = BatchMember.joining(rows, max_positions, prompt, src_batch == 1 or source is not None)
        for r in rows:
            self.mask[r, :prompt] = 1.0
            self.mask[r, prompt:] = 0.0
            self.lengths[r] = prompt
        return list(rows)

    def leave(self, key: Hashable) -> None:
        """Free `key`'s rows (idle from the next step); shrink the arrays when the members left fit smaller ones."""
        member = self.members.pop(key)
        for r in member.rows:
            self._idle(r)
        want_rows = row_bucket(self.used_rows, self.max_rows, self.row_buckets) if self.members else 0
        want_cap = bucket_for(max(self._longest(), 1), self.buckets, self._max_positions())
        if want_rows < self.rows or want_cap < self.capacity:
            self._reallocate(want_rows, self._longest(), None, capacity=want_cap)

    def member_rows(self, key: Hashable) -> list[int]:
        return self.members[key].rows

    def set_tokens(self, key: Hashable, tokens: np.ndarray, position: int) -> None:
        """The member's beams are fed `tokens` at mel position `position` in the next step."""
        member = self.members[key]
        self.mel_ids[member.rows, 0] = tokens
        self.mel_pos[member.rows, 0] = position
        member.record(tokens)

    def reorder(self, key: Hashable, beam_indices: np.ndarray) -> None:
        """Beam b of `key` takes the filled positions of its beam `beam_indices[b]` (within the member's rows):
        one 3D copy per move (plan_member_reorder), from where the beams' histories differ (beam_moves)."""
        member = self.members[key]
        filled = int(self.lengths[member.rows[0]])
        ops = plan_member_reorder(self.layout, member.rows, beam_indices, filled, member.moves(beam_indices, filled))
        if not ops:
            return
        if self._spare is None and any(isinstance(op, Copy3D) and SPARE in (op.src, op.dst) for op in ops):
            self._spare = DeviceBuffer(self.layout.spare_bytes, "the decode batch's spare row")
        self._execute(ops)

    # -- a step ---------------------------------------------------------------------------------------
    def ensure_room(self) -> None:
        """Before a step: every member row's next position fits (grow the position bucket if not)."""
        need = self._longest() + 1
        if need > self.capacity:
            self._reallocate(self.rows, need, None)

    def append(self, kv_new: DeviceArray | np.ndarray) -> None:
        """Write a step's kv_new (layers, 2, R, heads, 1, head_dim) at each member row's next position."""
        check_kv(kv_new, (self.layers, 2, self.rows, self.heads, 1, self.head_dim), "kv_new")
        rows = np.array(sorted(self._taken()), np.int64)
        if rows.size == 0:
            return
        pos = self.lengths[rows]
        self._execute(plan_row_appends(self.layout, rows.tolist(), pos.tolist()), {KV_NEW: source_region(kv_new)})
        if isinstance(kv_new, np.ndarray):
            self._sync()                        # the caller may reuse its host array at once
        self.mask[rows, pos] = 1.0
        self.lengths[rows] += 1

    # -- tests, debugging, lifetime --------------------------------------------------------------------
    def download(self) -> tuple[np.ndarray, np.ndarray]:
        """(cache, mask) on the host (tests and debugging; synchronises). One contiguous copy."""
        cache = np.empty(self.layout.shape(), np.float32)
        n = self.layout.cache_bytes
        self._execute([Copy2D(HOST_CACHE, 0, n, CACHE, 0, n, n, 1)],
                      {HOST_CACHE: Region(int(cache.ctypes.data), int(cache.nbytes), False)})
        self._sync()
        return cache, self.mask.copy()

    def close(self) -> None:
        """Free the device memory (after the stream's pending copies). It may be called twice."""
        if self._cache is None and self._spare is None:
            return
        self._sync()
        for buf in (self._cache, self._spare):
            if buf is not None:
                buf.close()
        self._cache = self._spare = None
        self._feeds = None
        if self._own_stream:
            self.stream.close()

    # -- internals ------------------------------------------------------------------------------------
    def _taken(self) -> set[int]:
        return {r for m in self.members.values() for r in m.rows}

    def _longest(self) -> int:
        taken = sorted(self._taken())
        return int(self.lengths[taken].max()) if taken else 0

    def _max_positions(self) -> int:
        return max([m.max_positions for m in self.members.values()] + [1])

    def _idle(self, r: int) -> None:
        self.mask[r] = 0.0
        self.lengths[r] = 0
        self.mel_ids[r, 0] = self.idle_token
        self.mel_pos[r, 0] = IDLE_POSITION

    def _check_bucket(self, capacity: int) -> None:
        if self.fixed_buckets and capacity not in self.buckets:
            raise ContractError(f"decode batch: {capacity} positions are needed, past the decode engine's largest "
                                f"cache bucket ({self.buckets[-1]}, the manifest's cache_len maximum); shorten the "
                                "text or lower max_mel_tokens, or re-export with a larger cache_len range")

    def _allocate(self, rows: int, capacity: int) -> None:
        """New device cache (not cleared: plan_compact does it) and new host arrays, as BatchKVCache._allocate."""
        self._check_bucket(capacity)
        layout = KVLayout(self.layers, self.heads, self.head_dim, rows, capacity)
        cache = DeviceBuffer(layout.cache_bytes, f"the decode batch's KV cache {layout.shape()}")  # may fail: no change
        if self._spare is not None:             # the spare row has the old capacity: drop it (lazily remade)
            self._sync()
            self._spare.close()
            self._spare = None
        self._cache, self.layout = cache, layout
        self.mask = np.zeros((rows, capacity), np.float32)
        self.lengths = np.zeros(rows, np.int64)
        self.mel_ids = np.full((rows, 1), self.idle_token, np.int64)
        self.mel_pos = np.full((rows, 1), IDLE_POSITION, np.int64)
        self._feeds = None
        self.version += 1

    def _reallocate(self, rows: int, positions: int, new_max_positions: int | None, *,
                    capacity: int | None = None) -> None:
        """New arrays of `rows` rows and the bucket holding `positions`; members compacted to the front, in
        joining order (one copy of each member row's filled positions, plan_compact). A capacity the decode
        plan has no profile for is refused before anything changes."""
        limit = max(self._max_positions(), new_max_positions or 0)
        capacity = capacity if capacity is not None else bucket_for(positions, self.buckets, limit)
        if positions > limit:
            raise ValueError(f"decode batch: {positions} positions requested, its members were sized for {limit}")
        old_layout, old_cache = self.layout, self._cache
        old = (self.mask, self.lengths, self.mel_ids, self.mel_pos)
        assert old_cache is not None, "the cache is closed"
        self._allocate(rows, capacity)          # a refused bucket or a failed allocation changes nothing
        moves = []
        try:
            r = 0
            for member in self.members.values():
                moved = []
                for src in member.rows:
                    n = int(old[1][src])
                    moves.append((r, src, n))
                    self.mask[r, :n] = old[0][src, :n]
                    self.lengths[r], self.mel_ids[r], self.mel_pos[r] = n, old[2][src], old[3][src]
                    moved.append(r)
                    r += 1
                member.rows = moved
            self._execute(plan_compact(old_layout, self.layout, moves),
                          {OLD_CACHE: Region(old_cache.ptr, old_cache.nbytes, True)})
        finally:
            self._sync()                        # the copies read the old allocation: wait before freeing it
            old_cache.close()

    def _regions(self) -> dict[str, Region]:
        regions = {}
        for name, buf in ((CACHE, self._cache), (SPARE, self._spare)):
            if buf is not None:
                regions[name] = Region(buf.ptr, buf.nbytes, True)
        return regions

    def _execute(self, ops: Sequence[Op], extra: dict[str, Region] | None = None) -> None:
        execute_ops(ops, {**self._regions(), **(extra or {})}, self.stream)

    def _sync(self) -> None:
        self.stream.sync()
