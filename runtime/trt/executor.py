"""The TensorRT executor: one deserialized plan per graph, run with execute_async_v3 on a CUDA stream over
buffers allocated once (DESIGN.md §4), optionally replayed as CUDA graphs.

Refusals before anything is loaded (DESIGN.md §4-5, the "engine built for another GPU" bad input):
- no plan at OUT/engines/<graph>.<precision>.plan -> CheckpointError with the build command;
- a plan whose sidecar key (runtime/trt/engine_plan.py) is not what THIS machine would build (another GPU,
  TensorRT version, ONNX file, precision or profiles) -> EngineMismatchError saying what differs and to
  rebuild. The key's precision policy is taken from the record (the runtime does not know which policy
  file the build used; a plan built from the same ONNX with any policy is a valid plan of the graph).

Execution. One execution context per optimization profile, created when a feed first needs that profile
(gpt_decode has one profile per KV-cache bucket; a context owns activation memory, so unused buckets
cost nothing). The profile is the first whose ranges admit the feed's shapes (`select_profile`), else a
ContractError naming the input and the ranges. Per context and tensor, a device buffer and a pinned host
staging buffer are allocated at the profile's maximum shape the first time that tensor goes through the
host, and reused: a run copies host inputs numpy -> pinned -> device asynchronously, calls
set_input_shape / set_tensor_address only for what changed since the last run, enqueues, copies host
outputs device -> pinned, synchronises once and copies into the caller's `outputs` arrays (or fresh
ones). Two events time the GPU side: `last_gpu_ms`.

Extension of the Executor interface (runtime/executors/base.py), for device-resident data:
- a feed value may be a `runtime.trt.cuda.DeviceArray` (memory already on the GPU, e.g. the decode step's KV
  cache views): its pointer is bound directly, nothing is copied;
- `outputs` may map an output to a DeviceArray: the engine writes it there on the device (e.g. `kv_new`
  and the prefill's `kv`), and the result holds that same DeviceArray instead of a numpy array.
DeviceArrays must stay valid until `run` returns; the executor synchronises its stream before returning.

Data-dependent output shapes (length_regulator's `cond` (B, max(ylens), C)): an IOutputAllocator
(`reallocate_output[_async]` hands out a buffer preallocated at the range maximum, growing it if TensorRT
asks for more; `notify_shape` records the shape), read after the stream is synchronised.

CUDA graphs (`cuda_graphs=True`, for graphs whose shapes are all static per call: gpt_decode per bucket,
dit_step per length): runtime/trt/cuda_graphs.py decides plain / capture / replay per (graph, profile,
every tensor's shape and address); the capture follows engines/TENSORRT_API.md §6 (warm-up run first, thread-local
capture, the bool of execute_async_v3 AND cudaStreamEndCapture's error checked, fallback to plain runs).
A context's graphs are dropped whenever its shapes or addresses change. Engines with data-dependent
outputs are never captured.

Not thread-safe by design beyond one lock: runs of one executor are serialised (one stream, one context
per profile). TensorRT API (engines/TENSORRT_API.md §4): trt.Runtime(logger).deserialize_cuda_engine(bytes),
engine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype / num_optimization_profiles,
engine.create_execution_context(), ctx.set_optimization_profile_async(i, stream), ctx.set_input_shape,
ctx.set_tensor_address, ctx.get_tensor_shape, ctx.set_output_allocator, ctx.execute_async_v3(stream).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.contracts import DERIVED_AXES
from runtime.errors import (
    BackendError,
    CheckpointError,
    ContractError,
    EngineMismatchError,
)
from runtime.executors.base import (
    Feed,
    check_feed,
    check_outputs,
    check_tensor_shape,
    output_shapes,
)
from runtime.manifest import GraphEntry, TensorSignature
from runtime.trt import api, cuda, gpu
from runtime.trt.cuda import DeviceArray, DeviceBuffer, Event, PinnedBuffer, Stream
from runtime.trt.cuda_graphs import GraphCache, GraphStats
from runtime.trt.engine_plan import (
    EngineKey,
    GpuInfo,
    PlanRecord,
    Profile,
    check_record,
    engine_profiles,
    plan_paths,
    read_record,
)

log = logging.getLogger(__name__)

GRAPH_CAPACITY = 8          # instantiated CUDA graphs kept per executor (LRU)
BUILD_COMMAND = "python -m export.build --checkpoints <checkpoint dir> --out {root} --precision {precision}"


# ---------------------------------------------------------------------------------------------------
# Pure helpers (tested on the CPU)


def expected_key(entry: GraphEntry, precision: str, record: PlanRecord, trt_version: str, here: GpuInfo) -> EngineKey:
    """The key a plan of `entry` built on this machine would have (policy: the record's own)."""
    return EngineKey(entry.name, entry.sha256, precision, engine_profiles(entry), str(trt_version), here,
                     record.key.policy_sha256)


def select_profile(graph: str, profiles: Sequence[Profile], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose ranges admit `shapes`, else ContractError naming, per profile,
    the first input out of its range."""
    for index, profile in enumerate(profiles):
        if profile.admits(shapes):
            return index
    reasons = []
    for profile in profiles:
        for ip in profile.inputs:
            s = tuple(shapes.get(ip.name, ()))
            if len(s) != len(ip.min) or any(not lo <= v <= hi for v, lo, hi in zip(s, ip.min, ip.max)):
                reasons.append(f"profile {profile.label}: input '{ip.name}' shape {s} is outside "
                               f"min {ip.min} .. max {ip.max}")
                break
    raise ContractError(f"graph '{graph}': no optimization profile of the TensorRT engine admits this feed ("
                        + "; ".join(reasons) + "); pass a smaller input, or widen the manifest's ranges and "
                        "rebuild the engines")


def carried_axes(entry: GraphEntry) -> set[str]:
    """Dynamic axes some input carries (an output axis outside this set depends on the data)."""
    axes: set[str] = set()
    for spec in entry.inputs:
        for d in spec.shape:
            if isinstance(d, str):
                axes.add(DERIVED_AXES[d][0] if d in DERIVED_AXES else d)
    return axes


def data_dependent_outputs(entry: GraphEntry) -> tuple[str, ...]:
    """Outputs whose shape the inputs' shapes do not determine (e.g. length_regulator's cond)."""
    carried = carried_axes(entry)
    out = []
    for spec in entry.outputs:
        free = [DERIVED_AXES[d][0] if d in DERIVED_AXES else d for d in spec.shape if isinstance(d, str)]
        if any(a not in carried for a in free):
            out.append(spec.name)
    return tuple(out)


def profile_sizes(entry: GraphEntry, profile: Profile) -> dict[str, int]:
    """Every axis size at the profile's maximum shapes; axes no input carries take their range maximum."""
    sizes = {axis: r.max for axis, r in entry.ranges.items()}
    maxima = {ip.name: ip.max for ip in profile.inputs}
    for spec in entry.inputs:
        for d, v in zip(spec.shape, maxima.get(spec.name, ())):
            if isinstance(d, str) and d not in DERIVED_AXES:
                sizes[d] = int(v)
    return sizes


def tensor_nbytes(spec: TensorSignature, sizes: Mapping[str, int]) -> int:
    return math.prod(spec.concrete(sizes)) * np.dtype(spec.dtype).itemsize


def profile_max_bytes(entry: GraphEntry, profile: Profile) -> dict[str, int]:
    """Bytes of every I/O tensor at the profile's maximum (the size of its buffers)."""
    sizes = profile_sizes(entry, profile)
    return {spec.name: tensor_nbytes(spec, sizes) for spec in (*entry.inputs, *entry.outputs)}


def check_mixed_feed(entry: GraphEntry, feed: Mapping[str, Any]) -> dict[str, int]:
    """check_feed for host arrays, the same rules for DeviceArrays (dtype, rank, static sizes, one size per
    dynamic axis) -> the dynamic axis sizes."""
    host = [name for name, value in feed.items() if not isinstance(value, DeviceArray)]
    sizes = check_feed(entry, feed, names=host)
    for spec in entry.inputs:
        value = feed[spec.name]
        if isinstance(value, DeviceArray):
            check_tensor_shape(f"graph '{entry.name}' input '{spec.name}'", spec, value.dtype, value.shape, sizes)
    return sizes


def check_targets(entry: GraphEntry, outputs: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
    """Output targets: host arrays as check_outputs; DeviceArrays of exactly the shape and dtype written."""
    host = {n: v for n, v in outputs.items() if isinstance(v, np.ndarray)}
    odd = [n for n, v in outputs.items() if not isinstance(v, (np.ndarray, DeviceArray))]
    if odd:
        raise ContractError(f"graph '{entry.name}': output target(s) {odd} must be numpy arrays or DeviceArrays")
    check_outputs(entry, host, sizes)
    want = output_shapes(entry, sizes)
    dtypes = {t.name: np.dtype(t.dtype) for t in entry.outputs}
    for name, target in outputs.items():
        if not isinstance(target, DeviceArray):
            continue
        if name not in want:
            raise ContractError(f"graph '{entry.name}': no output named '{name}' (it has {list(want)})")
        if want[name] is None:
            raise ContractError(f"graph '{entry.name}': output '{name}' has a data-dependent shape; "
                                "it cannot be written into a preallocated device array")
        if target.shape != want[name] or target.dtype != dtypes[name]:
            raise ContractError(f"graph '{entry.name}': device output '{name}' is {target.dtype}{target.shape}, "
                                f"the graph writes {dtypes[name]}{want[name]}")


def grown_size(current: int, needed: int, align: int = 256) -> int:
    """A data-dependent output's new buffer size: at least `needed`, at least 1.5x the old one (fewer
    reallocations when sizes creep up), rounded up to `align`."""
    size = max(int(needed), int(current * 1.5), 1)
    return -(-size // align) * align


def _value_key(value: Any) -> tuple:
    """What checks of a feed value depend on (not its contents)."""
    if isinstance(value, DeviceArray):
        return ("device", value.ptr, value.shape, value.dtype.str)
    if isinstance(value, np.ndarray):
        return ("host", value.ctypes.data, value.shape, value.strides, value.dtype.str)
    return ("other", id(value))


# ---------------------------------------------------------------------------------------------------
# TensorRT glue


_ALLOCATOR_CLASSES: dict[int, tuple[Any, type]] = {}     # id(trt module) -> (module, class)


def _output_allocator_class(trt: Any) -> type:
    """trt.IOutputAllocator subclass (made per tensorrt module: the base class only exists there)."""
    known = _ALLOCATOR_CLASSES.get(id(trt))
    if known is not None and known[0] is trt:
        return known[1]

    class OutputAllocator(trt.IOutputAllocator):  # type: ignore[misc,name-defined]
        """Hands TensorRT a buffer for one data-dependent output: the preallocated one when it is big
        enough, else a bigger one; records the shape TensorRT reports. Exceptions cannot cross TensorRT
        (they would be printed and swallowed): they are kept in `error` and None (failure) returned."""

        def __init__(self, name: str, initial_bytes: int, what: str) -> None:
            trt.IOutputAllocator.__init__(self)   # required explicit base init (pybind11 trampoline)
            self.name, self.what = name, what
            self.buffer: DeviceBuffer | None = DeviceBuffer(initial_bytes, what) if initial_bytes else None
            self.shape: tuple[int, ...] | None = None
            self.error: Exception | None = None

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int | None:
            return self._ensure(int(size))

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int | None:
            return self._ensure(int(size))

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shape = tuple(int(d) for d in shape)

        def _ensure(self, size: int) -> int | None:
            try:
                if self.buffer is None or self.buffer.nbytes < size:
                    old = self.buffer
                    self.buffer = DeviceBuffer(grown_size(old.nbytes if old else 0, size), self.what)
                    if old is not None:     # nothing reads it: every run synchronises before returning
                        old.close()
                return self.buffer.ptr
            except Exception as err:  # noqa: BLE001 — must not propagate into TensorRT
                self.error = err
                return None

        def close(self) -> None:
            if self.buffer is not None:
                self.buffer.close()
                self.buffer = None

    _ALLOCATOR_CLASSES[id(trt)] = (trt, OutputAllocator)
    return OutputAllocator


class _Context:
    """One execution context (one optimization profile) with its buffers and what is bound to it."""

    def __init__(self, owner: "TrtExecutor", index: int) -> None:
        self.index, self.profile = index, owner.profiles[index]
        self.what = f"graph '{owner.name}' profile {self.profile.label}"
        ctx = owner._engine.create_execution_context()
        if ctx is None:
            raise BackendError(f"{self.what}: TensorRT could not create an execution context "
                               f"(out of GPU memory?): {'; '.join(list(owner._logger.errors)[-3:])}")
        self.trt = ctx
        try:
            ctx.set_optimization_profile_async(index, owner.stream.handle)
        except RuntimeError as err:                   # the binding raises on failure (engines/TENSORRT_API.md §4)
            raise BackendError(f"{self.what}: set_optimization_profile_async failed: {err}") from err
        owner.stream.sync()
        self.max_bytes = profile_max_bytes(owner.entry, self.profile)
        self.device: dict[str, DeviceBuffer] = {}
        self.pinned: dict[str, PinnedBuffer] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.allocators: dict[str, Any] = {}
        allocator_class = _output_allocator_class(owner._trt) if owner.dd_outputs else None
        for name in owner.dd_outputs:
            alloc = allocator_class(name, self.max_bytes[name], f"output '{name}' of {self.what}")
            if not ctx.set_output_allocator(name, alloc):
                raise BackendError(f"{self.what}: TensorRT refused the output allocator of '{name}'")
            self.allocators[name] = alloc
            # Also bind the preallocated buffer's address (TensorRT allows both; the allocator may move it).
            self.bind(name, alloc.buffer.ptr)

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

    def bind(self, name: str, address: int) -> bool:
        """set_tensor_address only when the address changed -> whether it did."""
        if self.addresses.get(name) == address:
            return False
        if not self.trt.set_tensor_address(name, int(address)):
            raise BackendError(f"{self.what}: TensorRT refused the address of tensor '{name}'")
        self.addresses[name] = address
        return True

    def close(self) -> None:
        for buf in (*self.device.values(), *self.pinned.values(), *self.allocators.values()):
            buf.close()
        self.device.clear()
        self.pinned.clear()
        self.allocators.clear()
        self.trt = None


@dataclass
class _Checked:
    """The last feed/outputs checked (re-checked only when an address, shape or dtype changes)."""

    key: tuple
    sizes: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    out_shapes: dict[str, tuple[int, ...] | None]
    profile: int


class TrtExecutor:
    """One graph's TensorRT plan of an export directory (Executor protocol, backend "trt")."""

    backend = "trt"

    def __init__(self, entry: GraphEntry, root: str | Path, precision: str = "fp16", stream: Stream | None = None,
                 cuda_graphs: bool = False, *, graph_capacity: int = GRAPH_CAPACITY, trt: Any = None) -> None:
        self.name, self.entry, self.precision, self.root = entry.name, entry, precision, Path(root)
        plan_path, sidecar = plan_paths(root, entry.name, precision)
        if not plan_path.is_file():
            raise CheckpointError(f"graph '{entry.name}': no {precision} TensorRT engine at {plan_path}; build the "
                                  "engines on this GPU machine with "
                                  + BUILD_COMMAND.format(root=self.root, precision=precision))
        record = read_record(sidecar)
        self._trt = trt if trt is not None else api.import_tensorrt()     # a clear error without TensorRT 10
        version = str(self._trt.__version__)
        here = gpu.gpu_info(0)
        if here is None:
            raise BackendError(f"graph '{entry.name}': no usable CUDA GPU to run its TensorRT engine "
                               f"({gpu.cuda_devices().detail})")
        expected = expected_key(entry, precision, record, version, here)
        check_record(record, expected, plan_path)
        self.record, self.profiles, self.plan_path = record, expected.profiles, plan_path

        self._logger = api.trt_logger(self._trt)
        self._runtime = self._trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise EngineMismatchError(f"{plan_path}: TensorRT {version} could not load the plan ("
                                      f"{'; '.join(list(self._logger.errors)[-3:]) or 'no error logged'}); rebuild it with "
                                      + BUILD_COMMAND.format(root=self.root, precision=precision))
        self._check_engine()
        self._inputs = tuple(t.name for t in entry.inputs)
        self._outputs = tuple(t.name for t in entry.outputs)
        self._dtypes = {t.name: np.dtype(t.dtype) for t in (*entry.inputs, *entry.outputs)}
        self.dd_outputs = data_dependent_outputs(entry)

        self._own_stream = stream is None
        self.stream = stream if stream is not None else Stream()
        self._start, self._end = Event(), Event()
        self.last_gpu_ms: float | None = None
        self.last_mode = ""                             # "plain" / "capture" / "replay" of the last run
        self._contexts: dict[int, _Context] = {}
        self._checked: _Checked | None = None
        self._lock = threading.Lock()
        self._graphs: GraphCache | None = None
        if cuda_graphs and self.dd_outputs:
            log.info("%s: no CUDA graphs (data-dependent output shapes: %s)", self.name, ", ".join(self.dd_outputs))
        elif cuda_graphs:
            self._graphs = GraphCache(graph_capacity, self._capture, self._launch, cuda.destroy_exec)
        log.info("%s: TensorRT %s plan %s (%d profile(s)%s)", self.name, version, plan_path.name, len(self.profiles),
                 ", CUDA graphs" if self._graphs else "")

    # -- public -------------------------------------------------------------------------------------

    @property
    def graph_stats(self) -> GraphStats | None:
        return self._graphs.stats if self._graphs is not None else None

    def run(self, feed: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> Feed:
        """Inputs by name (numpy or DeviceArray) -> every output by name (numpy, or the DeviceArray given in
        `outputs`)."""
        with self._lock:
            if self._engine is None:
                raise BackendError(f"graph '{self.name}': the TensorRT executor is closed")
            return self._run(feed, dict(outputs or {}))

    def close(self) -> None:
        """Free the graphs, buffers, contexts, engine and (if it made them) the stream and events."""
        with self._lock:
            if self._engine is None:
                return
            try:
                self.stream.sync()
            finally:
                if self._graphs is not None:
                    self._graphs.clear()
                for ctx in self._contexts.values():
                    ctx.close()
                self._contexts.clear()
                self._engine = None
                self._runtime = None
                self._start.close()
                self._end.close()
                if self._own_stream:
                    self.stream.close()

    def __enter__(self) -> "TrtExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _check_engine(self) -> None:
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in, want_out = [t.name for t in self.entry.inputs], [t.name for t in self.entry.outputs]
        if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
            raise ContractError(f"{self.plan_path}: the engine has inputs {inputs} and outputs {outputs}, the manifest "
                                f"says {want_in} -> {want_out}; rebuild the engines")
        for spec in (*self.entry.inputs, *self.entry.outputs):
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(spec.name)))
            if got != np.dtype(spec.dtype):
                raise ContractError(f"{self.plan_path}: tensor '{spec.name}' is {got} in the engine, the contract "
                                    f"says {spec.dtype}")
        if int(engine.num_optimization_profiles) != len(self.profiles):
            raise EngineMismatchError(f"{self.plan_path}: the engine has {engine.num_optimization_profiles} "
                                      f"optimization profile(s), its record {len(self.profiles)}; rebuild it")

    def _context(self, index: int) -> _Context:
        ctx = self._contexts.get(index)
        if ctx is None:
            ctx = self._contexts[index] = _Context(self, index)
        return ctx

    def _check(self, feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> _Checked:
        key = (tuple((n, _value_key(feed[n])) for n in sorted(feed)),
               tuple((n, _value_key(outputs[n])) for n in sorted(outputs)))
        if self._checked is not None and self._checked.key == key:
            return self._checked
        sizes = check_mixed_feed(self.entry, feed)
        check_targets(self.entry, outputs, sizes)
        shapes = {n: tuple(int(d) for d in feed[n].shape) for n in self._inputs}
        profile = select_profile(self.name, self.profiles, shapes)
        self._checked = _Checked(key, sizes, shapes, output_shapes(self.entry, sizes), profile)
        return self._checked

    def _run(self, feed: Mapping[str, Any], outputs: dict[str, Any]) -> Feed:
        checked = self._check(feed, outputs)
        ctx = self._context(checked.profile)
        stream = self.stream
        self._start.record(stream)
        changed = False
        for name in self._inputs:
            value, shape = feed[name], checked.shapes[name]
            address = value.ptr if isinstance(value, DeviceArray) else self._stage_input(ctx, name, value)
            if ctx.shapes.get(name) != shape:
                if not ctx.trt.set_input_shape(name, shape):
                    raise ContractError(f"{ctx.what}: TensorRT refused shape {shape} for input '{name}' "
                                        f"({'; '.join(list(self._logger.errors)[-2:])})")
                ctx.shapes[name] = shape
                changed = True
            changed |= ctx.bind(name, address)
        host_outputs = []
        for name in self._outputs:
            if name in ctx.allocators:
                continue
            target = outputs.get(name)
            if isinstance(target, DeviceArray):
                changed |= ctx.bind(name, target.ptr)
            else:
                changed |= ctx.bind(name, ctx.device_buffer(name).ptr)
                host_outputs.append(name)
        if changed:
            self._verify_output_shapes(ctx, checked.out_shapes)
            if self._graphs is not None:
                self._graphs.invalidate((self.name, ctx.index))

        if self._graphs is not None:
            key = (self.name, ctx.index, tuple((n, ctx.shapes.get(n, checked.out_shapes.get(n)), ctx.addresses.get(n))
                                               for n in (*self._inputs, *self._outputs)))
            self.last_mode = self._graphs.run(key, lambda: self._execute(ctx))
        else:
            self._execute(ctx)
            self.last_mode = "plain"

        for name in host_outputs:
            nbytes = math.prod(checked.out_shapes[name]) * self._dtypes[name].itemsize
            cuda.memcpy_dtoh_async(ctx.pinned_buffer(name).ptr, ctx.addresses[name], nbytes, stream)
        self._end.record(stream)
        stream.sync()
        self.last_gpu_ms = self._end.elapsed_ms(self._start)

        shapes: dict[str, tuple[int, ...]] = {n: s for n, s in checked.out_shapes.items() if s is not None}
        for name, alloc in ctx.allocators.items():       # data-dependent: shape known after the sync
            if alloc.error is not None or alloc.shape is None or alloc.buffer is None:
                raise BackendError(f"{ctx.what}: output '{name}' was not produced "
                                   f"({alloc.error or 'TensorRT reported no shape'})")
            shapes[name] = alloc.shape
            nbytes = math.prod(alloc.shape) * self._dtypes[name].itemsize
            cuda.memcpy_dtoh_async(ctx.pinned_buffer(name, nbytes).ptr, alloc.buffer.ptr, nbytes, stream)
        if ctx.allocators:
            stream.sync()

        result: Feed = {}
        for name in self._outputs:
            target = outputs.get(name)
            if isinstance(target, DeviceArray):
                result[name] = target                       # type: ignore[assignment]
                continue
            view = ctx.pinned[name].view(self._dtypes[name], shapes[name])
            if target is not None:
                np.copyto(target, view)
                result[name] = target
            else:
                result[name] = view.copy()
        return result

    def _stage_input(self, ctx: _Context, name: str, value: np.ndarray) -> int:
        """numpy -> pinned staging -> device buffer (async); -> the device address."""
        device = ctx.device_buffer(name)
        nbytes = int(value.nbytes)
        if nbytes > device.nbytes:                  # cannot happen for a feed the profile admits
            raise ContractError(f"{ctx.what}: input '{name}' of {nbytes} bytes exceeds its {device.nbytes}-byte buffer")
        if nbytes:
            pinned = ctx.pinned_buffer(name)
            np.copyto(pinned.bytes()[:nbytes], value.reshape(-1).view(np.uint8))
            cuda.memcpy_htod_async(device.ptr, pinned.ptr, nbytes, self.stream)
        return device.ptr

    def _verify_output_shapes(self, ctx: _Context, want: Mapping[str, tuple[int, ...] | None]) -> None:
        """After a shape change: TensorRT's output shapes must be the manifest's (they size our copies)."""
        for name in self._outputs:
            if name in ctx.allocators or want.get(name) is None:
                continue
            got = tuple(int(d) for d in ctx.trt.get_tensor_shape(name))
            if got != want[name]:
                raise ContractError(f"{ctx.what}: TensorRT computes output '{name}' as {got}, the manifest "
                                    f"says {want[name]}; rebuild the engines from this export")

    def _execute(self, ctx: _Context) -> None:
        if not ctx.trt.execute_async_v3(self.stream.handle):
            problems = [str(a.error) for a in ctx.allocators.values() if a.error is not None]
            raise BackendError(f"{ctx.what}: TensorRT execute_async_v3 failed: "
                               + ("; ".join(problems + list(self._logger.errors)[-3:]) or "no error logged"))

    def _capture(self, key: tuple) -> Any:
        """Capture one enqueue of the context in `key` into an instantiated CUDA graph (engines/TENSORRT_API.md §6)."""
        ctx = self._contexts[key[1]]
        stream = self.stream
        stream.sync()
        cuda.begin_capture(stream, "thread_local")
        try:
            ok = bool(ctx.trt.execute_async_v3(stream.handle))
        except Exception:  # noqa: BLE001 — the capture must be ended whatever happened
            ok = False
        graph = cuda.end_capture(stream)                # raises (after cleanup) if the capture was invalidated
        if not ok:
            cuda.destroy_graph(graph)
            cuda.clear_last_error()
            raise BackendError(f"{ctx.what}: execute_async_v3 returned False under stream capture "
                               "(this engine cannot be captured)")
        try:
            return cuda.instantiate(graph)
        finally:
            cuda.destroy_graph(graph)

    def _launch(self, graph_exec: Any) -> None:
        cuda.launch(graph_exec, self.stream)
