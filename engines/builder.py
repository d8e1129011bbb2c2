"""One graph's ONNX file -> a serialized TensorRT plan, reused while its EngineKey holds (DESIGN.md §5).

Two layers, so that everything but the TensorRT calls is testable on a machine without a GPU:
- pure decisions: which builder flags a precision needs (`builder_flags`), the optimization-profile
  `set_shape` calls of a graph (`profile_calls`, from runtime.trt.engine_plan.engine_profiles: gpt_decode
  gets one profile per KV-cache bucket with cache_len fixed), the plan's key (`engine_key`) and whether
  an existing plan can be reused (`cache_decision`);
- thin TensorRT calls (`build_plan`), each as documented for TensorRT 10 (see the URLs at each step).
  The `tensorrt` module is passed in (or imported lazily), never imported at module level.

Build steps and why:
1. Logger: a `trt.ILogger` subclass routing TensorRT's messages to `logging` ("tensorrt"; TensorRT
   INFO goes to DEBUG because it is chatty) and keeping the last errors for the failure message. One
   instance per process: TensorRT keeps the first logger given to a builder as its global logger.
2. `trt.Builder(logger)`, `builder.create_network(0)` (explicit batch is implicit in TRT 10; a weakly
   typed network, because fp16 with fp32 islands is set per layer), `trt.OnnxParser(network, logger)`,
   `parser.parse_from_file(path)` (resolves `<graph>.onnx.data` next to the file); on failure every
   parser error with its node name, operator and description. The parser stays alive until the build
   finished (it owns the weights).
3. Config: workspace pool limit; precision flags (FP16; OBEY_PRECISION_CONSTRAINTS whenever fp32 islands
   were applied, else they are only hints; INT8 only with a calibrator from engines/calibration_hook.py);
   TF32 cleared for fp32 plans (TensorRT enables it by default, and TF32 matmuls — 10-bit mantissas —
   would miss the contracts' fp32 tolerances of ~1e-4).
4. One optimization profile per `Profile` (`set_shape(name, min, opt, max)` per input;
   `add_optimization_profile` must return >= 0).
5. The shared timing cache `OUT/engines/timing.cache` (created empty if absent or unusable, saved
   atomically after each successful build) and a progress monitor logging the build phases.
6. `build_serialized_network` (None = failure) -> the plan, written atomically, then its sidecar
   record (runtime.trt.engine_plan.PlanRecord: key, plan sha256, the fp32 layers, build time).

Deprecations to know (TENSORRT_API.md §2-3): the precision flags and per-layer precision are deprecated
since TensorRT 10.12 (strong typing supersedes them) and implicit INT8 calibration since 10.1; they work
on weakly typed networks throughout 10.x and are gone in TensorRT 11.

URLs: Builder https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html ,
BuilderConfig .../infer/Core/BuilderConfig.html , OnnxParser .../parsers/Onnx/pyOnnx.html ,
OptimizationProfile .../infer/Core/OptimizationProfile.html , ProgressMonitor
.../infer/Core/ProgressMonitor.html
(all under https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

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

from .calibration_hook import CalibratorFactory, require_calibrator
from .precision import PrecisionPolicy, apply_precision

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_WORKSPACE_GIB = 4.0

Shape = tuple[int, ...]
SetShape = tuple[str, Shape, Shape, Shape]          # profile.set_shape(input, min, opt, max)


@dataclass(frozen=True)
class BuildSettings:
    """What every plan of one `build_all` shares."""

    precision: str
    policy: PrecisionPolicy
    workspace_bytes: int = int(DEFAULT_WORKSPACE_GIB * GIB)
    calibrator: CalibratorFactory | None = None
    device: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.workspace_bytes <= 0:
            raise InputError(f"workspace {self.workspace_bytes} bytes: must be positive")
        require_calibrator(self.precision, self.calibrator)


# ---------------------------------------------------------------------------------------------------
# Pure decisions


@dataclass(frozen=True)
class FlagPlan:
    """BuilderFlag names to set and to clear on the config."""

    set: tuple[str, ...] = ()
    clear: tuple[str, ...] = ()


def builder_flags(precision: str, fp32_islands: bool, int8_calibrated: bool = False) -> FlagPlan:
    """The flags a precision needs.

    fp32: nothing set, TF32 cleared (on by default; would break fp32 parity). fp16: FP16. int8: FP16
    plus INT8 when this graph has a calibrator (layers INT8 cannot take fall back to fp16, not fp32).
    OBEY_PRECISION_CONSTRAINTS whenever fp32 islands were set, so TensorRT honours them instead of
    treating them as hints (it then fails the build rather than silently ignoring one)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return FlagPlan((), ("TF32",))
    flags = ["FP16"]
    if precision == "int8" and int8_calibrated:
        flags.append("INT8")
    if fp32_islands:
        flags.append("OBEY_PRECISION_CONSTRAINTS")
    return FlagPlan(tuple(flags), ())


def profile_calls(entry: GraphEntry) -> list[tuple[str, list[SetShape]]]:
    """(profile label, the set_shape calls of that profile) for every optimization profile of `entry`."""
    return [(p.label, [(i.name, i.min, i.opt, i.max) for i in p.inputs]) for p in engine_profiles(entry)]


def policy_digest(precision: str, policy: PrecisionPolicy) -> str:
    """The policy's part of the key: "" for fp32 (no islands: a policy change must not rebuild fp32 plans)."""
    return "" if precision == "fp32" else policy.sha256()


def engine_key(entry: GraphEntry, precision: str, policy: PrecisionPolicy, trt_version: str,
               gpu: GpuInfo) -> EngineKey:
    return EngineKey(entry.name, entry.sha256, precision, engine_profiles(entry), str(trt_version), gpu,
                     policy_digest(precision, policy))


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
    """Ask for plans whose activation memory follows the bound shapes (TensorRT >= 10.10 preview feature
    RUNTIME_ACTIVATION_RESIZE_10_10). Without it `update_device_memory_size_for_shapes` may report the
    profile maximum, and the executor's user-managed memory (runtime/trt/context_memory.py) could not shrink
    below it. Older 10.x: logged and skipped (the plan then behaves as before). -> whether it was set."""
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
    fp32_layers: list[tuple[str, str]]
    timing_cache: bytes | None
    flags: FlagPlan
    int8: bool
    notes: dict[str, Any] = field(default_factory=dict)


def build_plan(entry: GraphEntry, onnx_path: Path, settings: BuildSettings, trt: Any,
               timing_cache: bytes | None = None, tag: str = "") -> BuiltPlan:
    """Parse `onnx_path` and build its serialized plan at `settings` (the thin TensorRT part)."""
    tag = tag or entry.name
    logger = trt_logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)            # kept alive until the build is done
    if not parser.parse_from_file(str(onnx_path)):
        lines = parser_errors(parser) or list(logger.errors) or ["no error reported"]
        raise BackendError(f"{onnx_path}: TensorRT {getattr(trt, '__version__', '?')} could not parse the graph:\n  - "
                           + "\n  - ".join(lines))
    check_network_inputs(network, entry)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))

    islands = apply_precision(network, entry.name, settings.policy, trt) if settings.precision != "fp32" else []
    profiles = engine_profiles(entry)
    calibrator = None
    if settings.precision == "int8" and settings.calibrator is not None:
        calibrator = settings.calibrator(entry.name, entry, profiles[0])
        if calibrator is None:
            log.warning("%s: no INT8 calibration for this graph: its int8 plan is built as fp16", tag)
    flags = builder_flags(settings.precision, bool(islands), calibrator is not None)
    for name in flags.set:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in flags.clear:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    _enable_activation_resize(trt, config, tag)

    trt_profiles = [_add_profile(builder, config, entry, label, calls) for label, calls in profile_calls(entry)]
    if calibrator is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)     # implicit INT8: deprecated since 10.1
            config.int8_calibrator = calibrator
            config.set_calibration_profile(trt_profiles[0])

    cache = _timing_cache(config, timing_cache, tag)
    monitor = progress_monitor(trt, tag)
    if monitor is not None:
        config.progress_monitor = monitor

    log.info("%s: building %s plan (%d profile(s), %d fp32 layer(s), flags %s)", tag, settings.precision,
             len(trt_profiles), len(islands), ",".join(flags.set) or "-")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = list(logger.errors) or ["TensorRT logged no error; rerun with -v for its full log"]
        raise BackendError(f"{onnx_path}: TensorRT could not build the {settings.precision} engine of graph "
                           f"'{entry.name}':\n  - " + "\n  - ".join(errors))
    serialized = config.get_timing_cache() if cache is not None else None
    cache_bytes = bytes(serialized.serialize()) if serialized is not None else None
    return BuiltPlan(plan, islands, cache_bytes, flags, calibrator is not None)


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
    expected = engine_key(entry, settings.precision, settings.policy, trt.__version__, gpu)
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
    record = PlanRecord(expected, digest, tuple(n for n, _ in built.fp32_layers), round(seconds, 2),
                        _notes(settings, built))
    write_record(sidecar, record)
    log.info("%s: built %s in %.1f s (%.1f MB, %d fp32 layer(s))", tag, plan_path.relative_to(root), seconds,
             plan_path.stat().st_size / 1e6, len(built.fp32_layers))
    return PlanOutcome(plan_path, False, record)


def _notes(settings: BuildSettings, built: BuiltPlan) -> dict[str, Any]:
    notes: dict[str, Any] = {
        "workspace_bytes": int(settings.workspace_bytes),
        "flags_set": list(built.flags.set), "flags_cleared": list(built.flags.clear),
        "policy": settings.policy.source if settings.precision != "fp32" else "",
        "fp32_rules": _count(reason for _, reason in built.fp32_layers),
    }
    if settings.precision == "int8":
        notes["int8"] = built.int8
    return notes


def _count(items: Iterable[str]) -> dict[str, int]:
    return dict(collections.Counter(items))
