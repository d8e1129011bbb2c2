"""Per-stage wall time of a segment and its progress line, shared by the runtime and the eager reference."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from runtime.gpt.codes import SegmentCodes

log = logging.getLogger("runtime.synthesizer")


class Laps:
    """Wall time per stage: `lap(name)` closes the stage that began at the previous lap (or at start)."""

    def __init__(self) -> None:
        self.start = self._clock = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = now - self._clock
        self._clock = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def log_segment(index: int, count: int, seg: "SegmentCodes", samples: int, sample_rate: int,
                timings: "Laps | Mapping[str, float]") -> None:
    """The progress line of a finished segment: tokens, codes, audio, and the wall time of each stage
    (`*_wait` entries: time spent waiting for another request's use of a stage)."""
    if isinstance(timings, Laps):
        timings = timings.timings
    work = sum(v for k, v in timings.items() if not k.endswith("_wait"))
    log.info("segment %d/%d: %d text tokens -> %d codes%s -> %.2f s of audio in %.2f s (%s)", index + 1, count,
             seg.text_ids.size, seg.codes.size, "" if seg.result.stopped else " (max)", samples / sample_rate,
             work, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if v >= 0.005 or not k.endswith("_wait")))
