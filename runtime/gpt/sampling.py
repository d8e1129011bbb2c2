"""Upstream's logits processing and token selection as numpy functions (float32, as torch computes them).

upstream: transformers 4.52.1 `generation/logits_process.py` (RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), in the order and with the conditions of
`indextts/gpt/transformers_generation_utils.py:GenerationMixin._get_logits_processor`; the selection
statements of its `_sample` (argmax / `multinomial(probs, 1)`) and `_beam_search` (`topk` /
`multinomial(probs, 2 * num_beams)` + stable sort); torch's CPU `multinomial` without replacement
(top-n of p / q with q ~ Exp(1)) and CPU `topk` (libstdc++ `partial_sort`, whose order decides ties).

Every processor works IN PLACE on a float32 (rows, vocab) score matrix and takes a `Workspace` of
preallocated scratch buffers, so the decode loop allocates nothing of vocabulary size per step; pass
copies when you want pure behaviour (the fixture handlers and tests do). The random draws come from an
injectable `DrawSource`: given the same Exp(1) variates as torch's generator produced, the selection
is the one torch makes, which is what makes two implementations comparable token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np

FILTER_VALUE = float("-inf")


@dataclass
class Workspace:
    """Scratch buffers for one (rows, vocab) score matrix; `flat` views serve the joint (1, rows*vocab) beam step."""

    a: np.ndarray          # (rows, vocab) float32
    b: np.ndarray          # (rows, vocab) float32
    c64: np.ndarray        # (rows, vocab) float64: torch's cumsum accumulates in double
    m1: np.ndarray         # (rows, vocab) bool
    m2: np.ndarray         # (rows, vocab) bool
    col: np.ndarray        # (rows, 1) float32
    col2: np.ndarray       # (rows, 1) float32

    @classmethod
    def create(cls, rows: int, vocab: int) -> Workspace:
        shape = (rows, vocab)
        return cls(np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.float64),
                   np.empty(shape, bool), np.empty(shape, bool),
                   np.empty((rows, 1), np.float32), np.empty((rows, 1), np.float32))

    def fits(self, x: np.ndarray) -> bool:
        return self.a.shape == x.shape


def _ws(x: np.ndarray, ws: Workspace | None) -> Workspace:
    return ws if ws is not None and ws.fits(x) else Workspace.create(*x.shape)


def log_softmax(x: np.ndarray, out: np.ndarray | None = None, ws: Workspace | None = None) -> np.ndarray:
    """Row-wise `(x - max) - log(sum(exp(x - max)))`, the operation order of torch's CPU kernel."""
    ws = _ws(x, ws)
    out = np.empty_like(x) if out is None else out
    np.max(x, axis=-1, keepdims=True, out=ws.col)
    np.subtract(x, ws.col, out=out)                       # (rows, V) x - max
    np.exp(out, out=ws.b)
    np.sum(ws.b, axis=-1, keepdims=True, out=ws.col2)
    np.log(ws.col2, out=ws.col2)
    return np.subtract(out, ws.col2, out=out)


def softmax(x: np.ndarray, out: np.ndarray | None = None, ws: Workspace | None = None) -> np.ndarray:
    """Row-wise `exp(x - max) * (1 / sum)`, as torch's CPU softmax (x and out may be the same array)."""
    ws = _ws(x, ws)
    out = np.empty_like(x) if out is None else out
    np.max(x, axis=-1, keepdims=True, out=ws.col)
    np.subtract(x, ws.col, out=out)
    np.exp(out, out=out)
    np.sum(out, axis=-1, keepdims=True, out=ws.col)
    np.divide(np.float32(1.0), ws.col, out=ws.col)
    return np.multiply(out, ws.col, out=out)


def seen_mask(input_ids: np.ndarray, vocab: int) -> np.ndarray:
    """(rows, vocab) bool: which ids occur in each row of `input_ids` (all the penalty looks at)."""
    seen = np.zeros((input_ids.shape[0], vocab), bool)
    np.put_along_axis(seen, np.asarray(input_ids, np.int64), True, axis=1)
    return seen


def repetition_penalty_(scores: np.ndarray, seen: np.ndarray, penalty: float, ws: Workspace | None = None) -> np.ndarray:
    """Seen ids: `s * penalty` where s < 0, else `s / penalty` (upstream applies it on log-probs with beams, raw logits without)."""
    ws = _ws(scores, ws)
    p = np.float32(penalty)
    np.less(scores, 0, out=ws.m1)
    np.greater_equal(scores, 0, out=ws.m2)
    np.logical_and(ws.m1, seen, out=ws.m1)
    np.logical_and(ws.m2, seen, out=ws.m2)
    np.multiply(scores, p, out=scores, where=ws.m1)
    return np.divide(scores, p, out=scores, where=ws.m2)


def temperature_(scores: np.ndarray, temperature: float) -> np.ndarray:
    """`scores / temperature` in float32 (torch divides by the float32-cast scalar)."""
    return np.divide(scores, np.float32(temperature), out=scores)


def top_k_(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1, filter_value: float = FILTER_VALUE,
           ws: Workspace | None = None) -> np.ndarray:
    """Entries below each row's k-th largest value (k = max(top_k, min_tokens_to_keep)) -> filter; ties kept."""
    ws = _ws(scores, ws)
    vocab = scores.shape[-1]
    k = min(max(int(top_k), int(min_tokens_to_keep)), vocab)
    np.copyto(ws.a, scores)
    ws.a.partition(vocab - k, axis=-1)
    np.less(scores, ws.a[:, vocab - k:vocab - k + 1], out=ws.m1)
    np.copyto(scores, np.float32(filter_value), where=ws.m1)
    return scores


def top_p_(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1, filter_value: float = FILTER_VALUE,
           ws: Workspace | None = None) -> np.ndarray:
    """Nucleus filter: ascending (stable) sort, cumulative softmax <= 1 - top_p removed, the top min_tokens_to_keep kept.

    The removed entries are a prefix of the ascending order, so instead of scattering a sorted mask back
    (what upstream does) each row removes the values below its last removed value plus, among values
    equal to it, the lowest-index ones (torch's CPU sort is stable): the same set, without index arrays.
    """
    ws = _ws(scores, ws)
    vocab = scores.shape[-1]
    _sorted_rows(scores, np.float32(filter_value), ws)      # ws.a: (rows, V) ascending
    softmax(ws.a, out=ws.b, ws=ws)
    np.copyto(ws.c64, ws.b)
    np.cumsum(ws.c64, axis=-1, out=ws.c64)                 # accumulated in double, as torch's CPU cumsum
    np.copyto(ws.b, ws.c64, casting="unsafe")             # float32 cumulative probabilities
    threshold = np.float32(1.0 - top_p)                   # torch compares with the float32-cast Python float
    for row in range(scores.shape[0]):
        # the cumulative row is non-decreasing: the removed entries (cum <= threshold) are a prefix
        j = min(int(np.searchsorted(ws.b[row], threshold, side="right")), vocab - int(min_tokens_to_keep))
        if j <= 0:
            continue
        last = ws.a[row, j - 1]
        mask, ties = ws.m1[row], ws.m2[row]
        np.less(scores[row], last, out=mask)
        n_ties = j - int(np.count_nonzero(mask))
        if n_ties > 0:
            np.equal(scores[row], last, out=ties)
            mask[np.flatnonzero(ties)[:n_ties]] = True
        np.copyto(scores[row], np.float32(filter_value), where=mask)
    return scores


def _sorted_rows(scores: np.ndarray, filter_value: np.float32, ws: Workspace) -> None:
    """ws.a = each row of `scores` sorted ascending. After top-k most entries are `filter_value` (-inf): such a
    row is built as the filter values followed by its few other values sorted, the same array as the full sort
    (equal values are indistinguishable) at a fraction of its cost — the sort was most of a sampled step's
    host time at the real vocabulary (0.6 of 0.9 ms per row)."""
    vocab = scores.shape[-1]
    for row in range(scores.shape[0]):
        np.not_equal(scores[row], filter_value, out=ws.m1[row])
        kept = np.count_nonzero(ws.m1[row])
        if kept * 8 > vocab:
            np.copyto(ws.a[row], scores[row])
            ws.a[row].sort()
            continue
        ws.a[row, :vocab - kept] = filter_value
        ws.a[row, vocab - kept:] = np.sort(scores[row][ws.m1[row]])


@dataclass(frozen=True)
class ProcessorSettings:
    """The processor list generate() builds (RepetitionPenalty; Temperature/TopK/TopP only when sampling)."""

    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_tokens_to_keep: int = 1


def process_scores_(scores: np.ndarray, seen: np.ndarray, settings: ProcessorSettings,
                    ws: Workspace | None = None) -> np.ndarray:
    """Apply upstream's processor chain in its order, each processor only under the condition HF adds it."""
    ws = _ws(scores, ws)
    if settings.repetition_penalty != 1.0:
        repetition_penalty_(scores, seen, settings.repetition_penalty, ws)
    if not settings.do_sample:
        return scores
    if settings.temperature != 1.0:
        temperature_(scores, settings.temperature)
    if settings.top_k is not None and settings.top_k != 0:
        top_k_(scores, settings.top_k, settings.min_tokens_to_keep, ws=ws)
    if settings.top_p is not None and settings.top_p < 1.0:
        top_p_(scores, settings.top_p, settings.min_tokens_to_keep, ws=ws)
    return scores


# ---------------------------------------------------------------------------------------------------
# Draws and selection


class DrawSource(Protocol):
    """Where the randomness comes from: Exp(1) variates, the `q` of torch's no-replacement multinomial."""

    def exponential(self, out: np.ndarray) -> np.ndarray:
        """Fill `out` (float32, the shape of the probabilities being drawn from) and return it."""
        ...


class RngDraws:
    """Seedable draws from a numpy Generator (the runtime default)."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def exponential(self, out: np.ndarray) -> np.ndarray:
        self._rng.standard_exponential(out=out, dtype=np.float32)
        # an exact 0 would turn p / q into inf or NaN; torch ignores that 2**-53 case, we clamp it
        return np.maximum(out, np.float32(np.finfo(np.float32).tiny), out=out)


class ReplayDraws:
    """Replays recorded variates (e.g. torch's `exponential_` output), one array per draw, in order."""

    def __init__(self, draws: Iterable[np.ndarray]) -> None:
        self._draws = iter(draws)

    def exponential(self, out: np.ndarray) -> np.ndarray:
        try:
            src = next(self._draws)
        except StopIteration as err:
            raise RuntimeError("ReplayDraws ran out of recorded draws") from err
        np.copyto(out, np.asarray(src, np.float32).reshape(out.shape))
        return out


def topk_indices(values: np.ndarray, k: int, scratch: np.ndarray | None = None,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest entries of a 1-D array, largest first, in torch's CPU `topk` order.

    torch's CPU topk runs `std::partial_sort` (k * 64 <= n), whose heap decides which of several equal
    values is taken and in which order. Without ties at or above the k-th value the answer is the plain
    descending top-k; with ties (e.g. zero probabilities when fewer than k entries can be drawn) the heap
    is replayed exactly. (For n < 64 k torch uses nth_element instead; tie order may then differ.)
    `scratch` (float, like values) and `mask` (bool) are optional preallocated buffers.
    """
    n = values.shape[0]
    scratch = np.empty_like(values) if scratch is None else scratch
    mask = np.empty(n, bool) if mask is None else mask
    np.copyto(scratch, values)
    scratch.partition(n - k)
    np.greater_equal(values, scratch[n - k], out=mask)
    if np.count_nonzero(mask) == k and np.unique(scratch[n - k:]).size == k:
        idx = np.flatnonzero(mask)                          # (k,) ascending index order
        return idx[np.argsort(-values[idx], kind="stable")]
    return _heap_topk(values, k)


def _heap_topk(values: np.ndarray, k: int) -> np.ndarray:
    """libstdc++ `partial_sort(first, first + k, last, greater)` over (value, index), replayed in Python."""
    heap = [(float(values[i]), i) for i in range(k)]
    _make_heap(heap)
    lowest = min(v for v, _ in heap)
    for i in (np.flatnonzero(values[k:] > lowest) + k).tolist():
        v = float(values[i])
        if v > heap[0][0]:                                 # comp(*i, *first): replace the heap's minimum
            _adjust_heap(heap, 0, k, (v, i))
    for last in range(k - 1, 0, -1):                       # sort_heap
        value = heap[last]
        heap[last] = heap[0]
        _adjust_heap(heap, 0, last, value)
    return np.array([i for _, i in heap], dtype=np.int64)


def _comp(x: tuple[float, int], y: tuple[float, int]) -> bool:
    return x[0] > y[0]


def _make_heap(heap: list) -> None:
    n = len(heap)
    if n < 2:
        return
    for parent in range((n - 2) // 2, -1, -1):
        _adjust_heap(heap, parent, n, heap[parent])


def _adjust_heap(heap: list, hole: int, length: int, value: tuple[float, int]) -> None:
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _comp(heap[child], heap[child - 1]):
            child -= 1
        heap[hole] = heap[child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        heap[hole] = heap[child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and _comp(heap[parent], value):
        heap[hole] = heap[parent]
        hole = parent
        parent = (hole - 1) // 2
    heap[hole] = value


def multinomial_without_replacement(probs: np.ndarray, n: int, q: np.ndarray, scratch: np.ndarray | None = None,
                                    mask: np.ndarray | None = None) -> np.ndarray:
    """torch.multinomial(probs, n) for one row: the top-n of p / q (q ~ Exp(1)), as torch returns them.

    `q` is overwritten with p / q. n = 1 is `argmax` (first maximum), as torch does.
    """
    ratio = np.divide(probs, q, out=q)
    if n == 1:
        return np.array([int(np.argmax(ratio))], dtype=np.int64)
    return topk_indices(ratio, n, scratch, mask)


def beam_candidates(scores: np.ndarray, n: int, draws: DrawSource | None, ws: Workspace | None = None,
                    probs: np.ndarray | None = None, q: np.ndarray | None = None) -> np.ndarray:
    """`_beam_search`'s 2B candidates: flat indices into the (B, V) scores (beam scores added), rank order.

    Without draws: `topk(scores.view(1, B*V), n)`. With draws: `multinomial(softmax(scores.view(1, B*V)), n)`
    (no replacement), then the drawn entries re-sorted by score, descending and stable, as torch.sort does.
    `ws` is a (1, B*V) workspace; `probs`, `q` optional (1, B*V) float32 buffers.
    """
    flat = scores.reshape(1, -1)                           # (1, B*V) view
    ws = _ws(flat, ws)
    if draws is None:
        return topk_indices(flat[0], n, ws.a[0], ws.m1[0])
    probs = softmax(flat, out=np.empty_like(flat) if probs is None else probs, ws=ws)
    q = draws.exponential(np.empty_like(flat) if q is None else q)
    idx = multinomial_without_replacement(probs[0], n, q[0], ws.a[0], ws.m1[0])
    return idx[np.argsort(-flat[0, idx], kind="stable")]
