"""A fake `tensorrt` module for the engine builder (engines/builder.py, engines/strong_typing.py) on a CPU.

It has the classes and methods the builder calls (engines/TENSORRT_API.md §1), records every call, and behaves
like the TensorRT it claims to be (`FakeTrt(networks, version=...)`):
- 11.x (the default): what TensorRT 11 removed is absent and refused the way the real module refuses it —
  AttributeError for BuilderFlag.FP16 / BF16 / INT8 / OBEY_ / PREFER_PRECISION_CONSTRAINTS, `layer.precision`,
  `layer.set_output_type`, `config.int8_calibrator`, `config.set_calibration_profile`, `trt.IInt8EntropyCalibrator2`
  ... (tests/trt/removed_api.py); every network is strongly typed whatever the creation flags, and
  NetworkDefinitionCreationFlag.STRONGLY_TYPED is 0 (deprecated, ignored);
- 10.x: the weak-typing API exists (deprecated), STRONGLY_TYPED is bit 1 (EXPLICIT_BATCH is 0), a network is
  strongly typed only when created with that bit, and on a strongly typed network a precision flag, a
  calibrator or a per-layer precision makes the build fail with an error in the log, as trtexec documents for
  10.x ("mode is not allowed if graph is strongly typed", samples/common/sampleOptions.cpp of v10.16).
Enum values follow NvInfer.h of v10.16 / v11.1 where the builder depends on them (the creation-flag bit).
TF32 is on in a new config, as TensorRT documents ("Enabled by default").

The same flow runs against real TensorRT in tests/test_engines_gpu.py.
"""

from __future__ import annotations

import enum
import warnings
from pathlib import Path
from typing import Any, Callable

from tests.trt.removed_api import REMOVED_BUILDER_FLAGS, REMOVED_NAMES, REMOVED_SETTERS, removed_message

DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8 INT4 FP4")
LayerType = enum.Enum("LayerType", "CONVOLUTION CAST ACTIVATION SOFTMAX ELEMENTWISE UNARY SHUFFLE REDUCE GATHER "
                                   "MATRIX_MULTIPLY CONSTANT SHAPE NORMALIZATION SLICE CONCATENATION QUANTIZE "
                                   "DEQUANTIZE DYNAMIC_QUANTIZE FILL TOPK SCALE")
MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE TACTIC_DRAM")
Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")
ErrorCode = enum.Enum("ErrorCode", "SUCCESS INVALID_GRAPH UNSUPPORTED_NODE")

_COMMON_FLAGS = ("DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS SAFETY_SCOPE DIRECT_IO "
                 "VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE "
                 "STRIP_PLAN REFIT_IDENTICAL WEIGHT_STREAMING REFIT_INDIVIDUAL STRICT_NANS MONITOR_MEMORY "
                 "EDITABLE_TIMING_CACHE DISTRIBUTIVE_INDEPENDENCE")
#: TensorRT 10.x's BuilderFlag (the weak-typing members deprecated since 10.12) and 11.x's (without them).
BuilderFlag10 = enum.Enum("BuilderFlag", f"{' '.join(REMOVED_BUILDER_FLAGS)} OBEY_PRECISION_CONSTRAINTS "
                                         f"PREFER_PRECISION_CONSTRAINTS {_COMMON_FLAGS}")
BuilderFlag11 = enum.Enum("BuilderFlag", _COMMON_FLAGS)
BuilderFlag = BuilderFlag11
#: NetworkDefinitionCreationFlag: 10.x EXPLICIT_BATCH = 0, STRONGLY_TYPED = 1; 11.x STRONGLY_TYPED = 0.
CreationFlag10 = enum.IntEnum("NetworkDefinitionCreationFlag", [("EXPLICIT_BATCH", 0), ("STRONGLY_TYPED", 1),
                                                                ("PREFER_JIT_PYTHON_PLUGINS", 2),
                                                                ("PREFER_AOT_PYTHON_PLUGINS", 3)])
CreationFlag11 = enum.IntEnum("NetworkDefinitionCreationFlag", [("STRONGLY_TYPED", 0), ("PREFER_JIT_PYTHON_PLUGINS", 1),
                                                                ("PREFER_AOT_PYTHON_PLUGINS", 2)])
PreviewFeature10 = enum.Enum("PreviewFeature", "PROFILE_SHARING_0806 ALIASED_PLUGIN_IO_10_03 "
                                               "RUNTIME_ACTIVATION_RESIZE_10_10")
PreviewFeature11 = enum.Enum("PreviewFeature", "ALIASED_PLUGIN_IO_10_03 RUNTIME_ACTIVATION_RESIZE_10_10")
PreviewFeature = PreviewFeature11
WEAK_FLAGS = frozenset({*REMOVED_BUILDER_FLAGS, "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"})
DEFAULT_VERSION = "11.4.0.106"


class _Bound:
    """A pybind11 object: setting an attribute it does not define is an AttributeError (a plain Python object
    would silently accept `config.int8_calibrator = x`); names TensorRT 11 removed say so."""

    _owner = "object"
    _fields: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in self._fields or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(self._missing(name))

    def __getattr__(self, name: str) -> Any:          # only called for names the object does not have
        raise AttributeError(self._missing(name))

    def _missing(self, name: str) -> str:
        if name in REMOVED_NAMES or name in REMOVED_SETTERS:
            return removed_message(self._owner, name)
        return f"'{self._owner}' object has no attribute '{name}'"


class FakeTensor:
    """ITensor: `dtype` is read-only (11.x; setting it on a strongly typed 10.x network is an error too)."""

    def __init__(self, name: str, dtype=DataType.FLOAT, is_shape_tensor: bool = False) -> None:
        self.name, self._dtype, self.is_shape_tensor = name, dtype, is_shape_tensor

    @property
    def dtype(self):
        return self._dtype


class FakeLayer(_Bound):
    """ILayer. TensorRT 11 has no per-layer precision: `precision`, `set_output_type` and friends are missing.
    With `weak_api=True` (a TensorRT 10.x layer) they exist; used on a strongly typed network they record a
    misuse on the network, which makes the build fail like TensorRT's API-usage error."""

    _owner = "ILayer"
    _fields = frozenset({"name", "type", "metadata", "outputs", "weak_api", "network", "output_types"})

    def __init__(self, name: str, type_: str, *dtypes: str, metadata: str = "", weak_api: bool = False) -> None:
        self.name, self.type, self.metadata = name, LayerType[type_], metadata
        self.outputs = [FakeTensor(f"{name}:{i}", DataType[d]) for i, d in enumerate(dtypes or ("FLOAT",))]
        self.weak_api, self.network, self._precision = weak_api, None, None
        self.output_types: dict[int, object] = {}

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, i: int):
        return self.outputs[i] if i < len(self.outputs) else None

    def _require_weak_api(self, name: str) -> None:
        if not self.weak_api:
            raise AttributeError(removed_message("ILayer", name))

    def _weak_call(self, name: str) -> None:
        self._require_weak_api(name)
        # the 10.12+ bindings wrap these in deprecateMember (python/src/infer/pyGraph.cpp of v10.12.0)
        warnings.warn(f"ILayer.{name} is deprecated", DeprecationWarning, stacklevel=3)
        if self.network is not None and self.network.strongly_typed:
            self.network.misuse.append(f"ILayer.{name} on a strongly typed network ({self.name})")

    @property
    def precision(self):
        self._require_weak_api("precision")
        return self._precision

    @precision.setter
    def precision(self, value) -> None:
        self._weak_call("precision")
        self._precision = value

    @property
    def set_output_type(self) -> Callable[[int, Any], None]:
        self._require_weak_api("set_output_type")

        def set_output_type(index: int, dtype) -> None:
            self._weak_call("set_output_type")
            self.output_types[index] = dtype
        return set_output_type


class FakeNetwork:
    def __init__(self, inputs, layers, strongly_typed: bool = False) -> None:
        self.inputs, self.layers = [FakeTensor(n) for n in inputs], list(layers)
        self.strongly_typed, self.misuse = strongly_typed, []
        self.creation_flag = None               # the trt module's NetworkDefinitionCreationFlag (get_flag)

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]

    def get_flag(self, flag) -> bool:
        return flag == self.creation_flag.STRONGLY_TYPED and self.strongly_typed


class FakeParserError:
    def __init__(self, code: str, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
        self._code, self._desc, self._node, self._name, self._op = ErrorCode[code], desc, node, name, op

    def code(self):
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: list[tuple] = []
        self.shape_inputs: list[tuple] = []

    def set_shape(self, input, min, opt, max) -> None:  # noqa: A002 — TensorRT's keyword names
        if not (len(min) == len(opt) == len(max) and all(a <= b <= c for a, b, c in zip(min, opt, max))):
            raise RuntimeError(f"Shape provided for min is inconsistent ({input})")
        self.shapes.append((input, tuple(min), tuple(opt), tuple(max)))

    def set_shape_input(self, input, min, opt, max) -> None:  # noqa: A002 — TensorRT's keyword names
        """Value ranges of a shape-tensor input (the binding raises on inconsistent values)."""
        if not (len(min) == len(opt) == len(max) and all(a <= b <= c for a, b, c in zip(min, opt, max))):
            raise RuntimeError("min input provided for shape tensor is inconsistent with other inputs.")
        self.shape_inputs.append((input, tuple(min), tuple(opt), tuple(max)))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data + b"+timed"


class FakeConfig(_Bound):
    """IBuilderConfig. A new config has TF32 set (TensorRT's default). 11.x has no int8_calibrator /
    set_calibration_profile; 10.x has them (deprecated), and a calibrator on a strongly typed network fails
    the build."""

    _owner = "IBuilderConfig"
    _fields = frozenset({"trt", "flags", "pools", "profiles", "cache", "progress_monitor", "preview"})

    def __init__(self, trt: "FakeTrt") -> None:
        self.trt = trt
        self.flags: set = {trt.BuilderFlag.TF32}
        self.pools: dict = {}
        self.profiles: list[FakeProfile] = []
        self.cache = None
        self.progress_monitor = None
        self.preview: dict = {}
        self._calibrator = self._calibration_profile = None

    def set_preview_feature(self, feature, enable: bool) -> None:
        assert isinstance(feature, self.trt.PreviewFeature), f"not a PreviewFeature of this TensorRT: {feature!r}"
        self.preview[feature] = enable

    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        self.pools[pool] = pool_size

    def set_flag(self, flag) -> None:
        assert isinstance(flag, self.trt.BuilderFlag), f"not a BuilderFlag of this TensorRT: {flag!r}"
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        assert isinstance(flag, self.trt.BuilderFlag), f"not a BuilderFlag of this TensorRT: {flag!r}"
        self.flags.discard(flag)
        self.trt.cleared.add(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        if self.trt.reject_profiles:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> FakeTimingCache:
        self.trt.cache_loads.append(bytes(serialized_timing_cache))
        return FakeTimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.data.startswith(b"stale"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    # implicit INT8 calibration: TensorRT 10.x only
    def _require_10(self, name: str) -> None:
        if self.trt.major >= 11:
            raise AttributeError(removed_message("IBuilderConfig", name))

    @property
    def int8_calibrator(self):
        self._require_10("int8_calibrator")
        return self._calibrator

    @int8_calibrator.setter
    def int8_calibrator(self, value) -> None:
        self._require_10("int8_calibrator")
        self._calibrator = value

    @property
    def set_calibration_profile(self) -> Callable[[Any], None]:
        self._require_10("set_calibration_profile")
        return lambda profile: setattr(self, "_calibration_profile", profile)

    def weak_typing(self) -> list[str]:
        """What on this config a strongly typed network does not allow."""
        used = [f"BuilderFlag.{f.name}" for f in self.flags if f.name in WEAK_FLAGS]
        return used + (["an INT8 calibrator"] if self._calibrator is not None else [])


class FakeTrt:
    """Stands in for the tensorrt module. `networks(path) -> (input names, [FakeLayer])` decides what a parsed
    ONNX file contains; `parse_errors` / `build_fails` make those steps fail for paths containing a given text.
    `builds`: every (network, config) built; `creation_flags`: every create_network argument."""

    def __init__(self, networks, version: str = DEFAULT_VERSION) -> None:
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.networks = networks
        self.parse_errors: dict[str, list[FakeParserError]] = {}
        self.build_fails: set[str] = set()
        self.reject_profiles = False
        self.builds: list[tuple[FakeNetwork, FakeConfig]] = []
        self.creation_flags: list[int] = []
        self.cache_loads: list[bytes] = []
        self.cleared: set = set()
        weak = self.major < 11
        self.DataType, self.LayerType, self.MemoryPoolType = DataType, LayerType, MemoryPoolType
        self.BuilderFlag = BuilderFlag10 if weak else BuilderFlag11
        self.NetworkDefinitionCreationFlag = CreationFlag10 if weak else CreationFlag11
        self.PreviewFeature = PreviewFeature10 if weak else PreviewFeature11
        self.float32, self.float16, self.int8 = DataType.FLOAT, DataType.HALF, DataType.INT8
        if weak:
            class IInt8EntropyCalibrator2:              # deprecated since 10.1, still there in 10.x
                def __init__(self) -> None:
                    self.base_initialised = True
            self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
        self.ILogger, self.IProgressMonitor = _base("ILogger"), _base("IProgressMonitor")
        self.OnnxParser, self.Builder = _parser_class(self), _builder_class(self)

    def __getattr__(self, name: str) -> Any:            # only for names this module does not have
        if name in REMOVED_NAMES:
            raise AttributeError(f"module 'tensorrt' has no attribute '{name}' (removed in TensorRT 11; "
                                 f"replacement: {REMOVED_NAMES[name]})")
        raise AttributeError(f"module 'tensorrt' has no attribute '{name}'")


def _base(name: str) -> type:
    """A pybind11 trampoline base: subclasses must call its __init__ explicitly."""

    def __init__(self) -> None:
        self.base_initialised = True
    return type(name, (), {"__init__": __init__})


def _parser_class(trt: FakeTrt) -> type:
    class OnnxParser:
        def __init__(self, network: FakeNetwork, logger) -> None:
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, model: str) -> bool:
            path = str(model)
            self.errors = next((e for key, e in trt.parse_errors.items() if key in path), [])
            if self.errors:
                return False
            names, layers = trt.networks(Path(path))
            self.network.inputs, self.network.layers = [FakeTensor(n) for n in names], list(layers)
            for layer in self.network.layers:
                layer.weak_api, layer.network = trt.major < 11, self.network
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> FakeParserError:
            return self.errors[index]
    return OnnxParser


def _builder_class(trt: FakeTrt) -> type:
    class Builder(_Bound):
        _owner = "Builder"
        _fields = frozenset({"logger"})

        def __init__(self, logger) -> None:
            assert getattr(logger, "base_initialised", False), "ILogger.__init__ was not called"
            self.logger = logger

        def create_network(self, flags: int = 0) -> FakeNetwork:
            trt.creation_flags.append(int(flags))
            known = sum(1 << int(f) for f in trt.NetworkDefinitionCreationFlag)
            assert not int(flags) & ~known, f"unknown NetworkDefinitionCreationFlag bits {flags:#x}"
            strong_bit = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = FakeNetwork([], [], strongly_typed=trt.major >= 11 or bool(int(flags) & strong_bit))
            network.creation_flag = trt.NetworkDefinitionCreationFlag
            return network

        def create_builder_config(self) -> FakeConfig:
            return FakeConfig(trt)

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network: FakeNetwork, config: FakeConfig):
            trt.builds.append((network, config))
            monitor = config.progress_monitor
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactic selection", "Building engine", 1)
                assert monitor.step_complete("Tactic selection", 0) is True
                monitor.phase_finish("Tactic selection")
                monitor.phase_finish("Building engine")
            misuse = network.misuse + (config.weak_typing() if network.strongly_typed else [])
            if misuse:
                self.logger.log(Severity.ERROR, "Error Code 3: API Usage Error (not allowed on a strongly typed "
                                                f"network: {', '.join(misuse)})")
                return None
            if any(key in n.name for key in trt.build_fails for n in network.inputs):
                self.logger.log(Severity.ERROR, "Error Code 4: Internal Error (out of memory for tactic)")
                return None
            layers = ",".join(f"{ly.name}={'/'.join(o.dtype.name for o in ly.outputs)}" for ly in network.layers)
            flags = sorted(f.name for f in config.flags)
            return f"PLAN strongly_typed={network.strongly_typed} flags={flags} {layers}".encode()
    return Builder


# ---------------------------------------------------------------------------------------------------
# Networks in each graph form


def graph_layers(entry, form: str = "fp16-mixed") -> tuple[list[str], list[FakeLayer]]:
    """A small layer list in the exporter's naming for any graph, typed as a graph of `form` would be: fp32
    everywhere; fp16-mixed (Casts into fp16 around the matmul, the norm and softmax kept fp32); int8-qdq
    (the same with a Quantize/Dequantize pair in front of the matmul)."""
    g = entry.name
    half = "FLOAT" if form == "fp32" else "HALF"
    layers = [FakeLayer("node_Shape_1", "SHAPE", "INT64"),
              FakeLayer(f"{g}.block.norm/mean/ReduceMean", "REDUCE", "FLOAT")]
    if form != "fp32":
        layers.append(FakeLayer(f"{g}.block/linear/Cast", "CAST", "HALF"))
    if form == "int8-qdq":
        layers += [FakeLayer(f"{g}.block/linear/QuantizeLinear", "QUANTIZE", "INT8"),
                   FakeLayer(f"{g}.block/linear/DequantizeLinear", "DEQUANTIZE", "HALF")]
    layers.append(FakeLayer(f"{g}.block/linear/MatMul", "MATRIX_MULTIPLY", half))
    if form != "fp32":
        layers.append(FakeLayer(f"{g}.block.attn/softmax/Cast", "CAST", "FLOAT"))
    layers += [FakeLayer(f"{g}.block.attn/softmax/Softmax", "SOFTMAX", "FLOAT"),
               FakeLayer(f"{g}/add/Add", "ELEMENTWISE", "FLOAT")]
    return [t.name for t in entry.inputs], layers


def fake_trt_for(manifest, version: str = DEFAULT_VERSION, form: str = "fp16-mixed") -> FakeTrt:
    """A fake TensorRT whose parser reads every ONNX file of `manifest` as a graph of `form`."""
    by_file = {Path(e.file).name: e for e in manifest.graphs.values()}
    return FakeTrt(lambda path: graph_layers(by_file[path.name], form), version)
