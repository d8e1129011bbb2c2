"""Fakes that behave like the real cuda-python runtime and tensorrt, for the TensorRT side on a CPU.

The fakes: `FakeCudart` stands in for cuda.bindings.runtime with host memory (ctypes allocations filled
with garbage, every copy bounds-checked against live allocations, stream capture recording the work
into a replayable "graph"); `FakeTrt` stands in for tensorrt with engines that run the tiny export's
ONNX graph in ONNX Runtime on whatever the bound addresses hold. So the executor's buffers, staging,
bindings, output allocator, CUDA-graph policy and the device cache run unchanged, and their results are
compared with ONNX Runtime / the host cache exactly.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import json
from pathlib import Path

import numpy as np

from runtime.trt.engine_plan import (
    EngineKey,
    GpuInfo,
    PlanRecord,
    engine_profiles,
    plan_paths,
    write_record,
)

RTX3090 = GpuInfo("NVIDIA GeForce RTX 3090", "8.6")
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
TRT_VERSION = "10.13.0.35"


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

    def __init__(self) -> None:
        self.device: dict[int, ctypes.Array] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.capturing: dict[int, list] = {}
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.invalidate_captures = False
        self.copies = 0
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
        buf = (ctypes.c_ubyte * n)()
        ctypes.memset(buf, 0xAB, n)                  # cudaMalloc does not zero: garbage shows a missed clear
        ptr = ctypes.addressof(buf)
        table[ptr] = buf
        return self.OK, ptr

    def cudaMalloc(self, n):
        return self._alloc(self.device, n)

    def cudaMallocHost(self, n):
        return self._alloc(self.host, n)

    def cudaFree(self, ptr):
        return (self.OK,) if self.device.pop(ptr, None) is not None else (self.cudaError_t.cudaErrorInvalidValue,)

    def cudaFreeHost(self, ptr):
        return (self.OK,) if self.host.pop(ptr, None) is not None else (self.cudaError_t.cudaErrorInvalidValue,)

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

    def _enqueue(self, stream, work) -> None:
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(work)
        else:
            work()

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
        self._enqueue(stream, work)
        return (self.OK,)

    def cudaMemsetAsync(self, ptr, value, n, stream):
        self._check(ptr, n, True, "memset")
        self._enqueue(stream, lambda: ctypes.memset(ptr, value, n))
        return (self.OK,)

    # streams, events
    def cudaStreamCreateWithFlags(self, flags):
        return self.OK, next(self._ids)

    def cudaStreamSynchronize(self, stream):
        assert int(stream) not in self.capturing, "synchronising a capturing stream"
        return (self.OK,)

    def cudaStreamDestroy(self, stream):
        return (self.OK,)

    def cudaEventCreate(self):
        return self.OK, next(self._ids)

    def cudaEventRecord(self, event, stream):
        return (self.OK,)

    def cudaEventSynchronize(self, event):
        return (self.OK,)

    def cudaEventElapsedTime(self, start, end):
        return self.OK, 0.25

    def cudaEventDestroy(self, event):
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
        for work in self.execs[exec_]:
            work()
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
    key = EngineKey(entry.name, entry.sha256, precision, engine_profiles(entry), trt_version, gpu_info, policy)
    write_record(sidecar, PlanRecord(key, "0" * 64))
    return plan


# ---------------------------------------------------------------------------------------------------
# Fake TensorRT over ONNX Runtime: the executor and the decode loop end to end


class FakeTrt:
    """tensorrt as far as the executor uses it; engines run the export's ONNX graph in ONNX Runtime."""

    __version__ = TRT_VERSION

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class ILogger:
        def __init__(self) -> None:
            pass

    class IOutputAllocator:
        def __init__(self) -> None:
            pass

    def __init__(self, manifest, root: Path, cudart: FakeCudart, capturable: bool = True) -> None:
        self.manifest, self.root, self.cudart, self.capturable = manifest, root, cudart, capturable
        self.executions = 0
        self.sessions: dict = {}

    @staticmethod
    def nptype(dtype):
        return dtype

    def Runtime(self, logger):  # noqa: N802 — tensorrt's spelling
        fake = self

        class _Runtime:
            def deserialize_cuda_engine(self, data: bytes):
                return FakeEngine(fake, fake.manifest.graph(json.loads(bytes(data))["graph"]))
        return _Runtime()

    def session(self, entry):
        import onnxruntime as ort

        if entry.name not in self.sessions:
            self.sessions[entry.name] = ort.InferenceSession(str(entry.path(self.root)),
                                                             providers=["CPUExecutionProvider"])
        return self.sessions[entry.name]


class FakeEngine:
    def __init__(self, trt: FakeTrt, entry) -> None:
        self.trt, self.entry = trt, entry
        self.names = [t.name for t in (*entry.inputs, *entry.outputs)]
        self.inputs = {t.name for t in entry.inputs}
        self.dtypes = {t.name: np.dtype(t.dtype) for t in (*entry.inputs, *entry.outputs)}
        self.profiles = engine_profiles(entry)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(self.profiles)
        self.contexts = 0

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if name in self.inputs else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        self.contexts += 1
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.profile = engine, None
        self.shapes: dict = {}
        self.addresses: dict = {}
        self.allocators: dict = {}
        self.shape_calls = 0

    def set_optimization_profile_async(self, index, stream):
        self.profile = self.engine.profiles[index]
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
        self.addresses[name] = int(address)
        return True

    def set_output_allocator(self, name, allocator):
        self.allocators[name] = allocator
        return True

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

    def execute_async_v3(self, stream):
        cudart, trt = self.engine.trt.cudart, self.engine.trt
        capturing = int(stream) in cudart.capturing
        if capturing and not trt.capturable:
            return False
        entry = self.engine.entry
        shapes, addresses = dict(self.shapes), dict(self.addresses)      # baked in, as in a CUDA graph
        if set(shapes) != self.engine.inputs:
            return False

        def work() -> None:
            trt.executions += 1
            feed = {}
            for spec in entry.inputs:
                dtype, shape = np.dtype(spec.dtype), shapes[spec.name]
                cudart._check(addresses[spec.name], int(np.prod(shape)) * dtype.itemsize, True, spec.name)
                feed[spec.name] = host_view(addresses[spec.name], shape, dtype).copy()
            names = [t.name for t in entry.outputs]
            for name, value in zip(names, trt.session(entry).run(names, feed)):
                value = np.ascontiguousarray(value, self.engine.dtypes[name])
                address = addresses.get(name)
                alloc = self.allocators.get(name)
                if alloc is not None:
                    address = alloc.reallocate_output_async(name, address or 0, max(value.nbytes, 1), 256, stream)
                    assert address, "the output allocator failed"
                    alloc.notify_shape(name, value.shape)
                cudart._check(address, value.nbytes, True, name)
                host_view(address, value.shape, value.dtype)[...] = value
        cudart._enqueue(stream, work)
        return True


def _feed(graph_kit, graph: str, sizes, seed: int = 0) -> dict:
    from export.dummy import feed_for

    dims, contracts, wrappers = graph_kit
    return {k: np.ascontiguousarray(v) for k, v in feed_for(contracts[graph], wrappers[graph], dims, sizes,
                                                            rng=seed).items()}


def _ort(root: Path, manifest, graph: str):
    from runtime.executors.ort import OrtExecutor

    return OrtExecutor(manifest.graph(graph), root, "ort-cpu")


