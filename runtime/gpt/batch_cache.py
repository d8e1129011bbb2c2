"""The KV cache of a decode batch shared by many requests: every active request's beams are rows of ONE
(layers, 2, R, heads, S, head_dim) array, so one `gpt_decode` call steps them all (runtime/scheduler/).

How it differs from the one-request cache (runtime/gpt/kv_cache.py:KVCache, whose rows all hold the same
number of positions):
- rows belong to members (one request's segment each); a member's rows need not be adjacent, its beam
  reorders move rows among its own rows only (the same in-place moves, `reorder_moves`);
- each row has its own length: a step writes each row's new K/V at that row's next position, and
  `kv_mask` marks each row's filled positions (the decode graph attends per row: positions, masks);
- R is a row bucket (ROW_BUCKETS) and S a position bucket (the KV buckets) for the longest row. Free rows
  are idle: mask all zero, fed a harmless token, their outputs ignored. Rows are taken from the free ones
  first; the arrays are reallocated (one copy of the filled rows, members compacted to the front) only
  when a member does not fit, or when the members left fit a smaller row bucket or position bucket.

Why the arrays are whole: the executors bind each `kv_cache.<i>` input by pointer and shape, so it must be
one contiguous (2, R, heads, S, head_dim) array; a view of the first n rows of a larger R would not be.

Numbers: a row's logits and new K/V do not depend on the other rows or on how many masked positions
follow its own (a masked position adds an exact zero), so a member's tokens are those it gets alone, at
any R and S. tests/scheduler/ checks this against the one-request loop; on ONNX Runtime CPU the outputs
are bitwise equal (measured on the full-size gpt_decode at 3..12 rows, S 256..1024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from runtime.contracts import KV_BUCKETS, kv_cache_name
from runtime.gpt.kv_cache import PARKED, bucket_for, reorder_moves

#: decode batch sizes the arrays are allocated at (rows past the members' are idle)
ROW_BUCKETS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
IDLE_POSITION = 1            # mel position fed to idle rows (any valid position: their output is ignored)


def row_bucket(rows: int, max_rows: int, buckets: Sequence[int] = ROW_BUCKETS) -> int:
    """Smallest row bucket holding `rows`, capped at `max_rows` (which may itself not be a bucket)."""
    if rows > max_rows:
        raise ValueError(f"{rows} decode rows requested, the batch holds at most {max_rows}")
    return min([b for b in buckets if b >= rows] + [max_rows])


@dataclass
class BatchMember:
    """One member's rows and what its beams were fed (the bookkeeping both batch caches keep: this host
    cache and the device one, runtime/trt/kv_batch_device.py)."""

    rows: list[int]              # its beams' rows, beam b in rows[b]
    max_positions: int           # the most positions any of its rows will hold
    shared: int = 0              # positions [0, shared) are the same in all its rows (a batch-1 prefill)
    fed: np.ndarray | None = None   # (beams, max_positions - shared + 1) the tokens each beam was fed, in order
    steps: int = 0               # how many tokens each beam has been fed

    @classmethod
    def joining(cls, rows: list[int], max_positions: int, prompt: int, one_prompt: bool) -> "BatchMember":
        """`one_prompt`: every beam starts from the same prefill row (its prompt positions are alike)."""
        total = max(max_positions, prompt)
        shared = prompt if one_prompt else 0
        return cls(list(rows), total, shared, np.zeros((len(rows), total - shared + 1), np.int64))

    def record(self, tokens: np.ndarray) -> None:
        """The tokens its beams are fed at the next step (the history grows if ever fed past its size: a
        history cut short would make beams look alike where they are not)."""
        if not self.shared:
            return
        if self.steps == self.fed.shape[1]:
            self.fed = np.concatenate([self.fed, np.zeros_like(self.fed)], axis=1)
        self.fed[:, self.steps] = tokens
        self.steps += 1

    def moves(self, parents: np.ndarray, filled: int) -> list[tuple[int, int, int]]:
        """The copies of a reorder (beam_moves), then its history follows the beams."""
        parents = np.asarray(parents, np.int64)
        fed = self.fed[:, :self.steps] if self.shared else None
        moves = beam_moves(parents, fed, self.shared, filled)
        if fed is not None and moves:            # no move: every beam kept its own history
            fed[:] = fed[parents]
        return moves


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading entries `a` and `b` (same length) share."""
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if differ.size else int(a.size)


def beam_moves(parents: np.ndarray, fed: np.ndarray | None, shared: int, filled: int) -> list[tuple[int, int, int]]:
    """The copies of a member's beam reorder: `reorder_moves` (dst, src; PARKED = the spare slot), each with the
    first position it must copy. After a batch-1 prefill (`shared` > 0: the prompt positions are alike in
    every beam) a position's K/V follows from the tokens fed up to it (a row's outputs do not depend on the
    other rows: bitwise, measured on ONNX Runtime CPU), so a beam fed the same first c tokens as its new parent
    already holds [0, shared + c): only [shared + c, filled) is copied, and nothing when the histories agree.
    `fed` (beams, steps): the tokens each beam was fed, in order. Shared by the host and device batch caches."""
    parents = np.asarray(parents, np.int64).reshape(-1)

    def start(dst: int, src: int) -> int:
        return shared + common_prefix(fed[dst], fed[src]) if shared and fed is not None else 0

    moves: list[tuple[int, int, int]] = []
    parked_from = 0
    for dst, src in reorder_moves(parents):
        if dst == PARKED:                                # parked for every beam that takes `src`
            parked_from = min(start(d, src) for d in range(parents.size) if parents[d] == src and d != src)
            moves.append((dst, src, parked_from))
        elif src == PARKED:
            moves.append((dst, src, max(start(dst, int(parents[dst])), parked_from)))
        else:
            moves.append((dst, src, start(dst, src)))
    return [(d, s, lo) for d, s, lo in moves if lo < filled]


class BatchKVCache:
    """Rows of many members in one static cache; see the module note."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_rows: int, dtype: np.dtype = np.float32,
                 buckets: Sequence[int] = KV_BUCKETS, row_buckets: Sequence[int] = ROW_BUCKETS,
                 idle_token: int = 0) -> None:
        if max_rows < 1:
            raise ValueError(f"a decode batch needs at least 1 row, got {max_rows}")
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.max_rows = max_rows
        self.dtype = np.dtype(dtype)
        self.buckets, self.row_buckets = tuple(buckets), tuple(row_buckets)
        self.idle_token = idle_token
        self.members: dict[Hashable, BatchMember] = {}
        self.version = 0                      # bumped when the arrays are reallocated (feeds must be rebuilt)
        self._spare: np.ndarray | None = None
        self._allocate(0, min(self.buckets))

    # -- shape ------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows of the decode call (a row bucket; idle rows included)."""
        return self.buffer.shape[2]

    @property
    def capacity(self) -> int:
        return self.buffer.shape[4]

    @property
    def used_rows(self) -> int:
        return sum(len(m.rows) for m in self.members.values())

    def free_rows(self) -> int:
        """Rows a new member could take now or after growing to the largest row bucket allowed."""
        return self.max_rows - self.used_rows

    def _allocate(self, rows: int, capacity: int) -> None:
        # zero-filled: masked rows must hold finite numbers (0 * NaN = NaN)
        self.buffer = np.zeros((self.layers, 2, rows, self.heads, capacity, self.head_dim), self.dtype)
        self.mask = np.zeros((rows, capacity), np.float32)
        self.lengths = np.zeros(rows, np.int64)
        self.mel_ids = np.full((rows, 1), self.idle_token, np.int64)
        self.mel_pos = np.full((rows, 1), IDLE_POSITION, np.int64)
        self._spare = None
        self.version += 1

    def feeds(self) -> dict[str, np.ndarray]:
        """The whole decode feed (cache views, kv_mask, mel_ids, mel_pos); valid until `version` changes.
        Members set their rows' tokens and positions with `set_tokens`."""
        feed = {kv_cache_name(i): self.buffer[i] for i in range(self.layers)}
        feed.update(kv_mask=self.mask, mel_ids=self.mel_ids, mel_pos=self.mel_pos)
        return feed

    # -- members ------------------------------------------------------------------------------------
    def join(self, key: Hashable, kv: np.ndarray, beams: int, max_positions: int, source: int | None = None) -> list[int]:
        """Give `key` `beams` rows holding the prefill's K/V (layers, 2, 1 or beams, heads, P, head_dim), or,
        with `source`, row `source` of a shared prefill's K/V for every beam. Raises ValueError when the batch
        has no room (check `free_rows` first)."""
        if key in self.members:
            raise ValueError(f"decode batch: {key!r} is already a member")
        if source is not None:
            if not 0 <= source < kv.shape[2]:
                raise ValueError(f"decode batch: prefill row {source} of a batch of {kv.shape[2]}")
            kv = kv[:, :, source:source + 1]
        prompt = kv.shape[4]
        if beams > self.free_rows():
            raise ValueError(f"decode batch: {beams} rows requested, {self.free_rows()} free of {self.max_rows}")
        free = [r for r in range(self.rows) if r not in self._taken()]
        if len(free) < beams or prompt > self.capacity:
            need_rows = row_bucket(self.used_rows + beams, self.max_rows, self.row_buckets)
            self._reallocate(max(need_rows, self.rows), max(prompt, self._longest()), max_positions)
            free = [r for r in range(self.rows) if r not in self._taken()]
        rows = free[:beams]
        self.members[key] = BatchMember.joining(rows, max_positions, prompt, kv.shape[2] == 1)
        for b, r in enumerate(rows):
            np.copyto(self.buffer[:, :, r, :, :prompt], kv[:, :, b if kv.shape[2] > 1 else 0])
            self.buffer[:, :, r, :, prompt:] = 0.0
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
        """Beam b of `key` takes the filled rows of its beam `beam_indices[b]` (within the member's rows), copying
        only where the two beams' histories differ (`beam_moves`: beam search mostly moves beams that differ in
        their last few tokens, so this copies those, not the whole generation)."""
        member = self.members[key]
        rows = member.rows
        n = int(self.lengths[rows[0]])                       # its beams hold the same number of positions
        for dst, src, lo in member.moves(beam_indices, n):
            if dst == PARKED:
                np.copyto(self._spare_slot()[:, :, :, lo:n], self.buffer[:, :, rows[src], :, lo:n])
            elif src == PARKED:
                np.copyto(self.buffer[:, :, rows[dst], :, lo:n], self._spare_slot()[:, :, :, lo:n])
            else:
                for layer in self.buffer:                    # per (layer, K/V): disjoint views, no temporary
                    for kv in layer:
                        np.copyto(kv[rows[dst], :, lo:n], kv[rows[src], :, lo:n])

    # -- a step ---------------------------------------------------------------------------------------
    def ensure_room(self) -> None:
        """Before a step: every member row's next position fits (grow the position bucket if not)."""
        need = self._longest() + 1
        if need > self.capacity:
            self._reallocate(self.rows, need, None)

    def append(self, kv_new: np.ndarray) -> None:
        """Write a step's kv_new (layers, 2, R, heads, 1, head_dim) at each member row's next position."""
        rows = np.array(sorted(self._taken()), np.int64)
        if rows.size == 0:
            return
        pos = self.lengths[rows]
        # one strided copy per row: a scatter with index arrays on axes 2 and 4 ran ~3x slower (0.86 vs 0.3 ms
        # at 4 full-size rows)
        for r, p in zip(rows.tolist(), pos.tolist()):
            self.buffer[:, :, r, :, p, :] = kv_new[:, :, r, :, 0, :]
        self.mask[rows, pos] = 1.0
        self.lengths[rows] += 1

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

    def _spare_slot(self) -> np.ndarray:
        if self._spare is None:
            self._spare = np.zeros((self.layers, 2, self.heads, self.capacity, self.head_dim), self.dtype)
        return self._spare

    def _reallocate(self, rows: int, positions: int, new_max_positions: int | None, *,
                    capacity: int | None = None) -> None:
        """New arrays of `rows` rows and the bucket holding `positions`; members compacted to the front, in
        joining order (one copy of each filled row)."""
        limit = max(self._max_positions(), new_max_positions or 0)
        capacity = capacity if capacity is not None else bucket_for(positions, self.buckets, limit)
        if positions > limit:
            raise ValueError(f"decode batch: {positions} positions requested, its members were sized for {limit}")
        old = (self.buffer, self.mask, self.lengths, self.mel_ids, self.mel_pos)
        self._allocate(rows, capacity)
        r = 0
        for member in self.members.values():
            moved = []
            for src in member.rows:
                n = int(old[2][src])
                np.copyto(self.buffer[:, :, r, :, :n], old[0][:, :, src, :, :n])
                self.mask[r, :n] = old[1][src, :n]
                self.lengths[r], self.mel_ids[r], self.mel_pos[r] = n, old[3][src], old[4][src]
                moved.append(r)
                r += 1
            member.rows = moved
