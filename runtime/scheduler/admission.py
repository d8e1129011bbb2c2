"""How many requests a Synthesizer takes at once: a bounded number in flight, a bounded number waiting.

A request holds a slot from its start (references prepared) to the end of its stream. When every slot is
taken, up to `max_queued` callers wait (in arrival order) for one; the next caller gets QueueFull at once,
so an overloaded process answers "busy" instead of holding unbounded work in memory. A waiting caller
gives up after `timeout_s` (QueueFull too).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from runtime.errors import QueueFull


class Admission:
    def __init__(self, max_active: int, max_queued: int, timeout_s: float | None = None) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError(f"admission: max_active must be >= 1 and max_queued >= 0, got {max_active}, {max_queued}")
        self.max_active, self.max_queued, self.timeout_s = max_active, max_queued, timeout_s
        self.active = 0
        self._waiting: deque[object] = deque()
        self._cv = threading.Condition()

    def acquire(self) -> None:
        """Take a slot (waiting in line if all are taken); QueueFull when the line is full or the wait ends."""
        with self._cv:
            if self.active < self.max_active and not self._waiting:
                self.active += 1
                return
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"busy: {self.active} request(s) in flight and {len(self._waiting)} waiting "
                                f"(at most {self.max_active} + {self.max_queued}); retry later")
            me = object()
            self._waiting.append(me)
            deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
            try:
                while not (self.active < self.max_active and self._waiting[0] is me):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise QueueFull(f"busy: waited {self.timeout_s:.1f} s for one of {self.max_active} "
                                        "request slots; retry later")
                    self._cv.wait(left)
                self.active += 1
            finally:
                self._waiting.remove(me)
                self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self.active -= 1
            self._cv.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)
