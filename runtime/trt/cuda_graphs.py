"""When to run a TensorRT step plainly, when to capture it into a CUDA graph and when to replay one:
pure bookkeeping, no CUDA import (the CUDA calls are the functions handed in), so the policy is tested
on the CPU with fakes.

Why capture: a decode step of a small GPT is hundreds of short kernels; replaying them as one graph
removes the per-kernel launch cost on the host (DESIGN.md §4). A graph bakes in everything the capture
saw: tensor addresses, input shapes, the optimization profile (engines/TENSORRT_API.md §6). So a graph is keyed by
(graph name, profile index, every I/O tensor's (name, shape, address)) and replayed only at that key.

Policy per key (engines/TENSORRT_API.md §6):
- first run: plain execution. TensorRT must run once before a capture (its first enqueue after a shape
  change does initialisation work that must not be captured);
- second run: capture, instantiate, launch (capturing does not execute the work, the launch does);
- later runs: replay;
- a capture that fails (TensorRT's enqueue returning False while capturing, or an invalidated capture)
  marks the key not capturable: plain execution from then on, never another attempt at that key.
Executables are kept in LRU order; beyond `capacity` the least recently used one is destroyed.
`invalidate(prefix)` forgets (and destroys) every key starting with `prefix`: the executor calls it when
an execution context's state changes (new shapes or addresses), after which a graph captured from the
old state must not run again, even if that state comes back (its next use is a warm-up run again).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)

WARM = "warm"                   # ran plainly once: the next run captures
UNCAPTURABLE = "uncapturable"   # a capture failed: always plain


@dataclass
class GraphStats:
    plain: int = 0
    captures: int = 0
    replays: int = 0
    failed_captures: int = 0
    evictions: int = 0


class GraphCache:
    """Plain run, capture or replay per key (see the module docstring).

    capture_fn(key) -> an instantiated executable (raises when the work cannot be captured);
    launch_fn(exec) runs it; destroy_fn(exec) frees it. `run(key, plain_fn)` returns which of
    "plain" / "capture" / "replay" happened."""

    def __init__(self, capacity: int, capture_fn: Callable[[Hashable], Any], launch_fn: Callable[[Any], None],
                 destroy_fn: Callable[[Any], None], max_states: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"GraphCache: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._capture, self._launch, self._destroy = capture_fn, launch_fn, destroy_fn
        self._execs: OrderedDict[Hashable, Any] = OrderedDict()
        self._states: OrderedDict[Hashable, str] = OrderedDict()   # keys seen without an executable
        self._max_states = max_states or max(64, 8 * capacity)
        self.stats = GraphStats()

    def __len__(self) -> int:
        return len(self._execs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._execs

    def state(self, key: Hashable) -> str | None:
        """"graph", "warm", "uncapturable" or None (never seen)."""
        return "graph" if key in self._execs else self._states.get(key)

    def run(self, key: Hashable, plain_fn: Callable[[], None]) -> str:
        graph_exec = self._execs.get(key)
        if graph_exec is not None:
            self._execs.move_to_end(key)
            self._launch(graph_exec)
            self.stats.replays += 1
            return "replay"
        state = self._states.get(key)
        if state is None or state == UNCAPTURABLE:
            plain_fn()
            self.stats.plain += 1
            if state is None:
                self._remember(key, WARM)
            return "plain"
        try:
            graph_exec = self._capture(key)
        except Exception as err:  # noqa: BLE001 — any capture failure means: run this key plainly
            log.warning("CUDA graph capture failed, running plainly from now on at this shape: %s", err)
            self.stats.failed_captures += 1
            self._remember(key, UNCAPTURABLE)
            plain_fn()
            self.stats.plain += 1
            return "plain"
        self._states.pop(key, None)
        self._execs[key] = graph_exec
        self.stats.captures += 1
        while len(self._execs) > self.capacity:
            _, old = self._execs.popitem(last=False)
            self.stats.evictions += 1
            self._destroy(old)
        self._launch(graph_exec)
        return "capture"

    def invalidate(self, prefix: tuple) -> int:
        """Forget every key (a tuple) starting with `prefix`, destroying its executable; -> how many
        executables were destroyed. "Not capturable" marks are kept (the engine did not change)."""
        n = len(prefix)
        stale = [k for k in self._execs if isinstance(k, tuple) and k[:n] == prefix]
        for key in stale:
            self._destroy(self._execs.pop(key))
        for key in [k for k, s in self._states.items() if s == WARM and isinstance(k, tuple) and k[:n] == prefix]:
            del self._states[key]
        return len(stale)

    def clear(self) -> None:
        """Destroy every executable and forget every key."""
        while self._execs:
            _, graph_exec = self._execs.popitem(last=False)
            self._destroy(graph_exec)
        self._states.clear()

    def _remember(self, key: Hashable, state: str) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self._max_states:
            self._states.popitem(last=False)
