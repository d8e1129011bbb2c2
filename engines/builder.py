"""One graph's ONNX file -> a serialized TensorRT plan, reused while its EngineKey holds (DESIGN.md §5).

Two layers, so that everything but the TensorRT calls is testable on a machine without a GPU:
- pure decisions: which builder flags a plan needs (`builder_flags`), the optimization-profile `set_shape`
  calls of a graph (`profile_calls`, from runtime.trt.engine_plan.engine_profiles: gpt_decode gets one
  profile per KV-cache bucket with cache_len fixed), the plan's key (`engine_key`) and whether an existing
  plan can be reused (`cache_decision`); how to make a strongly typed network and whether the parsed graph
  is in the plan's precision form (engines/strong_typing.py);
- thin TensorRT calls (`build_plan`), each as documented for TensorRT 11 and 10.12+ (engines/TENSORRT_API.md
  §1). The `tensorrt` module is passed in (or imported lazily), never imported at module level.

Strongly typed only: the precision is in the ONNX graph (fp32; fp16 with explicit Casts around fp32 islands;
INT8 as QuantizeLinear/DequantizeLinear), and the builder sets none. TensorRT 11 removed every weak-typing
API (BuilderFlag.FP16/INT8, OBEY/PREFER_PRECISION_CONSTRAINTS, ILayer.precision / set_output_type, the INT8
calibrators; "Removed Python APIs and Replacements", https://docs.nvidia.com/deeplearning/tensorrt/latest/api/
migration/tensorrt-10x-to-11x-python-api-reference.html), and 10.12 deprecated them; strong typing is the one
build that works on both.

Build steps and why:
1. Logger: a `trt.ILogger` subclass routing TensorRT's messages to `logging` ("tensorrt"; TensorRT
   INFO goes to DEBUG because it is chatty) and keeping the last errors for the failure message. One
   instance per process: TensorRT keeps the first logger given to a builder as its global logger.
2. `trt.Builder(logger)`, `builder.create_network(flags)`: 10.12+ `1 << int(STRONGLY_TYPED)`, 11.x `0`
   (always strongly typed; the flag is deprecated and ignored) — strong_typing.network_creation;
   `trt.OnnxParser(network, logger)`, `parser.parse_from_file(path)` (resolves `<graph>.onnx.data` next to
   the file); on failure every parser error with its node name, operator and description. The parser stays
   alive until the build finished (it owns the weights). Then the parsed types must be the plan's graph form
   (an fp16 plan from an fp32 graph would silently compute in fp32).
3. Config: workspace pool limit; TF32 cleared for every plan: BuilderFlag.TF32 still exists in 11 and is
   "Enabled by default" (its docstring in python/docstrings/infer/pyCoreDoc.h of NVIDIA/TensorRT v11.1; the
   BuilderFlag page under the URLs below), and TF32 matmuls (10-bit mantissas) in the fp32 tensors — a whole fp32 plan or the fp32
   islands of a mixed one — would miss the contracts' fp32 tolerances of ~1e-4. No precision flag is set.
4. One optimization profile per `Profile` (`set_shape(name, min, opt, max)` per input;
   `add_optimization_profile` must return >= 0).
5. The shared timing cache `OUT/engines/timing.cache` (created empty if absent or unusable, saved
   atomically after each successful build) and a progress monitor logging the build phases.
6. `build_serialized_network` (None = failure) -> the plan, written atomically, then its sidecar
   record (runtime.trt.engine_plan.PlanRecord: key with the graph form, plan sha256, the layers computing in
   fp32 as the graph declares them, build time, notes saying the network was strongly typed and which
   flags were cleared).

URLs (TensorRT 11 Python API, https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/):
Builder infer/Core/Builder.html , BuilderConfig infer/Core/BuilderConfig.html , OnnxParser
parsers/Onnx/pyOnnx.html , OptimizationProfile infer/Core/OptimizationProfile.html , ProgressMonitor
infer/Core/ProgressMonitor.html ; where 10.12+ differs, engines/TENSORRT_API.md says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from runtime.errors import (
    BackendError,
    CheckpointError,
    ContractError,
    EngineMismatchError,
    InputError,
)
from runtime.manifest import GraphEntry, sha256_file
from runtime.trt.api import enum_name, import_tensorrt, trt_logger
from runtime.trt.engine_plan import (
    ENGINES_DIR,
    GRAPH_FORMS,
    PRECISIONS,
    TIMING_CACHE,
    EngineKey,
    GpuInfo,
    PlanRecord,
    engine_profiles,
    plan_paths,
    read_record,
    write_record,
)

from .precision import PrecisionPolicy
from .strong_typing import NetworkCreation, check_graph_form, check_strongly_typed, network_creation, network_types

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_WORKSPACE_GIB = 4.0

Shape = tuple[int, ...]
SetShape = tuple[str, Shape, Shape, Shape]          # profile.set_shape(input, min, opt, max)


@dataclass(frozen=True)
class BuildSettings:
    """What every plan of one `build_all` shares. `graph_form`: the precision form of the ONNX graphs the plans
    are built from ("" = the precision's: fp32, fp16-mixed, int8-qdq); `policy`: the precision policy those
    graphs were made with (it enters the key, so a policy change rebuilds the mixed-precision plans)."""

    precision: str
    policy: PrecisionPolicy
    workspace_bytes: int = int(DEFAULT_WORKSPACE_GIB * GIB)
    device: int = 0
    graph_form: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.workspace_bytes <= 0:
            raise InputError(f"workspace {self.workspace_bytes} bytes: must be positive")
        if not self.graph_form:
            object.__setattr__(self, "graph_form", GRAPH_FORMS[self.precision])
        if self.graph_form not in GRAPH_FORMS.values():
            raise InputError(f"graph form {self.graph_form!r}: expected one of {', '.join(GRAPH_FORMS.values())}")


# ---------------------------------------------------------------------------------------------------
# Pure decisions


@dataclass(frozen=True)
class FlagPlan:
    """BuilderFlag names to set and to clear on the config."""

    set: tuple[str, ...] = ()
    clear: tuple[str, ...] = ()


def builder_flags(precision: str) -> FlagPlan:
    """The flags a strongly typed plan needs: none set, TF32 cleared, at every precision.

    No precision flag: the graph carries the types (FP16/INT8/OBEY... are removed in TensorRT 11 and not
    allowed on a strongly typed 10.x network). TF32 is on by default and would run the fp32 tensors (an fp32
    plan, or the fp32 islands of a mixed one) with 10-bit mantissas."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return FlagPlan((), ("TF32",))


def profile_calls(entry: GraphEntry) -> list[tuple[str, list[SetShape]]]:
    """(profile label, the set_shape calls of that profile) for every optimization profile of `entry`."""
    return [(p.label, [(i.name, i.min, i.opt, i.max) for i in p.inputs]) for p in engine_profiles(entry)]


def policy_digest(precision: str, policy: PrecisionPolicy) -> str:
    """The policy's part of the key: "" for fp32 (no islands: a policy change must not rebuild fp32 plans)."""
    return "" if precision == "fp32" else policy.sha256()


def engine_key(entry: GraphEntry, precision: str, policy: PrecisionPolicy, trt_version: str,
               gpu: GpuInfo, graph_form: str = "") -> EngineKey:
    return EngineKey(entry.name, entry.sha256, precision, engine_profiles(entry), str(trt_version), gpu,
                     policy_digest(precision, policy), graph_form)


@dataclass(frozen=True)
class CacheDecision:
    reuse: bool
    reasons: tuple[str, ...] = ()       # why not (empty when reused)


def cache_decision(expected: EngineKey, plan: Path, sidecar: Path) -> CacheDecision:
    """Reuse the plan only if it and its record exist, the record's key equals `expected` and the plan's
    sha256 equals the recorded one (a half-written or altered plan is rebuilt)."""
    if not plan.is_file():
        return CacheDecision(False, ("no plan built yet",))
    if not sidecar.is_file():
        return CacheDecision(False, (f"the plan has no record {sidecar.name}",))
    try:
        record = read_record(sidecar)
    except EngineMismatchError as err:
        return CacheDecision(False, (str(err),))
    reasons = expected.differences(record.key)
    if reasons:
        return CacheDecision(False, tuple(reasons))
    if sha256_file(plan) != record.plan_sha256:
        return CacheDecision(False, ("the plan file does not match its recorded sha256 (altered or partly written)",))
    return CacheDecision(True)


# ---------------------------------------------------------------------------------------------------
# TensorRT glue


def _enable_activation_resize(trt: Any, config: Any, tag: str) -> bool:
    """Ask for plans whose activation memory follows the bound shapes (preview feature
    RUNTIME_ACTIVATION_RESIZE_10_10: added in 10.10, still an opt-in preview feature under that name in 11.x,
    python/src/infer/pyCore.cpp of v11.1). Without it `update_device_memory_size_for_shapes` may report the
    profile maximum, and the executor's user-managed memory (runtime/trt/context_memory.py) could not shrink
    below it. A TensorRT without it: logged and skipped. -> whether it was set."""
    feature = getattr(getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if feature is None or not hasattr(config, "set_preview_feature"):
        log.debug("%s: this TensorRT has no RUNTIME_ACTIVATION_RESIZE_10_10; activation memory is sized per profile",
                  tag)
        return False
    config.set_preview_feature(feature, True)
    return True


def progress_monitor(trt: Any, tag: str) -> Any | None:
    """A trt.IProgressMonitor logging build phases (top-level at INFO, nested at DEBUG), or None when
    this TensorRT has no progress monitor. Never cancels the build."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class LoggingProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, tuple[float, int]] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                level = logging.INFO if parent_phase is None else logging.DEBUG
                self.phases[phase_name] = (time.perf_counter(), level)
                log.log(level, "%s: %s (%d steps)", tag, phase_name, num_steps)
            except Exception:  # noqa: BLE001 — a callback must never break the build
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            try:
                t0, level = self.phases.pop(phase_name, (time.perf_counter(), logging.DEBUG))
                log.log(level, "%s: %s done (%.1f s)", tag, phase_name, time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                pass

    return LoggingProgress()


def _call(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    return fn() if callable(fn) else None


def parser_errors(parser: Any) -> list[str]:
    """One line per ONNX parser error: the failing node (name, operator, index), the code, the description.
    node_name/node_operator exist since TensorRT 10 (guarded)."""
    lines = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        name, op, index = _call(err, "node_name"), _call(err, "node_operator"), _call(err, "node")
        code = enum_name(err.code()) if callable(getattr(err, "code", None)) else "?"
        where = f"node '{name}'" if name else (f"node #{index}" if isinstance(index, int) and index >= 0 else "graph")
        if op:
            where += f" ({op})"
        lines.append(f"{where}: {code}: {err.desc()}")
    return lines


def check_network_inputs(network: Any, entry: GraphEntry) -> None:
    """The parsed network's inputs must be the manifest's (else the profiles cannot match)."""
    got = [network.get_input(i).name for i in range(int(network.num_inputs))]
    want = [t.name for t in entry.inputs]
    if sorted(got) != sorted(want):
        raise ContractError(f"graph '{entry.name}': the ONNX file's inputs {got} are not the manifest's {want}; "
                            "re-export with python -m export.build --force")
    # A shape-tensor input needs IOptimizationProfile.set_shape_input value ranges and a host binding at run
    # time (its engine location is HOST); the contracts declare no value ranges and the executor binds device
    # pointers, so such a graph is refused here, before a build that would fail without the ranges.
    shape_inputs = [network.get_input(i).name for i in range(int(network.num_inputs))
                    if getattr(network.get_input(i), "is_shape_tensor", False)]
    if shape_inputs:
        raise ContractError(f"graph '{entry.name}': TensorRT treats input(s) {shape_inputs} as shape tensors (their "
                            "values set shapes, read on the host; a profile would need set_shape_input value ranges, "
                            "which the contracts do not declare); keep them data tensors in the exported graph and "
                            "re-export with python -m export.build --force")


@dataclass
class BuiltPlan:
    plan: Any                              # trt.IHostMemory (buffer protocol)
    fp32_layers: tuple[str, ...]           # layers with a float32 output in a mixed graph (() for fp32 graphs)
    timing_cache: bytes | None
    flags: FlagPlan
    network: NetworkCreation
    tensor_types: dict[str, int] = field(default_factory=dict)


def build_plan(entry: GraphEntry, onnx_path: Path, settings: BuildSettings, trt: Any,
               timing_cache: bytes | None = None, tag: str = "") -> BuiltPlan:
    """Parse `onnx_path` and build its serialized plan at `settings` (the thin TensorRT part)."""
    tag = tag or entry.name
    creation = network_creation(trt)                    # refuses a TensorRT outside 10.12 .. 11.x
    logger = trt_logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(creation.flags)
    check_strongly_typed(network, trt, creation, tag)
    parser = trt.OnnxParser(network, logger)            # kept alive until the build is done
    if not parser.parse_from_file(str(onnx_path)):
        lines = parser_errors(parser) or list(logger.errors) or ["no error reported"]
        raise BackendError(f"{onnx_path}: TensorRT {getattr(trt, '__version__', '?')} could not parse the graph:\n  - "
                           + "\n  - ".join(lines))
    check_network_inputs(network, entry)
    types = network_types(network)
    check_graph_form(entry.name, onnx_path, settings.graph_form, types)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    flags = builder_flags(settings.precision)
    for name in flags.set:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in flags.clear:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    _enable_activation_resize(trt, config, tag)

    trt_profiles = [_add_profile(builder, config, entry, label, calls) for label, calls in profile_calls(entry)]
    cache = _timing_cache(config, timing_cache, tag)
    monitor = progress_monitor(trt, tag)
    if monitor is not None:
        config.progress_monitor = monitor

    fp32_layers = types.fp32_layers if settings.graph_form != "fp32" else ()
    log.info("%s: building %s plan, strongly typed from the %s graph (%d profile(s), %d fp32 layer(s), flags "
             "cleared %s)", tag, settings.precision, settings.graph_form, len(trt_profiles), len(fp32_layers),
             ",".join(flags.clear) or "-")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = list(logger.errors) or ["TensorRT logged no error; rerun with -v for its full log"]
        raise BackendError(f"{onnx_path}: TensorRT could not build the {settings.precision} engine of graph "
                           f"'{entry.name}':\n  - " + "\n  - ".join(errors))
    serialized = config.get_timing_cache() if cache is not None else None
    cache_bytes = bytes(serialized.serialize()) if serialized is not None else None
    return BuiltPlan(plan, fp32_layers, cache_bytes, flags, creation, dict(types.dtypes))


def _add_profile(builder: Any, config: Any, entry: GraphEntry, label: str, calls: Sequence[SetShape]) -> Any:
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in calls:
        try:
            profile.set_shape(name, lo, opt, hi)
        except (RuntimeError, ValueError, TypeError) as err:    # the binding raises RuntimeError; docs say ValueError
            raise ContractError(f"graph '{entry.name}' profile {label}: input {name} min {lo} opt {opt} max {hi} "
                                f"rejected by TensorRT ({err})") from err
    index = config.add_optimization_profile(profile)
    if index is None or int(index) < 0:
        raise ContractError(f"graph '{entry.name}' profile {label}: TensorRT rejected the optimization profile "
                            f"({', '.join(f'{n} {lo}..{hi}' for n, lo, _, hi in calls)})")
    return profile


def _timing_cache(config: Any, data: bytes | None, tag: str) -> Any:
    """Attach the shared timing cache: the saved one when it loads and matches this device and TensorRT
    (`set_timing_cache(cache, ignore_mismatch=False)` returns False otherwise), else a fresh one."""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as err:  # noqa: BLE001 — a stale cache is worth a warning, not a failed build
            log.warning("%s: the timing cache is unreadable (%s); starting a new one", tag, err)
            cache = None
        if cache is not None and config.set_timing_cache(cache, False):
            return cache
        if cache is not None:
            log.warning("%s: the timing cache was made on another device or TensorRT; starting a new one", tag)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        log.warning("%s: TensorRT refused a new timing cache; building without one", tag)
        return None
    return cache


# ---------------------------------------------------------------------------------------------------
# Files


def write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or any buffer, e.g. trt.IHostMemory) to a temporary name, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def timing_cache_path(root: str | Path) -> Path:
    return Path(root) / ENGINES_DIR / TIMING_CACHE


def check_onnx_files(entry: GraphEntry, root: Path) -> Path:
    """The graph file and its external data exist and the file is the one the manifest recorded."""
    path = entry.path(root)
    if not path.is_file():
        raise CheckpointError(f"graph '{entry.name}': {path} is missing; rebuild with python -m export.build")
    missing = [f for f in entry.external_data if not (path.parent / f).is_file()]
    if missing:
        raise CheckpointError(f"graph '{entry.name}': external data {missing} missing next to {path}")
    if sha256_file(path) != entry.sha256:
        raise CheckpointError(f"graph '{entry.name}': {path} does not match the manifest's sha256 (changed after "
                              "export); rebuild with python -m export.build")
    return path


@dataclass(frozen=True)
class PlanOutcome:
    plan: Path
    reused: bool
    record: PlanRecord


def ensure_plan(entry: GraphEntry, root: str | Path, settings: BuildSettings, *, trt: Any = None,
                gpu: GpuInfo | None = None, tag: str = "") -> PlanOutcome:
    """The plan of `entry` at `settings.precision` under `root/engines/`: reused if its record's key is
    what this machine would build and the plan is intact, else (re)built. Logs which, and why."""
    root = Path(root)
    tag = tag or entry.name
    trt = trt if trt is not None else import_tensorrt()
    if gpu is None:
        from runtime.trt.gpu import gpu_info

        gpu = gpu_info(settings.device)
        if gpu is None:
            raise BackendError(f"no usable CUDA GPU (device {settings.device}): TensorRT engines cannot be built here")
    expected = engine_key(entry, settings.precision, settings.policy, trt.__version__, gpu, settings.graph_form)
    plan_path, sidecar = plan_paths(root, entry.name, settings.precision)
    decision = cache_decision(expected, plan_path, sidecar)
    if decision.reuse:
        log.info("%s: reused %s", tag, plan_path.relative_to(root))
        return PlanOutcome(plan_path, True, read_record(sidecar))
    log.info("%s: building %s: %s", tag, plan_path.relative_to(root), "; ".join(decision.reasons))

    onnx_path = check_onnx_files(entry, root)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    cache_file = timing_cache_path(root)
    t0 = time.perf_counter()
    built = build_plan(entry, onnx_path, settings, trt,
                       cache_file.read_bytes() if cache_file.is_file() else None, tag)
    seconds = time.perf_counter() - t0
    sidecar.unlink(missing_ok=True)                      # never a new plan beside an old record
    write_atomic(plan_path, built.plan)
    digest = hashlib.sha256(memoryview(built.plan)).hexdigest()
    if built.timing_cache:
        write_atomic(cache_file, built.timing_cache)
    record = PlanRecord(expected, digest, built.fp32_layers, round(seconds, 2), _notes(settings, built))
    write_record(sidecar, record)
    log.info("%s: built %s in %.1f s (%.1f MB, %d fp32 layer(s))", tag, plan_path.relative_to(root), seconds,
             plan_path.stat().st_size / 1e6, len(built.fp32_layers))
    return PlanOutcome(plan_path, False, record)


def _notes(settings: BuildSettings, built: BuiltPlan) -> dict[str, Any]:
    """What the build chose, for people reading the sidecar: a strongly typed network (and the creation flags it
    took: STRONGLY_TYPED on 10.x, none on 11.x where it is the only mode), the builder flags set and cleared,
    and the tensor types the graph gave it."""
    return {
        "workspace_bytes": int(settings.workspace_bytes),
        "network": "strongly typed",
        "network_flags": list(built.network.names),
        "flags_set": list(built.flags.set), "flags_cleared": list(built.flags.clear),
        "graph_form": settings.graph_form,
        "policy": settings.policy.source if settings.precision != "fp32" else "",
        "tensor_types": dict(sorted(built.tensor_types.items())),
    }
