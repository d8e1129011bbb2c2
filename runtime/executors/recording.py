"""An executor that passes every call through and hands copies of chosen feeds to a sink.

Why here: two tools need the exact inputs a synthesis sends each graph — the benchmarks (to time every
backend on identical feeds) and the calibration collector (representative inputs at every graph boundary).
Both wrap the executors a Synthesizer runs, so the orchestration never knows it is being recorded.
`keep(call index) -> bool` chooses which calls are copied (a decode step's KV cache is large, so callers
keep a few); `reset()` restarts the call count (e.g. per segment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from runtime.executors.base import Executor, Feed


@dataclass
class RecordingExecutor:
    inner: Executor
    keep: Callable[[int], bool]
    sink: Callable[[int, Feed], None]
    calls: int = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def backend(self) -> str:
        return self.inner.backend

    @property
    def entry(self) -> Any:
        return self.inner.entry

    def reset(self) -> None:
        self.calls = 0

    def run(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> Feed:
        index, self.calls = self.calls, self.calls + 1
        if self.keep(index):
            self.sink(index, {k: np.array(v, copy=True) for k, v in feed.items()})
        return self.inner.run(feed, outputs)
