"""The decode loop's KV cache: one preallocated (layers, 2, B, heads, S, head_dim) array the runtime owns.

upstream: the `past_key_values` of HF GPT-2 under `indextts/gpt/transformers_generation_utils.py`
(per-layer K/V concatenated every step, `index_select`-reordered by beam every step). Here the cache
is static instead (DESIGN.md §3): S comes from a small set of buckets, each layer's slice `buffer[i]`
is a contiguous (2, B, heads, S, head_dim) view bound as decode input `kv_cache.<i>`, the decode graph
returns only the new rows (`kv_new`), and `kv_mask` (B, S) marks the rows to attend to. A step's write
is one strided copy; a beam reorder moves only the beams whose source changed, and of those only the
generated positions (every beam holds the same prompt rows), in place (a one-beam spare slot breaks
permutation cycles); growth to the next bucket is one copy of the filled rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from runtime.contracts import KV_BUCKETS, kv_cache_name

PARKED = -1                 # reorder source marker: the beam parked in the spare slot


def bucket_for(rows: int, buckets: Sequence[int], max_rows: int) -> int:
    """Smallest bucket holding `rows`; past the largest bucket, the request's own maximum (`max_rows`)."""
    for size in sorted(buckets):
        if size >= rows:
            return size
    return max(rows, max_rows)


def reorder_moves(beam_indices: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """The in-place copies that make beam b hold what beam `beam_indices[b]` held: (dst, src) pairs in
    execution order, where PARKED as dst means "copy src into the one-beam spare slot" and PARKED as src
    means "copy the spare slot into dst".

    A destination is written only once no pending move still reads it; a cycle (a permutation of beams)
    is broken by parking one beam in the spare slot. Beams that keep their own rows are not touched.
    Pure bookkeeping, shared by the host cache here and the device cache of the TensorRT executor.
    """
    moves: list[tuple[int, int]] = []
    pending = {dst: int(src) for dst, src in enumerate(np.asarray(beam_indices).tolist()) if int(src) != dst}
    while pending:
        sources = set(pending.values())
        ready = [dst for dst in pending if dst not in sources]
        if not ready:                                    # only cycles left: park one beam
            parked = next(iter(pending))
            moves.append((PARKED, parked))
            pending = {d: (PARKED if s == parked else s) for d, s in pending.items()}
            continue
        for dst in ready:
            moves.append((dst, pending.pop(dst)))
    return moves


class KVCache:
    """Static KV cache for `batch` rows (beams) that all hold the same number of filled positions."""

    def __init__(self, layers: int, heads: int, head_dim: int, batch: int, max_rows: int,
                 dtype: np.dtype = np.float32, buckets: Sequence[int] = KV_BUCKETS, rows: int = 1) -> None:
        self.layers, self.heads, self.head_dim, self.batch = layers, heads, head_dim, batch
        self.max_rows = max_rows              # the most positions this request can ever hold
        self.buckets = tuple(buckets)
        self.dtype = np.dtype(dtype)
        self.length = 0                       # filled positions [0, length)
        self.shared = 0                       # positions [0, shared) hold the same K/V in every beam
        self.version = 0                      # bumped when the arrays are reallocated (feeds must be rebuilt)
        self._spare: np.ndarray | None = None
        self._allocate(bucket_for(rows, self.buckets, max_rows))

    @classmethod
    def from_prefill(cls, kv: np.ndarray, batch: int, max_rows: int,
                     buckets: Sequence[int] = KV_BUCKETS) -> KVCache:
        """A cache for `batch` beams holding the prefill's K/V (layers, 2, 1 or batch, heads, P, head_dim)."""
        layers, _, _, heads, rows, head_dim = kv.shape
        cache = cls(layers, heads, head_dim, batch, max(max_rows, rows), kv.dtype, buckets, rows=rows)
        cache.load_prefill(kv)
        return cache

    @property
    def capacity(self) -> int:
        return self.buffer.shape[4]

    def _allocate(self, size: int) -> None:
        # zero-filled: rows past `length` are masked out, but must hold finite numbers (0 * NaN = NaN)
        self.buffer = np.zeros((self.layers, 2, self.batch, self.heads, size, self.head_dim), self.dtype)
        self.mask = np.zeros((self.batch, size), np.float32)
        self._spare = None
        self.version += 1

    def feeds(self) -> dict[str, np.ndarray]:
        """Decode inputs `kv_cache.<i>` (contiguous per-layer views) and `kv_mask`; valid until `version` changes."""
        feed = {kv_cache_name(i): self.buffer[i] for i in range(self.layers)}
        feed["kv_mask"] = self.mask
        return feed

    def load_prefill(self, kv: np.ndarray) -> None:
        """Write the prefill rows, broadcasting a batch-1 prefill to every beam (one copy)."""
        rows = kv.shape[4]
        if rows > self.capacity:
            self.grow(rows)
        np.copyto(self.buffer[:, :, :, :, :rows], kv)
        self.mask[:, :rows] = 1.0
        self.mask[:, rows:] = 0.0
        self.length = rows
        self.shared = rows if kv.shape[2] == 1 else 0      # a batch-1 prefill: every beam starts alike

    def append(self, kv_new: np.ndarray) -> None:
        """Write a decode step's `kv_new` (layers, 2, B, heads, 1, head_dim) at the next position."""
        self.write(kv_new, self.length)
        self.length += 1

    def write(self, kv_new: np.ndarray, position: int) -> None:
        """One strided copy of the new rows into `position` (growing to the next bucket first if needed)."""
        if position >= self.capacity:
            self.grow(position + 1)
        np.copyto(self.buffer[:, :, :, :, position:position + 1], kv_new)
        self.mask[:, position] = 1.0

    def grow(self, rows: int) -> None:
        """Move to the bucket holding `rows` positions: one copy of the filled rows."""
        if rows > self.max_rows:
            raise ValueError(f"KV cache: {rows} positions requested, this request was sized for {self.max_rows}")
        old_buffer, old_mask, n = self.buffer, self.mask, self.length
        self._allocate(bucket_for(rows, self.buckets, self.max_rows))
        np.copyto(self.buffer[:, :, :, :, :n], old_buffer[:, :, :, :, :n])
        self.mask[:, :n] = old_mask[:, :n]

    def reorder(self, beam_indices: np.ndarray) -> None:
        """Beam b takes the filled rows of beam `beam_indices[b]` (a gather on axis 2, done in place)."""
        for dst, src in reorder_moves(beam_indices):
            if dst == PARKED:
                self._copy_rows(self._spare_slot(), self.buffer[:, :, src])
            elif src == PARKED:
                self._copy_rows(self.buffer[:, :, dst], self._spare_slot())
            else:
                self._move_beam(dst, src)

    def _spare_slot(self) -> np.ndarray:
        if self._spare is None:
            self._spare = np.zeros((self.layers, 2, self.heads, self.capacity, self.head_dim), self.dtype)
        return self._spare

    def _copy_rows(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Filled rows between the cache and the spare slot (separate allocations: one strided copy); the
        positions every beam shares (the prompt) are the same on both sides and are not copied."""
        a, n = self.shared, self.length
        np.copyto(dst[:, :, :, a:n], src[:, :, :, a:n])

    def _move_beam(self, dst: int, src: int) -> None:
        """Filled rows of beam `src` onto beam `dst` within the cache.

        One copy per (layer, K/V): each such beam slice spans its own address range, so numpy sees the
        two views as disjoint. A single copy of the interleaved (layers, 2, ...) views would look
        overlapping to numpy's bounds check, which then copies the source to a temporary first.
        """
        a, n = self.shared, self.length                      # the shared prompt positions stay
        for layer in self.buffer:
            for kv in layer:                                  # (B, heads, S, head_dim)
                np.copyto(kv[dst, :, a:n], kv[src, :, a:n])
