"""The IOutputAllocator of data-dependent outputs (length_regulator's `cond` (B, max(ylens), C)).

TensorRT cannot know such an output's size before the values are computed, so enqueue asks the allocator
for memory once it knows the size (`reallocate_output_async`) and reports the shape (`notify_shape`)
before execute_async_v3 returns (NvInferRuntime.h, IOutputAllocator). The allocator hands out the buffer
preallocated at the range maximum, growing it when TensorRT asks for more.

Header rules followed (TensorRT 10.16 NvInferRuntime.h; engines/TENSORRT_API.md §4):
- override ONLY `reallocate_output_async`: `reallocate_output` is deprecated since 10.0 and "Code moving
  away from TensorRT 9.x should override method reallocateOutputAsync() and NOT override method
  reallocateOutput()" (the binding's trampoline calls the legacy one only when the async one is missing);
- failure is a null pointer: we return 0 (the binding turns a non-int such as None into nullptr too, but
  prints a cast error on stderr); exceptions never cross into TensorRT (they would be printed and
  swallowed), they are kept in `error` for the executor's message;
- `error` and `shape` describe ONE run: `begin_run()` clears them before each enqueue, so one failed
  growth does not fail every later run.
"""

from __future__ import annotations

from typing import Any

from runtime.trt.cuda import DeviceBuffer

ALIGNMENT = 256               # TensorRT's address alignment (setTensorAddress); cudaMalloc gives at least this

_CLASSES: dict[int, tuple[Any, type]] = {}     # id(trt module) -> (module, class)


def grown_size(current: int, needed: int, align: int = ALIGNMENT) -> int:
    """A growing buffer's new size: at least `needed`, at least 1.5x the old one (fewer reallocations
    when sizes creep up), rounded up to `align`."""
    size = max(int(needed), int(current * 1.5), 1)
    return -(-size // align) * align


def output_allocator_class(trt: Any) -> type:
    """The trt.IOutputAllocator subclass (made per tensorrt module: the base class only exists there)."""
    known = _CLASSES.get(id(trt))
    if known is not None and known[0] is trt:
        return known[1]

    class OutputAllocator(trt.IOutputAllocator):  # type: ignore[misc,name-defined]
        """Hands TensorRT a buffer for one data-dependent output and records the shape it reports."""

        def __init__(self, name: str, initial_bytes: int, what: str) -> None:
            trt.IOutputAllocator.__init__(self)   # required explicit base init (pybind11 trampoline)
            self.name, self.what = name, what
            self.buffer: DeviceBuffer | None = DeviceBuffer(initial_bytes, what) if initial_bytes else None
            self.shape: tuple[int, ...] | None = None
            self.error: Exception | None = None

        def begin_run(self) -> None:
            """Forget the previous run's shape and error (called before each enqueue)."""
            self.shape, self.error = None, None

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            try:
                return self._ensure(int(size), int(alignment))
            except Exception as err:  # noqa: BLE001 — must not propagate into TensorRT
                self.error = err
                return 0

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shape = tuple(int(d) for d in shape)

        def _ensure(self, size: int, alignment: int) -> int:
            if self.buffer is None or self.buffer.nbytes < size:
                old = self.buffer
                # Freeing the old buffer now is safe: every run synchronises its stream before returning,
                # so no earlier enqueue still uses it, and this enqueue has not written it yet.
                self.buffer = DeviceBuffer(grown_size(old.nbytes if old else 0, size, max(alignment, ALIGNMENT)),
                                           self.what)
                if old is not None:
                    old.close()
            if self.buffer.ptr % max(alignment, 1):
                raise ValueError(f"{self.what}: buffer at {self.buffer.ptr:#x} is not {alignment}-byte aligned")
            return self.buffer.ptr

        def close(self) -> None:
            if self.buffer is not None:
                self.buffer.close()
                self.buffer = None

    _CLASSES[id(trt)] = (trt, OutputAllocator)
    return OutputAllocator
