"""The TensorRT executor: one deserialized plan per graph, run with execute_async_v3 on a CUDA stream over
buffers allocated once (DESIGN.md §4), optionally replayed as CUDA graphs.

Refusals before anything is loaded (DESIGN.md §4-5, the "engine built for another GPU" bad input):
- no plan at OUT/engines/<graph>.<precision>.plan -> CheckpointError with the build command;
- a plan whose sidecar key (runtime/trt/engine_plan.py) is not what THIS machine would build (another GPU,
  TensorRT version, ONNX file, precision, profiles, or graph form: a plan recorded before the builder was
  strongly typed has none and is refused) -> EngineMismatchError saying what differs and to rebuild.
  The key's precision policy is taken from the record (the runtime does not know which policy file the
  build used; a plan built from the same ONNX with any policy is a valid plan of the graph).

Refusals at load (the engine itself): I/O names and dtypes other than the manifest's, another number of
optimization profiles, and any input whose engine location is HOST (`get_tensor_location`): TensorRT
reads such an input (a shape tensor) on the CPU, from a host pointer whose values must lie in the
profile's `set_shape_input` ranges; this executor binds device pointers, and our contracts give no input
value ranges, so such a plan is refused with a message saying so rather than handed a device pointer.
Each input's location and `is_shape_inference_io` are logged (e.g. length_regulator's `ylens`, whose
values set the output's length: expected DEVICE, its effect reaching the output allocator).

Execution. One execution context per optimization profile (runtime/trt/context.py), created when a feed
first needs that profile, with ON_PROFILE_CHANGE or user-managed activation memory
(runtime/trt/context_memory.py). The profile is the first whose ranges admit the feed's shapes
(`select_profile`), else a ContractError naming the input and the ranges. Feeds are checked by
BaseExecutor (runtime/executors/base.py) only when their binding key changes; `_run` is three steps:
- bind: host inputs numpy -> pinned -> device (async), set_input_shape / activation memory /
  set_tensor_address only for what changed since the last run;
- enqueue: execute_async_v3, or a CUDA graph launch (below);
- read back: host outputs device -> pinned, one stream synchronisation, then into the caller's `outputs`
  arrays (or fresh ones). Two events time the GPU side: `last_gpu_ms`.

Extension of the Executor interface (runtime/executors/base.py), for device-resident data:
- a feed value may be a `runtime.trt.cuda.DeviceArray` (memory already on the GPU, e.g. the decode step's KV
  cache views): its pointer is bound directly, nothing is copied;
- `outputs` may map an output to a DeviceArray: the engine writes it there on the device (e.g. `kv_new`
  and the prefill's `kv`), and the result holds that same DeviceArray instead of a numpy array.
DeviceArrays must stay valid until `run` returns; the executor synchronises its stream before returning.

Data-dependent output shapes (length_regulator's `cond` (B, max(ylens), C)): an IOutputAllocator
(runtime/trt/output_allocator.py: `reallocate_output_async` hands out a buffer preallocated at the range
maximum, growing it if TensorRT asks for more; `notify_shape` records the shape), read after the sync.

CUDA graphs (`cuda_graphs=True`, for graphs whose shapes are all static per call: gpt_decode per bucket,
dit_step per length): runtime/trt/cuda_graphs.py decides plain / capture / replay per (graph, profile,
every tensor's shape and address); the capture follows engines/TENSORRT_API.md §6 (warm-up run first, thread-local
capture, the bool of execute_async_v3 AND cudaStreamEndCapture's error checked, fallback to plain runs).
A context's graphs are dropped whenever its shapes or addresses change. Engines with data-dependent
outputs are never captured.

Not thread-safe by design beyond one lock: runs of one executor are serialised (one stream, one context
per profile). TensorRT API (engines/TENSORRT_API.md §4): trt.Runtime(logger).deserialize_cuda_engine(bytes),
engine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype / num_optimization_profiles,
engine.get_tensor_location / is_shape_inference_io, engine.get_device_memory_size_for_profile_v2,
engine.create_execution_context(strategy), ctx.set_optimization_profile_async(i, stream), ctx.set_input_shape,
ctx.update_device_memory_size_for_shapes, ctx.set_device_memory(ptr, size), ctx.set_tensor_address,
ctx.get_tensor_shape, ctx.set_output_allocator, ctx.execute_async_v3(stream).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.errors import (
    BackendError,
    CheckpointError,
    ContractError,
    EngineMismatchError,
)
from runtime.executors.base import BaseExecutor, Feed, output_shapes
from runtime.manifest import GraphEntry
from runtime.trt import api, cuda, gpu
from runtime.trt.context import TrtContext
from runtime.trt.context_memory import USER_MEMORY_MIN_BYTES, choose_strategy
from runtime.trt.cuda import DeviceArray, Event, Stream
from runtime.trt.cuda_graphs import GraphCache, GraphStats
from runtime.trt.engine_plan import (
    EngineKey,
    GpuInfo,
    PlanRecord,
    check_record,
    engine_profiles,
    plan_paths,
    read_record,
)
from runtime.trt.feeds import (  # noqa: F401 — re-exported: the executor's pure rules
    carried_axes,
    check_mixed_feed,
    check_targets,
    data_dependent_outputs,
    profile_max_bytes,
    profile_sizes,
    select_profile,
    tensor_nbytes,
)
from runtime.trt.output_allocator import grown_size  # noqa: F401 — re-exported

log = logging.getLogger(__name__)

GRAPH_CAPACITY = 8          # instantiated CUDA graphs kept per executor (LRU)
BUILD_COMMAND = "python -m export.build --checkpoints <checkpoint dir> --out {root} --precision {precision}"


def expected_key(entry: GraphEntry, precision: str, record: PlanRecord, trt_version: str, here: GpuInfo) -> EngineKey:
    """The key a plan of `entry` built on this machine would have (policy: the record's own)."""
    return EngineKey(entry.name, entry.sha256, precision, engine_profiles(entry), str(trt_version), here,
                     record.key.policy_sha256, entry.graph_form)       # "" = the precision's usual form


@dataclass
class _Checked:
    """The last feed/outputs checked (re-checked only when an address, shape or dtype changes)."""

    sizes: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    out_shapes: dict[str, tuple[int, ...] | None]
    profile: int


class TrtExecutor(BaseExecutor):
    """One graph's TensorRT plan of an export directory (Executor protocol, backend "trt").

    `user_memory_min_bytes`: a single-profile engine whose activations may exceed this gets user-managed
    memory sized for each run's shapes (runtime/trt/context_memory.py)."""

    backend = "trt"

    def __init__(self, entry: GraphEntry, root: str | Path, precision: str = "fp16", stream: Stream | None = None,
                 cuda_graphs: bool = False, *, graph_capacity: int = GRAPH_CAPACITY, trt: Any = None,
                 user_memory_min_bytes: int = USER_MEMORY_MIN_BYTES) -> None:
        super().__init__()
        entry = entry.form(precision)                # the plan was built from the graph's form of this precision
        self.name, self.entry, self.precision, self.root = entry.name, entry, precision, Path(root)
        self._trt_module = trt                       # None: import tensorrt (a clear error without TensorRT)
        plan_path = self._load(precision)
        self._check_engine()
        self._check_locations()
        self._inputs = tuple(t.name for t in entry.inputs)
        self._outputs = tuple(t.name for t in entry.outputs)
        self._dtypes = {t.name: np.dtype(t.dtype) for t in (*entry.inputs, *entry.outputs)}
        self.dd_outputs = data_dependent_outputs(entry)
        # get_device_memory_size_for_profile_v2 and set_device_memory(ptr, size) exist since TensorRT 10.1:
        # without them, no user-managed memory.
        sized = len(self.profiles) == 1 and hasattr(self._engine, "get_device_memory_size_for_profile_v2")
        upper = int(self._engine.get_device_memory_size_for_profile_v2(0)) if sized else 0
        self.memory_strategy = choose_strategy(len(self.profiles), upper, user_memory_min_bytes if sized else upper + 1)

        self._own_stream = stream is None
        self.stream = stream if stream is not None else Stream()
        self._start, self._end = Event(), Event()
        self.last_gpu_ms: float | None = None
        self.last_mode = ""                             # "plain" / "capture" / "replay" of the last run
        self._contexts: dict[int, TrtContext] = {}
        self._graphs: GraphCache | None = None
        if cuda_graphs and self.dd_outputs:
            log.info("%s: no CUDA graphs (data-dependent output shapes: %s)", self.name, ", ".join(self.dd_outputs))
        elif cuda_graphs:
            self._graphs = GraphCache(graph_capacity, self._capture, self._launch, cuda.destroy_exec)
        log.info("%s: TensorRT %s plan %s (%d profile(s), %s activation memory%s)", self.name, self._trt.__version__,
                 plan_path.name, len(self.profiles), self.memory_strategy, ", CUDA graphs" if self._graphs else "")

    # -- public -------------------------------------------------------------------------------------

    @property
    def graph_stats(self) -> GraphStats | None:
        return self._graphs.stats if self._graphs is not None else None

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

    # -- loading ------------------------------------------------------------------------------------

    def _load(self, precision: str) -> Path:
        """Refuse a missing or mismatched plan, then deserialize it -> the plan's path."""
        entry = self.entry
        plan_path, sidecar = plan_paths(self.root, entry.name, precision)
        if not plan_path.is_file():
            raise CheckpointError(f"graph '{entry.name}': no {precision} TensorRT engine at {plan_path}; build the "
                                  "engines on this GPU machine with "
                                  + BUILD_COMMAND.format(root=self.root, precision=precision))
        record = read_record(sidecar)
        self._trt = self._trt_module if self._trt_module is not None else api.import_tensorrt()
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
        return plan_path

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

    def _check_locations(self) -> None:
        """Every input must be one TensorRT reads on the device (we bind device pointers); log each input's
        location and whether shape inference reads it."""
        trt, engine = self._trt, self._engine
        host = []
        for spec in self.entry.inputs:
            location = engine.get_tensor_location(spec.name)
            shape_io = bool(engine.is_shape_inference_io(spec.name))
            log.info("%s: input '%s' location %s, shape-inference input %s", self.name, spec.name,
                     api.enum_name(location), shape_io)
            if location == trt.TensorLocation.HOST:
                host.append(spec.name)
        if host:
            raise EngineMismatchError(
                f"{self.plan_path}: TensorRT wants input(s) {host} on the host (shape tensors: their values are read "
                "by the CPU and must lie in the profile's IOptimizationProfile.set_shape_input ranges). This "
                "executor binds device pointers and the contracts declare no value ranges, so it cannot run this "
                "plan; keep those inputs data tensors in the exported graph (e.g. do not let their values reach a "
                "shape operand without a device-side computation), re-export and rebuild")

    # -- one run: check (BaseExecutor, on change) -> bind -> enqueue -> read back ------------------------

    def _ensure_open(self) -> None:
        if self._engine is None:
            raise BackendError(f"graph '{self.name}': the TensorRT executor is closed")

    def _check(self, feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> _Checked:
        sizes = check_mixed_feed(self.entry, feed)
        check_targets(self.entry, outputs, sizes)
        shapes = {n: tuple(int(d) for d in feed[n].shape) for n in self._inputs}
        profile = select_profile(self.name, self.profiles, shapes)
        return _Checked(sizes, shapes, output_shapes(self.entry, sizes), profile)

    def _run(self, feed: Mapping[str, Any], outputs: dict[str, Any], checked: _Checked) -> Feed:
        ctx = self._context(checked.profile)
        self._start.record(self.stream)
        host_outputs = self._bind(ctx, feed, outputs, checked)
        self._enqueue(ctx, checked)
        return self._read_back(ctx, outputs, checked, host_outputs)

    def _context(self, index: int) -> TrtContext:
        ctx = self._contexts.get(index)
        if ctx is None:
            ctx = self._contexts[index] = TrtContext(self, index)
        return ctx

    def _bind(self, ctx: TrtContext, feed: Mapping[str, Any], outputs: Mapping[str, Any],
              checked: _Checked) -> list[str]:
        """Stage host inputs; set shapes, activation memory and addresses that changed -> host outputs.
        A change re-verifies the output shapes and drops the context's CUDA graphs."""
        addresses = {}
        for name in self._inputs:
            value = feed[name]
            addresses[name] = value.ptr if isinstance(value, DeviceArray) else self._stage_input(ctx, name, value)
        shapes_changed = False
        for name in self._inputs:
            shapes_changed |= ctx.set_shape(name, checked.shapes[name])
        changed = shapes_changed
        if shapes_changed or (ctx.memory is not None and ctx.memory.buffer is None):
            changed |= ctx.fit_memory()
        for name in self._inputs:
            changed |= ctx.bind(name, addresses[name])
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
        return host_outputs

    def _enqueue(self, ctx: TrtContext, checked: _Checked) -> None:
        """execute_async_v3, or (CUDA graphs) the capture / replay of it for this exact binding."""
        ctx.begin_run()
        if self._graphs is None:
            self._execute(ctx)
            self.last_mode = "plain"
            return
        memory = ctx.memory.buffer.ptr if ctx.memory is not None and ctx.memory.buffer is not None else None
        key = (self.name, ctx.index, memory,
               tuple((n, ctx.shapes.get(n, checked.out_shapes.get(n)), ctx.addresses.get(n))
                     for n in (*self._inputs, *self._outputs)))
        self.last_mode = self._graphs.run(key, lambda: self._execute(ctx))

    def _read_back(self, ctx: TrtContext, outputs: Mapping[str, Any], checked: _Checked,
                   host_outputs: list[str]) -> Feed:
        """Device -> pinned copies, one sync, then into the caller's arrays (or fresh ones)."""
        stream = self.stream
        shapes: dict[str, tuple[int, ...]] = {n: s for n, s in checked.out_shapes.items() if s is not None}
        for name, alloc in ctx.allocators.items():       # data-dependent: reported before execute returned
            if alloc.error is not None or alloc.shape is None or alloc.buffer is None:
                stream.sync()
                raise BackendError(f"{ctx.what}: output '{name}' was not produced "
                                   f"({alloc.error or 'TensorRT reported no shape'})")
            shapes[name] = alloc.shape
        for name in (*host_outputs, *ctx.allocators):
            nbytes = math.prod(shapes[name]) * self._dtypes[name].itemsize
            source = ctx.allocators[name].buffer.ptr if name in ctx.allocators else ctx.addresses[name]
            cuda.memcpy_dtoh_async(ctx.pinned_buffer(name, nbytes).ptr, source, nbytes, stream)
        self._end.record(stream)
        stream.sync()
        self.last_gpu_ms = self._end.elapsed_ms(self._start)
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

    def _stage_input(self, ctx: TrtContext, name: str, value: np.ndarray) -> int:
        """numpy -> pinned staging -> device buffer (async); -> the device address. The pinned buffer is
        rewritten only by the next run, which starts after this one's stream synchronisation."""
        device = ctx.device_buffer(name)
        nbytes = int(value.nbytes)
        if nbytes > device.nbytes:                  # cannot happen for a feed the profile admits
            raise ContractError(f"{ctx.what}: input '{name}' of {nbytes} bytes exceeds its {device.nbytes}-byte buffer")
        if nbytes:
            pinned = ctx.pinned_buffer(name)
            np.copyto(pinned.bytes()[:nbytes], value.reshape(-1).view(np.uint8))
            cuda.memcpy_htod_async(device.ptr, pinned.ptr, nbytes, self.stream)
        return device.ptr

    def _verify_output_shapes(self, ctx: TrtContext, want: Mapping[str, tuple[int, ...] | None]) -> None:
        """After a shape change: TensorRT's output shapes must be the manifest's (they size our copies)."""
        for name in self._outputs:
            if name in ctx.allocators or want.get(name) is None:
                continue
            got = tuple(int(d) for d in ctx.trt.get_tensor_shape(name))
            if got != want[name]:
                raise ContractError(f"{ctx.what}: TensorRT computes output '{name}' as {got}, the manifest "
                                    f"says {want[name]}; rebuild the engines from this export")

    def _execute(self, ctx: TrtContext) -> None:
        if not ctx.trt.execute_async_v3(self.stream.handle):
            problems = [str(a.error) for a in ctx.allocators.values() if a.error is not None]
            if ctx.memory is not None and ctx.memory.buffer is not None:
                problems.append(f"activation memory {ctx.memory.buffer.nbytes} bytes, TensorRT asked for "
                                f"{ctx.memory.needed}")
            self.stream.sync()                  # nothing of this run may still be queued when the caller retries
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
        return cuda.instantiate(graph)

    def _launch(self, graph_exec: Any) -> None:
        cuda.launch(graph_exec, self.stream)
