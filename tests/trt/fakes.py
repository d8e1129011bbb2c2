"""Fakes that behave like the real cuda-python runtime and tensorrt, for the TensorRT side on a CPU.

The fakes: `FakeCudart` stands in for cuda.bindings.runtime with host memory (ctypes allocations filled
with garbage, every copy bounds-checked against live allocations, stream capture recording the work
into a replayable "graph"); `FakeTrt` stands in for tensorrt with engines that run the tiny export's
ONNX graph in ONNX Runtime on whatever the bound addresses hold. So the executor's buffers, staging,
bindings, output allocator, CUDA-graph policy and the device cache run unchanged, and their results are
compared with ONNX Runtime / the host cache exactly.

What the real APIs enforce, the fakes enforce (a fake that accepts what TensorRT or CUDA rejects hides
bugs):
- cudaMalloc / cudaMallocHost return 256-byte aligned memory; set_tensor_address refuses (False) a device
  address that is not 256-byte aligned (NvInferRuntime.h, setTensorAddress: "The pointer must have at
  least 256-byte alignment"), and a device pointer for a tensor whose get_tensor_location is HOST;
- asynchronous work (copies, memsets, enqueues, graph launches) is queued per stream and lands only when
  that stream (or an event recorded after it) is synchronised, so a missing sync reads stale memory and
  fails a comparison; freeing memory that queued work still touches is an assertion (synchronise first);
- contexts created with USER_MANAGED have no activation memory until set_device_memory(ptr, size) with a
  size >= what update_device_memory_size_for_shapes() returned for the current shapes; execute_async_v3
  returns False otherwise. The activation memory is scribbled over at each run, so memory shared with a
  bound tensor corrupts its result;
- data-dependent outputs: enqueue synchronises internally (TensorRT must know the size), calls the
  allocator's reallocate_output_async (the legacy reallocate_output only when async is not overridden,
  as the Python binding's trampoline does) and notify_shape before execute_async_v3 returns; a null (0 or
  None) pointer makes execute_async_v3 return False;
- the runtime API is TensorRT 11's (the default `TRT_VERSION`; 10.12+ has the same calls): what 11 removed
  (`engine.device_memory_size`, `get_device_memory_size_for_profile`, `create_execution_context_without_device_
  memory`, ...; tests/trt/removed_api.py) is an AttributeError on the module, the engine and the context.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from runtime.trt.engine_plan import (
    EngineKey,
    GpuInfo,
    PlanRecord,
    engine_profiles,
    plan_paths,
    write_record,
)
from tests.trt.removed_api import REMOVED_NAMES, removed_message

RTX3090 = GpuInfo("NVIDIA GeForce RTX 3090", "8.6")
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
TRT_VERSION = "11.4.0.106"


# ---------------------------------------------------------------------------------------------------
# Fake cuda-python runtime (host memory)


class FakeCudart:
    """cuda.bindings.runtime over host memory: every call returns (cudaError_t, ...) like the real one."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2
        cudaErrorInvalidPitchValue = 12
        cudaErrorInsufficientDriver = 35
        cudaErrorStreamCaptureInvalidated = 901

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3
        cudaMemcpyDefault = 4

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1
        cudaStreamCaptureModeRelaxed = 2

    cudaStreamNonBlocking = 1
    max_pitch = 2**31 - 1            # cudaDevAttrMaxPitch of current GPUs (tests lower it to try the limit)

    ALIGNMENT = 256                  # cudaMalloc's guarantee (and what TensorRT requires of addresses)

    def __init__(self) -> None:
        self.device: dict[int, ctypes.Array] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.capturing: dict[int, list] = {}
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.pending: dict[int, list] = {}          # stream -> queued (work, spans), run at its sync
        self.events: dict[int, tuple[int, int]] = {}  # event -> (stream, queued items before it)
        self.invalidate_captures = False
        self.fail_mallocs = 0                         # the next N cudaMalloc calls run out of memory
        self.copies = 0
        self.syncs = 0
        self._ids = itertools.count(1000)

    OK = cudaError_t.cudaSuccess

    # errors
    def cudaGetErrorName(self, err):
        return self.OK, self.cudaError_t(int(err)).name.encode()

    def cudaGetErrorString(self, err):
        return self.OK, {2: b"out of memory", 35: b"CUDA driver version is insufficient for CUDA runtime version",
                         901: b"operation failed due to a previous error during capture"}.get(int(err), b"bad")

    def cudaGetLastError(self):
        return (self.OK,)

    # memory
    def _alloc(self, table, n):
        backing = (ctypes.c_ubyte * (n + self.ALIGNMENT))()
        offset = -ctypes.addressof(backing) % self.ALIGNMENT
        buf = (ctypes.c_ubyte * n).from_buffer(backing, offset)     # keeps `backing` alive
        ctypes.memset(buf, 0xAB, n)                  # cudaMalloc does not zero: garbage shows a missed clear
        ptr = ctypes.addressof(buf)
        table[ptr] = buf
        return self.OK, ptr

    def cudaMalloc(self, n):
        if self.fail_mallocs:
            self.fail_mallocs -= 1
            return self.cudaError_t.cudaErrorMemoryAllocation, None
        return self._alloc(self.device, n)

    def cudaMallocHost(self, n):
        return self._alloc(self.host, n)

    def _free(self, table, ptr):
        buf = table.get(ptr)
        if buf is None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        for stream, queue in self.pending.items():
            for _, spans in queue:
                assert not any(p < ptr + len(buf) and ptr < p + n for p, n in spans), (
                    f"freeing [{ptr}, +{len(buf)}) while queued work on stream {stream} still uses it "
                    "(synchronise the stream first)")
        del table[ptr]
        return (self.OK,)

    def cudaFree(self, ptr):
        return self._free(self.device, ptr)

    def cudaFreeHost(self, ptr):
        return self._free(self.host, ptr)

    def inside(self, table, ptr, n) -> bool:
        return any(p <= ptr and ptr + n <= p + len(b) for p, b in table.items())

    def _check(self, ptr, n, device: bool, what: str) -> None:
        if device:
            assert self.inside(self.device, ptr, n), f"{what}: [{ptr}, +{n}) is not inside a live device allocation"
        else:
            assert not self.inside(self.device, ptr, 1), f"{what}: a device pointer used as a host pointer"

    def _sides(self, kind):
        k = self.cudaMemcpyKind(int(kind))
        return {0: (False, False), 1: (False, True), 2: (True, False), 3: (True, True)}[int(k)]

    def _enqueue(self, stream, work, spans=()) -> None:
        """Queue `work` on `stream`: it runs when the stream is synchronised (or recorded into a capture).
        `spans`: the (pointer, bytes) ranges it touches (freeing them before it ran is a bug)."""
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(work)
        else:
            self.pending.setdefault(int(stream), []).append((work, tuple(spans)))

    def _flush(self, stream, count=None) -> None:
        queue = self.pending.get(int(stream), [])
        count = len(queue) if count is None else count
        for work, _ in queue[:count]:
            work()
        del queue[:count]
        for event, (s, n) in self.events.items():          # later events now wait for fewer items
            if s == int(stream):
                self.events[event] = (s, max(n - count, 0))

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        return self._copy(dst, n, src, n, n, 1, kind, stream)         # no pitch: no pitch limit

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        if max(dpitch, spitch) > self.max_pitch:          # "returns an error if dpitch or spitch exceeds the
            return (self.cudaError_t.cudaErrorInvalidPitchValue,)        # maximum allowed"
        return self._copy(dst, dpitch, src, spitch, width, height, kind, stream)

    @staticmethod
    def overlap(a, a_pitch, b, b_pitch, width, height) -> bool:
        """Whether two sets of `height` rows of `width` bytes share a byte ("the memory areas may not overlap")."""
        if a + (height - 1) * a_pitch + width <= b or b + (height - 1) * b_pitch + width <= a:
            return False
        rows = sorted([(a + r * a_pitch, 0) for r in range(height)] + [(b + r * b_pitch, 1) for r in range(height)])
        ends = [-1, -1]
        for start, side in rows:
            if start < ends[1 - side]:
                return True
            ends[side] = max(ends[side], start + width)
        return False

    def _copy(self, dst, dpitch, src, spitch, width, height, kind, stream):
        if width > dpitch or width > spitch or self.overlap(dst, dpitch, src, spitch, width, height):
            return (self.cudaError_t.cudaErrorInvalidValue,)
        src_dev, dst_dev = self._sides(kind)
        span = lambda pitch: (height - 1) * pitch + width  # noqa: E731
        self._check(src, span(spitch), src_dev, "copy source")
        self._check(dst, span(dpitch), dst_dev, "copy destination")
        self.copies += 1

        def work():
            for r in range(height):
                ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self._enqueue(stream, work, [(src, span(spitch)), (dst, span(dpitch))])
        return (self.OK,)

    # cudaMemcpy3DParms and its parts: plain records, as the real struct's attributes (zero-initialised)
    class cudaMemcpy3DParms:
        def __init__(self) -> None:
            self.srcArray = self.dstArray = None
            self.srcPos = self.dstPos = FakeCudart.make_cudaPos(0, 0, 0)
            self.srcPtr = self.dstPtr = FakeCudart.make_cudaPitchedPtr(0, 0, 0, 0)
            self.extent = FakeCudart.make_cudaExtent(0, 0, 0)
            self.kind = FakeCudart.cudaMemcpyKind.cudaMemcpyHostToHost

    @staticmethod
    def make_cudaPitchedPtr(d, p, xsz, ysz):  # noqa: N802 — cudart's spelling
        return SimpleNamespace(ptr=int(d), pitch=int(p), xsize=int(xsz), ysize=int(ysz))

    @staticmethod
    def make_cudaPos(x, y, z):  # noqa: N802
        return SimpleNamespace(x=int(x), y=int(y), z=int(z))

    @staticmethod
    def make_cudaExtent(w, h, d):  # noqa: N802
        return SimpleNamespace(width=int(w), height=int(h), depth=int(d))

    def cudaMemcpy3DAsync(self, p, stream):
        """Linear memory only. "returns an error if the pitch of srcPtr or dstPtr exceeds the maximum allowed";
        each box must lie inside its object ("The source object must lie entirely within the region defined by
        srcPos and extent"): x + width <= pitch, y + height <= ysize; the objects may not overlap."""
        if p.srcArray is not None or p.dstArray is not None:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        w, h, d = p.extent.width, p.extent.height, p.extent.depth
        sides = []
        for ptr, pos in ((p.srcPtr, p.srcPos), (p.dstPtr, p.dstPos)):
            if ptr.pitch > self.max_pitch:
                return (self.cudaError_t.cudaErrorInvalidPitchValue,)
            if pos.x + w > ptr.pitch or pos.y + h > ptr.ysize:
                return (self.cudaError_t.cudaErrorInvalidValue,)
            base = ptr.ptr + (pos.z * ptr.ysize + pos.y) * ptr.pitch + pos.x
            sides.append([base + (k * ptr.ysize + j) * ptr.pitch for k in range(d) for j in range(h)])
        src_rows, dst_rows = sides
        if self._rows_overlap(src_rows, dst_rows, w):
            return (self.cudaError_t.cudaErrorInvalidValue,)
        src_dev, dst_dev = self._sides(p.kind)
        if not (w and h and d):
            return (self.OK,)
        span = lambda rows: (rows[0], rows[-1] + w - rows[0])  # noqa: E731
        self._check(*span(src_rows), src_dev, "3D copy source")
        self._check(*span(dst_rows), dst_dev, "3D copy destination")
        self.copies += 1

        def work():
            for s_row, d_row in zip(src_rows, dst_rows):
                ctypes.memmove(d_row, s_row, w)
        self._enqueue(stream, work, [span(src_rows), span(dst_rows)])
        return (self.OK,)

    @staticmethod
    def _rows_overlap(a_rows, b_rows, width) -> bool:
        rows = sorted([(a, 0) for a in a_rows] + [(b, 1) for b in b_rows])
        ends = [-1, -1]
        for start, side in rows:
            if start < ends[1 - side]:
                return True
            ends[side] = max(ends[side], start + width)
        return False

    def cudaMemset2DAsync(self, ptr, pitch, value, width, height, stream):
        if height > 1 and width > pitch:
            return (self.cudaError_t.cudaErrorInvalidValue,)
        if not (width and height):
            return (self.OK,)
        span = (height - 1) * pitch + width
        self._check(ptr, span, True, "memset2d")

        def work():
            for r in range(height):
                ctypes.memset(ptr + r * pitch, value, width)
        self._enqueue(stream, work, [(ptr, span)])
        return (self.OK,)

    def cudaMemsetAsync(self, ptr, value, n, stream):
        self._check(ptr, n, True, "memset")
        self._enqueue(stream, lambda: ctypes.memset(ptr, value, n), [(ptr, n)])
        return (self.OK,)

    # streams, events
    def cudaStreamCreateWithFlags(self, flags):
        return self.OK, next(self._ids)

    def cudaStreamSynchronize(self, stream):
        assert int(stream) not in self.capturing, "synchronising a capturing stream"
        self.syncs += 1
        self._flush(stream)
        return (self.OK,)

    def cudaStreamDestroy(self, stream):
        assert not self.pending.get(int(stream)), "destroying a stream with queued work (synchronise first)"
        return (self.OK,)

    def cudaEventCreate(self):
        return self.OK, next(self._ids)

    def cudaEventRecord(self, event, stream):
        self.events[int(event)] = (int(stream), len(self.pending.get(int(stream), [])))
        return (self.OK,)

    def cudaEventSynchronize(self, event):
        stream, count = self.events.get(int(event), (0, 0))
        self._flush(stream, count)
        return (self.OK,)

    def cudaEventElapsedTime(self, start, end):
        return self.OK, 0.25

    def cudaEventDestroy(self, event):
        self.events.pop(int(event), None)
        return (self.OK,)

    # graphs
    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = []
        return (self.OK,)

    def cudaStreamEndCapture(self, stream):
        work = self.capturing.pop(int(stream))
        if self.invalidate_captures:
            return self.cudaError_t.cudaErrorStreamCaptureInvalidated, None
        graph = next(self._ids)
        self.graphs[graph] = work
        return self.OK, graph

    def cudaGraphInstantiate(self, graph, flags):
        exec_ = next(self._ids)
        self.execs[exec_] = list(self.graphs[graph])
        return self.OK, exec_

    def cudaGraphLaunch(self, exec_, stream):
        works = list(self.execs[exec_])

        def launch():
            for work in works:
                work()
        self._enqueue(stream, launch)
        return (self.OK,)

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(graph)
        return (self.OK,)

    def cudaGraphExecDestroy(self, exec_):
        self.execs.pop(exec_)
        return (self.OK,)


def host_view(ptr: int, shape, dtype=np.float32) -> np.ndarray:
    """Fake device memory as numpy (it is host memory)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_ubyte * max(n, 1)).from_address(ptr), np.uint8)[:n].view(dtype).reshape(shape)


def _write_plan(root: Path, entry, precision: str, gpu_info: GpuInfo, trt_version: str, policy: str = "p") -> Path:
    plan, sidecar = plan_paths(root, entry.name, precision)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(json.dumps({"graph": entry.name}).encode())
    source = entry.form(precision) if precision in entry.forms else entry     # plans are built from the form
    key = EngineKey(entry.name, source.sha256, precision, engine_profiles(entry), trt_version, gpu_info, policy)
    write_record(sidecar, PlanRecord(key, "0" * 64))
    return plan


# ---------------------------------------------------------------------------------------------------
# Fake TensorRT over ONNX Runtime: the executor and the decode loop end to end


class FakeTrt:
    """tensorrt as far as the executor uses it; engines run the export's ONNX graph in ONNX Runtime.

    `host_inputs`: input names whose engine location is HOST (a shape tensor TensorRT wants on the CPU);
    `shape_io`: names is_shape_inference_io reports True for."""

    __version__ = TRT_VERSION

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class TensorLocation(enum.Enum):
        DEVICE = 0
        HOST = 1

    class ExecutionContextAllocationStrategy(enum.Enum):
        STATIC = 0
        ON_PROFILE_CHANGE = 1
        USER_MANAGED = 2

    class ILogger:
        def __init__(self) -> None:
            pass

    class IOutputAllocator:
        """The binding's trampoline: TensorRT calls reallocate_output_async, which falls back to the
        deprecated reallocate_output only when the subclass does not override the async one."""

        def __init__(self) -> None:
            pass

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return None

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

    def __init__(self, manifest, root: Path, cudart: FakeCudart, capturable: bool = True,
                 version: str = TRT_VERSION) -> None:
        self.manifest, self.root, self.cudart, self.capturable = manifest, root, cudart, capturable
        self.__version__ = version
        self.executions = 0
        self.sessions: dict = {}
        self.engines: list = []
        self.host_inputs: set[str] = set()
        self.shape_io: set[str] = set()

    @staticmethod
    def nptype(dtype):
        return dtype

    def __getattr__(self, name):                       # only for names the module does not have
        if name in REMOVED_NAMES:
            raise AttributeError(f"module 'tensorrt' has no attribute '{name}' (removed in TensorRT 11; "
                                 f"replacement: {REMOVED_NAMES[name]})")
        raise AttributeError(f"module 'tensorrt' has no attribute '{name}'")

    def Runtime(self, logger):  # noqa: N802 — tensorrt's spelling
        fake = self

        class _Runtime:
            def deserialize_cuda_engine(self, data: bytes):
                engine = FakeEngine(fake, fake.manifest.graph(json.loads(bytes(data))["graph"]))
                fake.engines.append(engine)
                return engine
        return _Runtime()

    def session(self, entry):
        import onnxruntime as ort

        if entry.name not in self.sessions:
            self.sessions[entry.name] = ort.InferenceSession(str(entry.path(self.root)),
                                                             providers=["CPUExecutionProvider"])
        return self.sessions[entry.name]


def _activation_bytes(entry, shapes) -> int:
    """The fake engines' activation memory at these input shapes: twice the inputs' bytes, 256-rounded
    (any monotone function of the shapes does: the executor must ask, not guess)."""
    n = sum(int(np.prod(shapes[t.name])) * np.dtype(t.dtype).itemsize for t in entry.inputs)
    return -(-2 * n // 256) * 256


class _Removed:
    """Names TensorRT 11 removed are an AttributeError that says so (the executor must not use them)."""

    _owner = "object"

    def __getattr__(self, name):                       # only for names the object does not have
        if name in REMOVED_NAMES:
            raise AttributeError(removed_message(self._owner, name))
        raise AttributeError(f"'{self._owner}' object has no attribute '{name}'")


class FakeEngine(_Removed):
    _owner = "ICudaEngine"

    def __init__(self, trt: FakeTrt, entry) -> None:
        self.trt, self.entry = trt, entry
        self.names = [t.name for t in (*entry.inputs, *entry.outputs)]
        self.inputs = {t.name for t in entry.inputs}
        self.dtypes = {t.name: np.dtype(t.dtype) for t in (*entry.inputs, *entry.outputs)}
        self.profiles = engine_profiles(entry)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(self.profiles)
        self.contexts = 0
        self.created: list[FakeContext] = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if name in self.inputs else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_location(self, name):
        host = name in self.trt.host_inputs and name in self.inputs
        return FakeTrt.TensorLocation.HOST if host else FakeTrt.TensorLocation.DEVICE

    def is_shape_inference_io(self, name):
        return name in self.trt.shape_io

    def get_device_memory_size_for_profile_v2(self, index):
        return _activation_bytes(self.entry, {ip.name: ip.max for ip in self.profiles[index].inputs})

    @property
    def device_memory_size_v2(self):
        return max(self.get_device_memory_size_for_profile_v2(i) for i in range(len(self.profiles)))

    def create_execution_context(self, strategy=FakeTrt.ExecutionContextAllocationStrategy.STATIC):
        assert isinstance(strategy, FakeTrt.ExecutionContextAllocationStrategy), f"not a strategy: {strategy!r}"
        self.contexts += 1
        ctx = FakeContext(self, strategy)
        self.created.append(ctx)
        return ctx

    def activation_bytes(self) -> int:
        """Activation memory TensorRT itself holds for this engine's contexts (not USER_MANAGED ones)."""
        return sum(c.owned_memory for c in self.created)


class FakeContext(_Removed):
    _owner = "IExecutionContext"

    def __init__(self, engine: FakeEngine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.shapes: dict = {}
        self.addresses: dict = {}
        self.allocators: dict = {}
        self.shape_calls = 0
        self.device_memory: tuple[int, int] | None = None        # (ptr, size) given by set_device_memory
        self.memory_asked = 0                                     # what update_device_memory_size_for_shapes said
        self._select(0)                                           # "assigned optimization profile 0"

    @property
    def _strategies(self):
        return FakeTrt.ExecutionContextAllocationStrategy

    def _select(self, index) -> None:
        self.profile_index, self.profile = index, self.engine.profiles[index]
        s = self._strategies
        if self.strategy == s.STATIC:
            self.owned_memory = self.engine.device_memory_size_v2
        elif self.strategy == s.ON_PROFILE_CHANGE:
            self.owned_memory = self.engine.get_device_memory_size_for_profile_v2(index)
        else:
            self.owned_memory = 0

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < len(self.engine.profiles):
            raise RuntimeError("Error in set optimization profile async.")
        self._select(index)
        self.shapes.clear()
        return True

    def set_input_shape(self, name, shape):
        (ip,) = [i for i in self.profile.inputs if i.name == name]
        if len(shape) != len(ip.min) or any(not lo <= v <= hi for v, lo, hi in zip(shape, ip.min, ip.max)):
            return False
        self.shapes[name] = tuple(shape)
        self.shape_calls += 1
        return True

    def set_tensor_address(self, name, address):
        if name not in self.engine.names:
            return False
        cudart, address = self.engine.trt.cudart, int(address)
        if self.engine.get_tensor_location(name) == FakeTrt.TensorLocation.HOST:
            if cudart.inside(cudart.device, address, 1):
                return False                      # a device pointer for a tensor TensorRT reads on the host
        elif address % FakeCudart.ALIGNMENT:
            return False                          # "The pointer must have at least 256-byte alignment"
        self.addresses[name] = address
        return True

    def set_output_allocator(self, name, allocator):
        self.allocators[name] = allocator
        return True

    def update_device_memory_size_for_shapes(self):
        if set(self.shapes) != self.engine.inputs:
            return 0                              # "Must specify all input shapes ... 0 if error occurred"
        self.memory_asked = _activation_bytes(self.engine.entry, self.shapes)
        return self.memory_asked

    def set_device_memory(self, memory, size):
        cudart = self.engine.trt.cudart
        assert int(memory) % FakeCudart.ALIGNMENT == 0, "device memory must be 256-byte aligned"
        assert cudart.inside(cudart.device, int(memory), max(int(size), 1)), "device memory is not allocated"
        self.device_memory = (int(memory), int(size))

    def _sizes(self) -> dict:
        sizes = {}
        for spec in self.engine.entry.inputs:
            for d, v in zip(spec.shape, self.shapes[spec.name]):
                if isinstance(d, str):
                    sizes[d] = v
        return sizes

    def get_tensor_shape(self, name):
        spec = next(t for t in self.engine.entry.outputs if t.name == name)
        try:
            return spec.concrete(self._sizes())
        except KeyError:
            return tuple(-1 if isinstance(d, str) else d for d in spec.shape)

    def _memory_ready(self) -> bool:
        if self.strategy != self._strategies.USER_MANAGED:
            return True
        need = _activation_bytes(self.engine.entry, self.shapes)
        return self.device_memory is not None and self.device_memory[1] >= need

    def execute_async_v3(self, stream):
        cudart, trt = self.engine.trt.cudart, self.engine.trt
        capturing = int(stream) in cudart.capturing
        if capturing and not trt.capturable:
            return False
        entry = self.engine.entry
        if set(self.shapes) != self.engine.inputs or not self._memory_ready():
            return False
        shapes, addresses = dict(self.shapes), dict(self.addresses)      # baked in, as in a CUDA graph
        if any(n not in addresses for n in self.engine.inputs):
            return False
        outputs = {}
        if self.allocators:                      # data-dependent shapes: TensorRT waits for the values
            assert not capturing, "an engine with an output allocator cannot be captured"
            cudart.cudaStreamSynchronize(stream)
            outputs = self._compute(shapes, addresses)
            for name, alloc in self.allocators.items():
                value = outputs[name]
                ptr = alloc.reallocate_output_async(name, addresses.get(name, 0), max(value.nbytes, 1), 256,
                                                    int(stream))
                if not ptr:
                    return False
                addresses[name] = int(ptr)
                alloc.notify_shape(name, value.shape)
        memory = self.device_memory if self.strategy == self._strategies.USER_MANAGED else None
        spans = [(addresses[t.name], max(int(np.prod(shapes[t.name])) * np.dtype(t.dtype).itemsize, 1))
                 for t in entry.inputs]
        if memory is not None:
            spans.append(memory)

        def work() -> None:
            trt.executions += 1
            if memory is not None:                # activations overwrite their memory (before inputs are read)
                cudart._check(memory[0], memory[1], True, "activation memory")
                ctypes.memset(memory[0], 0xCD, memory[1])
            values = outputs or self._compute(shapes, addresses)
            for name, value in values.items():
                cudart._check(addresses[name], value.nbytes, True, name)
                host_view(addresses[name], value.shape, value.dtype)[...] = value
        cudart._enqueue(stream, work, spans)
        return True

    def _compute(self, shapes, addresses) -> dict:
        """Run the graph on what the input addresses hold now."""
        cudart, entry = self.engine.trt.cudart, self.engine.entry
        feed = {}
        for spec in entry.inputs:
            dtype, shape = np.dtype(spec.dtype), shapes[spec.name]
            cudart._check(addresses[spec.name], int(np.prod(shape)) * dtype.itemsize, True, spec.name)
            feed[spec.name] = host_view(addresses[spec.name], shape, dtype).copy()
        names = [t.name for t in entry.outputs]
        return {name: np.ascontiguousarray(value, self.engine.dtypes[name])
                for name, value in zip(names, self.engine.trt.session(entry).run(names, feed))}


def _feed(graph_kit, graph: str, sizes, seed: int = 0) -> dict:
    from export.dummy import feed_for

    dims, contracts, wrappers = graph_kit
    return {k: np.ascontiguousarray(v) for k, v in feed_for(contracts[graph], wrappers[graph], dims, sizes,
                                                            rng=seed).items()}


def _ort(root: Path, manifest, graph: str):
    from runtime.executors.ort import OrtExecutor

    return OrtExecutor(manifest.graph(graph), root, "ort-cpu")


