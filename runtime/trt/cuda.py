"""The one module that calls cuda-python: device and pinned allocations, streams, events, copies and CUDA
graphs, each call checked, for the TensorRT executor (runtime/trt/executor.py) and the device KV caches
(runtime/trt/kv_device.py, runtime/trt/kv_batch_device.py).

Why one module: cuda-python does not raise. Every call returns a tuple `(cudaError_t, *outputs)`
(engines/TENSORRT_API.md §5), so an unchecked call fails silently and the next one fails
somewhere else. Here every call goes through `check`, which turns a non-success code into a
`BackendError` naming the call and CUDA's own name and description of the error (e.g.
"cudaMalloc(16 bytes for ...) failed: cudaErrorInsufficientDriver (CUDA driver version is insufficient
for CUDA runtime version)"), plus a hint for the codes that mean "no usable GPU here"; for
cudaErrorInsufficientDriver the hint is the GPU probe's (runtime/trt/gpu.py: the driver found, the driver
the wheels need, and the build to install instead).

Seams: the cudart module is looked up by `cudart()` (which asks runtime.trt.gpu.cudart()) at every call, so
tests substitute a fake module by monkeypatching this one function; nothing is imported at module
level. Pointers are plain ints; streams, events and graphs are cuda-python handle objects, converted to
ints for TensorRT with `native_handle` (cuda.bindings.utils.get_cuda_native_handle on cuda-python >= 13,
where int(handle) is deprecated).

Signatures (checked against the docstrings of the installed cuda-bindings 13.4 and the official examples;
https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html):
  cudaMalloc(size) -> (err, ptr)                     cudaFree(ptr) -> (err,)
  cudaMallocHost(size) -> (err, ptr)                 cudaFreeHost(ptr) -> (err,)
  cudaMemcpyAsync(dst, src, count, kind, stream)     cudaMemsetAsync(ptr, value, count, stream)
  cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream)   (width in bytes <= pitches)
  cudaMemcpy3DAsync(p: cudaMemcpy3DParms, stream)    (p.srcPtr / p.dstPtr = make_cudaPitchedPtr(ptr, pitch,
      xsize, ysize), p.srcPos / p.dstPos = make_cudaPos(x, y, z), p.extent = make_cudaExtent(w, h, d), p.kind)
  cudaMemset2DAsync(ptr, pitch, value, width, height, stream)
  cudaStreamCreateWithFlags(flags) -> (err, stream)  cudaStreamSynchronize / cudaStreamDestroy(stream)
  cudaEventCreate() -> (err, event)                  cudaEventRecord(event, stream), cudaEventSynchronize
  cudaEventElapsedTime(start, end) -> (err, ms)      cudaEventDestroy(event)
  cudaStreamBeginCapture(stream, mode)               cudaStreamEndCapture(stream) -> (err, graph)
  cudaGraphInstantiate(graph, flags) -> (err, exec)  (cuda-python 12.x and 13.x; flags 0)
  cudaGraphLaunch(exec, stream)                      cudaGraphDestroy(graph), cudaGraphExecDestroy(exec)
  cudaGetErrorName / cudaGetErrorString(err) -> (err, bytes)                cudaGetLastError() -> (err,)
"""

from __future__ import annotations

import ctypes
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from runtime.errors import BackendError

log = logging.getLogger(__name__)

SUCCESS = 0
#: error codes that mean "no usable GPU here" rather than a bug: a hint is added to their message
#: (cudaErrorInsufficientDriver, 35, gets the GPU probe's explanation: see `_hint`)
_HINTS = {
    100: "no CUDA-capable GPU is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)",   # cudaErrorNoDevice
    2: "the GPU is out of memory (other processes, or a larger batch / cache than fits)",  # cudaErrorMemoryAllocation
}
_INVALIDATED = 901              # cudaErrorStreamCaptureInvalidated
_KINDS = {"htoh": "cudaMemcpyHostToHost", "htod": "cudaMemcpyHostToDevice", "dtoh": "cudaMemcpyDeviceToHost",
          "dtod": "cudaMemcpyDeviceToDevice", "default": "cudaMemcpyDefault"}
_CAPTURE_MODES = {"global": "cudaStreamCaptureModeGlobal", "thread_local": "cudaStreamCaptureModeThreadLocal",
                  "relaxed": "cudaStreamCaptureModeRelaxed"}


def cudart() -> Any:
    """The cuda-python runtime module (the single lookup every function here uses; tests replace it)."""
    from runtime.trt import gpu

    rt = gpu.cudart()
    if rt is None:
        raise BackendError("cuda-python is not installed: pip install cuda-python (the TensorRT backend needs it)")
    return rt


# ---------------------------------------------------------------------------------------------------
# Errors


def error_code(err: Any) -> int:
    """The integer value of a cudaError_t (an IntEnum in cuda-python; `.value` on other wrappers)."""
    try:
        return int(err)
    except (TypeError, ValueError):
        return int(getattr(err, "value"))


def _text(fn: Callable[[Any], Any], err: Any) -> str:
    """cudaGetErrorName / cudaGetErrorString -> str ((err, bytes) tuple; never raises)."""
    try:
        result = fn(err)
        value = result[1] if isinstance(result, tuple) else result
        if isinstance(value, (bytes, bytearray)):
            return value.decode(errors="replace").rstrip("\x00")
        return "" if value is None else str(value)
    except Exception:  # noqa: BLE001 — describing an error must not raise another one
        return ""


def describe_error(err: Any, rt: Any = None) -> str:
    """"cudaErrorX (description)" for a cudaError_t."""
    code = error_code(err)
    try:
        rt = rt if rt is not None else cudart()
        name = _text(rt.cudaGetErrorName, err)
        string = _text(rt.cudaGetErrorString, err)
    except BackendError:
        name = string = ""
    name = name or getattr(err, "name", "") or f"CUDA error {code}"
    return f"{name} ({string})" if string and string != name else name


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python result: `(err,)` -> None, `(err, x)` -> x, `(err, x, y)` -> (x, y);
    a non-success `err` -> BackendError naming `what` and the error."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    code = error_code(err)
    if code != SUCCESS:
        hint = _hint(code)
        raise BackendError(f"{what} failed: {describe_error(err)}" + (f"; {hint}" if hint else ""))
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def _hint(code: int) -> str | None:
    if code == 35:                       # cudaErrorInsufficientDriver: which driver, what the wheels need
        from runtime.trt import gpu

        try:
            return gpu.insufficient_driver(cudart())
        except BackendError:
            return gpu.insufficient_driver(None)
    return _HINTS.get(code)


def clear_last_error() -> None:
    """Reset CUDA's sticky last error after a failure we recovered from (e.g. an invalidated capture)."""
    try:
        cudart().cudaGetLastError()
    except Exception:  # noqa: BLE001 — best effort
        pass


def native_handle(obj: Any) -> int:
    """A stream / event / graph handle as an int (what TensorRT's execute_async_v3 takes).

    cuda-python >= 13 deprecates int(handle) in favour of cuda.bindings.utils.get_cuda_native_handle,
    which does not take plain ints; both are handled."""
    if obj is None:
        return 0
    if isinstance(obj, int):
        return int(obj)
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # type: ignore[import-not-found]

        return int(get_cuda_native_handle(obj))
    except (ImportError, TypeError, AttributeError, ValueError):
        return int(obj)


def _free_quietly(free: Callable[[int], Any], ptr: int) -> None:
    """Garbage-collection fallback for a buffer nobody closed (errors at interpreter exit are ignored)."""
    try:
        free(ptr)
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class DeviceArray:
    """A typed view of device memory: what a feed or an output target is when it already lives on the
    GPU (the TensorRT executor binds `ptr` directly, without a copy). Owns nothing: the allocation it
    points into (a DeviceBuffer) must outlive it."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "ptr", int(self.ptr))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def offset(self, *index: int) -> int:
        """Byte offset of the sub-array at a leading index (C order), e.g. offset(layer) of a stacked cache."""
        if len(index) > self.ndim:
            raise IndexError(f"index {index} has more axes than shape {self.shape}")
        stride, out = self.nbytes, 0
        for axis, i in enumerate(index):
            stride //= self.shape[axis]
            if not 0 <= i < self.shape[axis]:
                raise IndexError(f"index {i} out of range for axis {axis} of shape {self.shape}")
            out += int(i) * stride
        return out

    def at(self, *index: int) -> "DeviceArray":
        """The sub-array at a leading index (a view: same memory)."""
        return DeviceArray(self.ptr + self.offset(*index), self.shape[len(index):], self.dtype)


class _Allocation:
    """One allocation of `nbytes` at `ptr`, freed once by `close()` with the cuda-python function named
    `free_name` (or, as a fallback, when garbage-collected)."""

    free_name = ""

    def _own(self, ptr: int, rt: Any) -> None:
        self.ptr = int(ptr)
        self._finalizer = weakref.finalize(self, _free_quietly, getattr(rt, self.free_name), self.ptr)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        if self._finalizer.alive:
            self._finalizer.detach()
            ptr, self.ptr = self.ptr, 0
            self._released()
            check(getattr(cudart(), self.free_name)(ptr), f"{self.free_name}({self.what})")

    def _released(self) -> None:
        """Drop what views the memory (before it is freed)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DeviceBuffer(_Allocation):
    """One cudaMalloc'd allocation, freed by `close()` (or, as a fallback, when garbage-collected)."""

    free_name = "cudaFree"

    def __init__(self, nbytes: int, what: str = "a device buffer") -> None:
        rt = cudart()
        self.nbytes = int(nbytes)
        self.what = what
        self._own(check(rt.cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes} bytes for {what})"), rt)

    def array(self, shape: Sequence[int], dtype: Any = np.float32, offset: int = 0) -> DeviceArray:
        view = DeviceArray(self.ptr + int(offset), tuple(shape), np.dtype(dtype))
        if offset < 0 or offset + view.nbytes > self.nbytes:
            raise ValueError(f"{self.what}: a {view.dtype}{view.shape} view at byte {offset} does not fit "
                             f"in {self.nbytes} bytes")
        return view


class PinnedBuffer(_Allocation):
    """Page-locked host memory (cudaMallocHost): the staging area of async host<->device copies.

    `view(dtype, count)` maps it as numpy through ctypes (np.frombuffer over a ctypes byte array at the
    address; np.ctypeslib.as_ctypes_type cannot do float16, NVIDIA/TensorRT#3222). Views must not
    outlive `close()`; the executor keeps them private."""

    free_name = "cudaFreeHost"

    def __init__(self, nbytes: int, what: str = "a pinned host buffer") -> None:
        rt = cudart()
        self.nbytes = int(nbytes)
        self.what = what
        ptr = check(rt.cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes} bytes for {what})")
        self._own(ptr, rt)
        self._bytes = np.frombuffer((ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr), np.uint8)

    def bytes(self) -> np.ndarray:
        """The whole buffer as a flat uint8 array."""
        return self._bytes[: self.nbytes]

    def view(self, dtype: Any, shape: Sequence[int]) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(f"{self.what}: {dtype}{tuple(shape)} does not fit in {self.nbytes} bytes")
        return self._bytes[: count * dtype.itemsize].view(dtype).reshape(tuple(shape))

    def _released(self) -> None:
        self._bytes = np.zeros(0, np.uint8)


# ---------------------------------------------------------------------------------------------------
# Streams and events


class Stream:
    """A non-blocking CUDA stream (TensorRT: "Please use non-default stream"; graph capture needs one too).

    `raw` is the cuda-python handle (for cudart calls), `handle` the int TensorRT takes."""

    def __init__(self) -> None:
        rt = cudart()
        self.raw = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.handle = native_handle(self.raw)
        self._open = True

    def sync(self) -> None:
        check(cudart().cudaStreamSynchronize(self.raw), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._open:
            self._open = False
            check(cudart().cudaStreamDestroy(self.raw), "cudaStreamDestroy")


class Event:
    """A CUDA event for GPU-side timing (`end.elapsed_ms(start)` after `end.sync()`)."""

    def __init__(self) -> None:
        self.raw = check(cudart().cudaEventCreate(), "cudaEventCreate")
        self._open = True

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.raw, stream.raw), "cudaEventRecord")

    def sync(self) -> None:
        check(cudart().cudaEventSynchronize(self.raw), "cudaEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        return float(check(cudart().cudaEventElapsedTime(start.raw, self.raw), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self._open:
            self._open = False
            check(cudart().cudaEventDestroy(self.raw), "cudaEventDestroy")


def _stream(stream: Stream | None) -> Any:
    return 0 if stream is None else stream.raw


def _kind(rt: Any, kind: str) -> Any:
    if kind not in _KINDS:
        raise ValueError(f"copy kind {kind!r}: one of {', '.join(_KINDS)}")
    return getattr(rt.cudaMemcpyKind, _KINDS[kind])


# ---------------------------------------------------------------------------------------------------
# Copies (pointers are ints; host pointers should be pinned for the copy to be truly asynchronous)


def memcpy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream | None) -> None:
    if nbytes <= 0:
        return
    rt = cudart()
    check(rt.cudaMemcpyAsync(int(dst), int(src), int(nbytes), _kind(rt, kind), _stream(stream)),
          f"cudaMemcpyAsync({nbytes} bytes, {kind})")


def memcpy_htod_async(dst: int, src: int, nbytes: int, stream: Stream | None) -> None:
    memcpy_async(dst, src, nbytes, "htod", stream)


def memcpy_dtoh_async(dst: int, src: int, nbytes: int, stream: Stream | None) -> None:
    memcpy_async(dst, src, nbytes, "dtoh", stream)


def memcpy2d_async(dst: int, dpitch: int, src: int, spitch: int, width_bytes: int, height: int, kind: str,
                   stream: Stream | None) -> None:
    """`height` rows of `width_bytes` bytes, row r from src + r*spitch to dst + r*dpitch (C order)."""
    if width_bytes <= 0 or height <= 0:
        return
    if width_bytes > dpitch or width_bytes > spitch:
        raise ValueError(f"memcpy2d: width {width_bytes} bytes exceeds a pitch (dst {dpitch}, src {spitch})")
    rt = cudart()
    check(rt.cudaMemcpy2DAsync(int(dst), int(dpitch), int(src), int(spitch), int(width_bytes), int(height),
                               _kind(rt, kind), _stream(stream)),
          f"cudaMemcpy2DAsync({height} rows of {width_bytes} bytes, {kind})")


def memcpy3d_async(dst: int, dst_pitch: int, dst_rows: int, dst_pos: Sequence[int], src: int, src_pitch: int,
                   src_rows: int, src_pos: Sequence[int], width_bytes: int, height: int, depth: int, kind: str,
                   stream: Stream | None) -> None:
    """`depth` slices of `height` rows of `width_bytes` bytes between two pitched objects of linear memory, each
    given as (start pointer, pitch in bytes, rows per slice, position (x bytes, y rows, z slices)): byte i of
    row j of slice k moves from src + (sz+k)*src_pitch*src_rows + (sy+j)*src_pitch + sx + i to the same place
    of dst. cudaMemcpy3DAsync takes the cudaMemcpy3DParms struct (zero-initialised by its constructor; no
    CUDA array on either side, so positions and the extent width are in bytes)."""
    if width_bytes <= 0 or height <= 0 or depth <= 0:
        return
    rt = cudart()
    p = rt.cudaMemcpy3DParms()
    p.srcPtr = rt.make_cudaPitchedPtr(int(src), int(src_pitch), int(src_pitch), int(src_rows))
    p.srcPos = rt.make_cudaPos(*(int(v) for v in src_pos))
    p.dstPtr = rt.make_cudaPitchedPtr(int(dst), int(dst_pitch), int(dst_pitch), int(dst_rows))
    p.dstPos = rt.make_cudaPos(*(int(v) for v in dst_pos))
    p.extent = rt.make_cudaExtent(int(width_bytes), int(height), int(depth))
    p.kind = _kind(rt, kind)
    check(rt.cudaMemcpy3DAsync(p, _stream(stream)),
          f"cudaMemcpy3DAsync({depth} x {height} rows of {width_bytes} bytes, {kind})")


def memset2d_async(ptr: int, pitch: int, value: int, width_bytes: int, height: int, stream: Stream | None) -> None:
    """`height` rows of `width_bytes` bytes at ptr + r*pitch set to byte `value`."""
    if width_bytes <= 0 or height <= 0:
        return
    check(cudart().cudaMemset2DAsync(int(ptr), int(pitch), int(value), int(width_bytes), int(height), _stream(stream)),
          f"cudaMemset2DAsync({height} rows of {width_bytes} bytes)")


def memset_async(ptr: int, value: int, nbytes: int, stream: Stream | None) -> None:
    if nbytes <= 0:
        return
    check(cudart().cudaMemsetAsync(int(ptr), int(value), int(nbytes), _stream(stream)),
          f"cudaMemsetAsync({nbytes} bytes)")


# ---------------------------------------------------------------------------------------------------
# CUDA graphs (capture / instantiate / launch; the policy of when is runtime/trt/cuda_graphs.py's)


def begin_capture(stream: Stream, mode: str = "thread_local") -> None:
    """Start capturing `stream` (trtexec captures TensorRT's enqueue in thread-local mode)."""
    rt = cudart()
    check(rt.cudaStreamBeginCapture(stream.raw, getattr(rt.cudaStreamCaptureMode, _CAPTURE_MODES[mode])),
          "cudaStreamBeginCapture")


def end_capture(stream: Stream) -> Any:
    """End the capture -> the captured graph. A failed capture (e.g. invalidated by an operation not
    allowed while capturing) -> BackendError, after destroying a partial graph and clearing the error."""
    rt = cudart()
    result = rt.cudaStreamEndCapture(stream.raw)
    err, graph = result[0], (result[1] if len(result) > 1 else None)
    code = error_code(err)
    if code != SUCCESS:
        if code != _INVALIDATED and graph is not None and native_handle(graph) != 0:
            try:
                rt.cudaGraphDestroy(graph)
            except Exception:  # noqa: BLE001 — cleanup after a failure
                pass
        clear_last_error()
        raise BackendError(f"cudaStreamEndCapture failed: {describe_error(err, rt)}")
    return graph


def instantiate(graph: Any) -> Any:
    """The executable of a captured graph; the graph itself is destroyed either way (a replay needs only
    the executable, so every capture site ends here)."""
    try:
        return check(cudart().cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
    finally:
        destroy_graph(graph)


def launch(graph_exec: Any, stream: Stream) -> None:
    check(cudart().cudaGraphLaunch(graph_exec, stream.raw), "cudaGraphLaunch")


def destroy_graph(graph: Any) -> None:
    check(cudart().cudaGraphDestroy(graph), "cudaGraphDestroy")


def destroy_exec(graph_exec: Any) -> None:
    check(cudart().cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
