"""One TensorRT execution context of the executor: one optimization profile, its buffers and bindings.

Why one context per profile: a context's profile is chosen once and never switched, so its bound shapes,
addresses and captured CUDA graphs stay valid (engines/TENSORRT_API.md §4). Its activation memory follows
runtime/trt/context_memory.py (ON_PROFILE_CHANGE, or USER_MANAGED sized for the run's shapes), so an
unused bucket costs nothing and a used one only its own profile's memory.

Per tensor that goes through the host, a device buffer and a pinned staging buffer are allocated at the
profile's maximum the first time, and reused. `set_shape` / `bind` call TensorRT only for what changed
and report whether anything did (the executor then re-verifies output shapes and drops CUDA graphs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from runtime.errors import BackendError, ContractError
from runtime.trt.context_memory import USER_MANAGED, UserMemory, strategy_enum
from runtime.trt.cuda import DeviceBuffer, PinnedBuffer
from runtime.trt.feeds import profile_max_bytes
from runtime.trt.output_allocator import output_allocator_class

if TYPE_CHECKING:
    from runtime.trt.executor import TrtExecutor

log = logging.getLogger(__name__)


class TrtContext:
    """One execution context (one optimization profile) with its buffers and what is bound to it."""

    def __init__(self, owner: TrtExecutor, index: int) -> None:
        self.index, self.profile = index, owner.profiles[index]
        self.what = f"graph '{owner.name}' profile {self.profile.label}"
        self._errors = owner._logger.errors
        self.strategy = owner.memory_strategy
        ctx = owner._engine.create_execution_context(strategy_enum(owner._trt, self.strategy))
        if ctx is None:
            raise BackendError(f"{self.what}: TensorRT could not create an execution context "
                               f"(out of GPU memory?): {'; '.join(list(self._errors)[-3:])}")
        self.trt = ctx
        try:
            ctx.set_optimization_profile_async(index, owner.stream.handle)
        except RuntimeError as err:                   # the binding raises on failure (engines/TENSORRT_API.md §4)
            raise BackendError(f"{self.what}: set_optimization_profile_async failed: {err}") from err
        owner.stream.sync()
        self.memory = (UserMemory(self.what, int(owner._engine.get_device_memory_size_for_profile_v2(index)))
                       if self.strategy == USER_MANAGED else None)
        self.max_bytes = profile_max_bytes(owner.entry, self.profile)
        self.device: dict[str, DeviceBuffer] = {}
        self.pinned: dict[str, PinnedBuffer] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.allocators: dict[str, Any] = {}
        allocator_class = output_allocator_class(owner._trt) if owner.dd_outputs else None
        for name in owner.dd_outputs:
            alloc = allocator_class(name, self.max_bytes[name], f"output '{name}' of {self.what}")
            if not ctx.set_output_allocator(name, alloc):
                raise BackendError(f"{self.what}: TensorRT refused the output allocator of '{name}'")
            self.allocators[name] = alloc
            # Also bind the preallocated buffer (allowed with an allocator: "useful for preallocating memory,
            # and then reallocating if it's not big enough").
            self.bind(name, alloc.buffer.ptr)
        log.debug("%s: execution context (%s activation memory)", self.what, self.strategy)

    def device_buffer(self, name: str) -> DeviceBuffer:
        buf = self.device.get(name)
        if buf is None:
            buf = self.device[name] = DeviceBuffer(self.max_bytes[name], f"'{name}' of {self.what}")
        return buf

    def pinned_buffer(self, name: str, nbytes: int | None = None) -> PinnedBuffer:
        need = self.max_bytes[name] if nbytes is None else max(nbytes, self.max_bytes[name])
        buf = self.pinned.get(name)
        if buf is None or buf.nbytes < need:
            if buf is not None:
                buf.close()
            buf = self.pinned[name] = PinnedBuffer(need, f"staging of '{name}' of {self.what}")
        return buf

    def set_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        """set_input_shape only when the shape changed -> whether it did."""
        if self.shapes.get(name) == shape:
            return False
        if not self.trt.set_input_shape(name, shape):
            raise ContractError(f"{self.what}: TensorRT refused shape {shape} for input '{name}' "
                                f"({'; '.join(list(self._errors)[-2:])})")
        self.shapes[name] = shape
        return True

    def fit_memory(self) -> bool:
        """USER_MANAGED: activation memory for the shapes just set -> whether its address changed."""
        return self.memory.fit(self.trt, self._errors) if self.memory is not None else False

    def bind(self, name: str, address: int) -> bool:
        """set_tensor_address only when the address changed -> whether it did."""
        if self.addresses.get(name) == address:
            return False
        if not self.trt.set_tensor_address(name, int(address)):
            raise BackendError(f"{self.what}: TensorRT refused the address {int(address):#x} of tensor '{name}' "
                               f"({'; '.join(list(self._errors)[-2:]) or 'no error logged'})")
        self.addresses[name] = address
        return True

    def begin_run(self) -> None:
        for alloc in self.allocators.values():
            alloc.begin_run()

    def close(self) -> None:
        """Drop the context first (it references the allocators and the activation block), then free."""
        self.trt = None
        for buf in (*self.device.values(), *self.pinned.values(), *self.allocators.values()):
            buf.close()
        if self.memory is not None:
            self.memory.close()
        self.device.clear()
        self.pinned.clear()
        self.allocators.clear()
