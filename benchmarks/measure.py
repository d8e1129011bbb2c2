"""How a benchmark number is taken: repeated wall-clock runs after warm-up (median, min, max), peak
resident memory over a span of work, and this machine's streaming memory bandwidth.

Why wall clock and medians: every backend is measured in the same process on the same inputs, one after
the other, so the median of a few runs after a warm-up is robust to the odd slow run (page faults, the
other core's noise) while min and max show the spread. Peak memory is Linux's VmHWM, reset before each
span through /proc/self/clear_refs (writing "5"); where that is not possible the peak since process
start is reported and marked as such.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Stats:
    """Milliseconds over `n` runs."""

    median_ms: float
    min_ms: float
    max_ms: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Stats":
        if not seconds:
            raise ValueError("no runs to summarize")
        ms = [s * 1e3 for s in seconds]
        return cls(statistics.median(ms), min(ms), max(ms), len(ms))

    def scaled(self, factor: float) -> "Stats":
        """Every number times `factor` (e.g. a loop's time per iteration)."""
        return Stats(self.median_ms * factor, self.min_ms * factor, self.max_ms * factor, self.n)


@dataclass(frozen=True)
class Percentiles:
    """p50 (median) and nearest-rank p95 of `n` values, in the values' unit."""

    p50: float
    p95: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Percentiles":
        if not values:
            raise ValueError("no values to summarize")
        ordered = sorted(values)
        rank = (95 * len(ordered) + 99) // 100          # ceil(0.95 n) in integers: the nearest rank
        return cls(statistics.median(ordered), ordered[rank - 1], len(ordered))

    @property
    def p95_is_max(self) -> bool:
        """With fewer than 20 values the nearest-rank p95 is the largest one."""
        return self.n < 20


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1, *, min_seconds: float = 0.0,
            warmup_seconds: float = 0.0, max_runs: int = 50) -> Stats:
    """Run `fn` unmeasured at least `warmup` times and for at least `warmup_seconds`, then measured at least
    `repeats` times and for at least `min_seconds` (never more than `max_runs` of either).

    The time floors matter for fast stages: ONNX Runtime settles its memory arena and thread pool over the
    first few runs of a shape, and a handful of millisecond-scale runs is noise."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    start, runs = time.perf_counter(), 0
    while runs < max_runs and (runs < warmup or time.perf_counter() - start < warmup_seconds):
        fn()
        runs += 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < repeats or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Stats.of(times)


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, *,
                        min_seconds: float = 0.0, warmup_seconds: float = 0.0, max_runs: int = 50
                        ) -> dict[str, Stats]:
    """measure() for several competitors at once, in rounds: each round runs every function once, in an
    order that alternates between rounds. Why: this machine's speed drifts by ~10 % over minutes (shared
    host); measured one after the other, two backends would see different machines. The time floors apply
    per function (the round count is set by the slowest)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    spent = {n: 0.0 for n in names}
    rounds = 0
    while rounds < max_runs and (rounds < warmup or min(spent.values()) < warmup_seconds):
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            spent[n] += time.perf_counter() - t0
        rounds += 1
    times: dict[str, list[float]] = {n: [] for n in names}
    rounds = 0
    while rounds < max_runs and (rounds < repeats or min(sum(t) for t in times.values()) < min_seconds):
        for n in (names if rounds % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
        rounds += 1
    return {n: Stats.of(t) for n, t in times.items()}


def status_gib(fields: tuple[str, ...]) -> dict[str, float]:
    """These fields of /proc/self/status (VmRSS, RssAnon, ...) in GiB; the ones not there are left out."""
    kib = {f: _status_kib(f) for f in fields}
    return {f: v / 2**20 for f, v in kib.items() if v is not None}


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`; nothing elsewhere).

    Why: loading a model frees large temporaries (state dicts, converted copies) that glibc keeps mapped, so
    the resident memory after a load overstates what the model holds, and the next backend loaded in the
    same process reuses those pages and looks smaller than it is. Trimmed before and after each load, the
    difference is the memory the loaded backend holds."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def rss_mib() -> float | None:
    """Current resident set size."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


@dataclass(frozen=True)
class PeakMemory:
    """Peak RSS over a span, and the RSS when it began (so the span's own working memory is the difference)."""

    start_mib: float | None
    peak_mib: float | None
    since_start_of_process: bool        # True when the peak could not be reset (it may predate the span)

    @property
    def extra_mib(self) -> float | None:
        if self.start_mib is None or self.peak_mib is None:
            return None
        return max(self.peak_mib - self.start_mib, 0.0)


class PeakTracker:
    """`with PeakTracker() as t: work()` -> t.result (PeakMemory)."""

    def __enter__(self) -> "PeakTracker":
        self.reset = _reset_peak()
        self.start = rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        kib = _status_kib("VmHWM")
        self.result = PeakMemory(self.start, None if kib is None else kib / 1024, not self.reset)


def _reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Streaming bandwidth in GB/s: bytes read plus bytes written by a large numpy copy (best of `repeats`).

    One thread, as numpy copies; it is the ceiling a memory-bound decode step on this machine can reach
    when its weights do not fit in cache."""
    n = mib * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)                  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9
