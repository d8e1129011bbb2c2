"""One request's segments through the stages, in order, with the next segment's GPT running ahead.

Why: a segment's audio needs its codes (the GPT decode loop), then its mel (the Euler loop over
`dit_step`), then the vocoder. The first audio of segment k + 1 would wait for its GPT if that started only
after segment k's last chunk; instead a worker thread runs the GPT stage of every segment in order and
hands each result over a small queue, while the caller's thread runs the Euler loop and the vocoder
chunks of the segment before. Segment k + 1's GPT starts when segment k's first chunk is out, not earlier:
the first audio of the segment being made comes first (see _GptAhead). Nothing numerical changes: the GPT draws come from their own random stream
and only the worker reads it, the CFM noise from another stream read only by the caller's thread, both in
segment order (runtime/randomness.py), so the audio is the sequential audio sample for sample.

Ownership: the stages (`SegmentStages`, implemented by the Synthesizer) hand their graph work to the
scheduler's stage workers and wait for it (runtime/scheduler/), so two requests (or this request's worker
and its caller) never use one executor at once; see runtime/synthesizer.py. The worker is at most two segments ahead (one in
the queue, one being made), which bounds what it holds.

Ending: when the caller stops reading (the generator is closed, e.g. a client disconnects) or a stage
fails, the request's `cancel` flag is set (the scheduler drops its queued work and frees its batch rows at
the next step, failing the GPT worker's wait), and the worker is told to stop; the queue is drained so it
never blocks.
A failure is raised in the caller's thread as a StreamError naming how many chunks were delivered and the
segment it happened in; the Synthesizer stays usable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from runtime.errors import StreamError
from runtime.streaming.chunks import SILENCE, SPEECH, AudioChunk, StreamSettings

log = logging.getLogger(__name__)

HANDOFF_POLL_S = 0.1          # how often a blocked worker looks at the stop flag


class SegmentStages(Protocol):
    """What the pipeline needs from a synthesizer, one method per stage (each thread-safe on its own)."""

    def codes_stage(self, prep: Any, index: int, generation: Any) -> Any: ...
    def mel_stage(self, prep: Any, coded: Any, decoder: Any) -> Any: ...
    def vocoder_windows(self, frames: int, settings: StreamSettings) -> list[Any]: ...
    def vocode(self, mel: np.ndarray, window: Any, cancel: threading.Event | None = None) -> np.ndarray: ...
    def finish_segment(self, prep: Any, coded: Any, mel_stage: Any, pcm: np.ndarray, vocoder_s: float) -> Any: ...
    def silence(self, prep: Any) -> np.ndarray: ...


@dataclass
class _Handoff:
    index: int
    coded: Any = None
    error: BaseException | None = None


class _GptAhead:
    """The worker thread: every segment's GPT stage in order, handed over through a bounded queue.

    Segment k + 1's GPT starts only once segment k's first chunk is out (`released(k)`): the GPT of the next
    segment must not compete with the Euler loop of the segment whose audio is awaited. Measured on the
    2-core machine with the full-size demo: started at once (overlapping the Euler loop), it made the first
    audio of a 3-segment text 1.8x later (37.8 s against 21.2 s) for no shorter total.
    """

    def __init__(self, count: int, make: Callable[[int], Any]) -> None:
        self._queue: queue.Queue[_Handoff] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._released = [threading.Event() for _ in range(count)]
        self._thread = threading.Thread(target=self._work, args=(count, make), name="gpt-ahead", daemon=True)
        self._thread.start()

    def _work(self, count: int, make: Callable[[int], Any]) -> None:
        for index in range(count):
            while index and not self._released[index - 1].wait(HANDOFF_POLL_S):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                item = _Handoff(index, coded=make(index))
            except BaseException as err:           # handed to the caller's thread, which raises it
                item = _Handoff(index, error=err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=HANDOFF_POLL_S)
                    break
                except queue.Full:
                    continue
            if item.error is not None:
                return

    def get(self) -> _Handoff:
        return self._queue.get()

    def release(self, index: int) -> None:
        """Segment `index` delivered its first chunk: the next segment's GPT may start."""
        self._released[index].set()

    def stop(self) -> None:
        """Stop after the current segment; never blocks on the caller's side for longer than a drain."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass


def stream_segments(stages: SegmentStages, prep: Any, generation: Any, decoder: Any, settings: StreamSettings,
                    started: float) -> Iterator[AudioChunk]:
    """The request's chunks in order (see runtime/streaming/chunks.py). `started`: perf_counter() at the
    request's start, the origin of every chunk's `ready_s`."""
    count = len(prep.segments)
    ahead = _GptAhead(count, lambda i: stages.codes_stage(prep, i, generation)) if settings.pipeline else None
    delivered, offset, index = 0, 0, 0
    try:
        for index in range(count):
            if ahead is not None:
                item = ahead.get()
                if item.error is not None:
                    raise item.error
                coded = item.coded
            else:
                coded = stages.codes_stage(prep, index, generation)
            staged = stages.mel_stage(prep, coded, decoder)
            mel_ready = time.perf_counter() - started
            windows = stages.vocoder_windows(staged.frames, settings)
            released = False
            parts: list[np.ndarray] = []
            vocoder_s = 0.0
            for w, window in enumerate(windows):
                t0 = time.perf_counter()
                pcm = stages.vocode(staged.mel, window, getattr(prep, "cancel", None))
                vocoder_s += time.perf_counter() - t0
                parts.append(pcm)
                ready = time.perf_counter() - started
                if ahead is not None and not released:            # before the yield: the caller may be slow
                    ahead.release(index)
                    released = True
                last = w == len(windows) - 1
                result = stages.finish_segment(prep, coded, staged, np.concatenate(parts), vocoder_s) if last else None
                yield AudioChunk(pcm, index, count, offset, ready, delivered, SPEECH, last, result,
                                 mel_ready if w == 0 else None)
                delivered += 1
                offset += pcm.size
            if ahead is not None and not released:
                ahead.release(index)
            if not windows:                          # a silent segment (no codes): still reported
                result = stages.finish_segment(prep, coded, staged, np.zeros(0, np.int16), 0.0)
                yield AudioChunk(np.zeros(0, np.int16), index, count, offset, time.perf_counter() - started,
                                 delivered, SPEECH, True, result, mel_ready)
                delivered += 1
            if index < count - 1:
                gap = stages.silence(prep)
                yield AudioChunk(gap, index, count, offset, time.perf_counter() - started, delivered, SILENCE)
                delivered += 1
                offset += gap.size
    except Exception as err:                         # not GeneratorExit / KeyboardInterrupt / SystemExit
        raise StreamError(f"synthesis failed in segment {index + 1}/{count} after {delivered} chunk(s) "
                          f"({offset} samples) were delivered: {err}", chunks=delivered, segment=index,
                          retryable=bool(getattr(err, "retryable", False))) from err
    finally:
        cancel = getattr(prep, "cancel", None)
        if cancel is not None:           # work of this request still queued or in a shared batch is dropped
            cancel.set()
        if ahead is not None:
            ahead.stop()
