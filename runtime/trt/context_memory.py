"""Activation memory of TensorRT execution contexts: which allocation strategy, and the user-managed block.

Why: `engine.create_execution_context()` defaults to ExecutionContextAllocationStrategy.STATIC, "static
allocation with the maximum size across all profiles" (NvInferRuntime.h). The executor makes one context
per optimization profile, so with the default each of gpt_decode's per-bucket contexts would hold the
LARGEST bucket's activations, and dit_step would always hold its profile maximum (4500 frames) whatever
the segment's length. Instead:
- ON_PROFILE_CHANGE ("Reallocate for a profile when it's selected") for every engine by default: each
  context holds its own profile's memory;
- USER_MANAGED for large single-profile engines (profile maximum >= `user_memory_min_bytes`): after the
  input shapes are set, `ctx.update_device_memory_size_for_shapes()` says what THESE shapes need
  ("Must specify all input shapes and the optimization profile to use before calling this function";
  0 means an error) and `ctx.set_device_memory(ptr, size)` hands over a block at least that big (the
  10.1+ form with a size; the `device_memory` attribute is the deprecated size-less one). This is the
  flow of trtexec's "runtime" allocation strategy and Polygraphy's TrtRunner(allocation_strategy="runtime").
  The block only grows (1.5x steps, capped at the profile's maximum,
  engine.get_device_memory_size_for_profile_v2), so a run after a longer one reuses it.
  Whether the size really shrinks with the shapes depends on the plan: TensorRT >= 10.10 sizes activations
  per shape when the plan was built with PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10; otherwise it
  reports the profile's maximum, which is still no worse than STATIC.

The block's address is baked into a captured CUDA graph like any tensor address, so a move (growth) is
reported to the caller, which drops the context's graphs. Memory in use by a pending enqueue is never
freed: every run synchronises its stream before returning (runtime/trt/executor.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from runtime.errors import BackendError
from runtime.trt.cuda import DeviceBuffer
from runtime.trt.output_allocator import ALIGNMENT, grown_size

log = logging.getLogger(__name__)

USER_MEMORY_MIN_BYTES = 64 << 20     # single-profile engines whose activations can exceed this are user-managed
STATIC, ON_PROFILE_CHANGE, USER_MANAGED = "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"


def choose_strategy(num_profiles: int, profile_max_bytes: int, user_memory_min_bytes: int) -> str:
    """USER_MANAGED for a single-profile engine with large activations, else ON_PROFILE_CHANGE (never
    STATIC: with one context per profile it would give every context the largest profile's memory)."""
    if num_profiles == 1 and profile_max_bytes >= user_memory_min_bytes:
        return USER_MANAGED
    return ON_PROFILE_CHANGE


def strategy_enum(trt: Any, name: str) -> Any:
    return getattr(trt.ExecutionContextAllocationStrategy, name)


@dataclass
class UserMemory:
    """The activation block of one USER_MANAGED context (grown, never shrunk; freed by close())."""

    what: str
    upper_bytes: int                          # the profile's maximum (get_device_memory_size_for_profile_v2)
    buffer: DeviceBuffer | None = None
    needed: int = 0                           # what TensorRT asked for at the current shapes

    def fit(self, ctx: Any, logger_errors: Any = ()) -> bool:
        """After the input shapes were set: make the block big enough for them -> whether it moved."""
        needed = int(ctx.update_device_memory_size_for_shapes())
        if needed <= 0 and self.upper_bytes > 0:
            raise BackendError(f"{self.what}: update_device_memory_size_for_shapes failed (returned {needed}; "
                               f"{'; '.join(list(logger_errors)[-2:]) or 'no error logged'}); every input shape "
                               "must be set first")
        self.needed = needed
        if self.buffer is not None and self.buffer.nbytes >= needed:
            return False
        old = self.buffer
        size = grown_size(old.nbytes if old is not None else 0, needed, ALIGNMENT)
        size = max(min(size, -(-self.upper_bytes // ALIGNMENT) * ALIGNMENT), needed, 1)
        self.buffer = DeviceBuffer(size, f"activation memory of {self.what}")
        ctx.set_device_memory(self.buffer.ptr, self.buffer.nbytes)
        if old is not None:
            old.close()                       # no enqueue is pending: runs synchronise before returning
        log.debug("%s: activation memory %d bytes (needed %d, profile maximum %d)", self.what,
                  self.buffer.nbytes, needed, self.upper_bytes)
        return True

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None
