"""Strongly typed networks: how to create one on each supported TensorRT, and whether a parsed ONNX graph is in
the precision form its plan claims (DESIGN.md §5).

Why: TensorRT 11 removed weak typing ("TensorRT 11.x removes all weak typing APIs": the FP16/INT8 builder
flags, OBEY/PREFER_PRECISION_CONSTRAINTS, per-layer precision and output types, implicit INT8 calibration;
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x.html). Every tensor's
type now comes from the network itself, i.e. from the ONNX graph: an fp16 plan is built from a graph with
fp16 tensors and explicit Casts around its fp32 islands, an int8 plan from a graph with QuantizeLinear /
DequantizeLinear nodes, and an fp32 graph gives an fp32 plan whatever else is asked. So the builder sets no
precision at all; it only has to (1) make the network strongly typed and (2) refuse a graph whose types do
not match the plan's precision (an fp16 plan from an fp32 graph would silently be an fp32 plan).

Creating the network:
- TensorRT 10.12-10.x: strong typing is opt-in, `builder.create_network(1 << int(NetworkDefinitionCreationFlag
  .STRONGLY_TYPED))` (Builder page: "to enable strongly typed mode, pass a value of 1 <<
  int(NetworkDefinitionCreationFlag.STRONGLY_TYPED) to create_network()"); checked afterwards with
  `network.get_flag(STRONGLY_TYPED)`.
- TensorRT 11.x: every network is strongly typed and the flag is "[DEPRECATED] Deprecated in TensorRT 11.0.
  Strongly typed mode is always enabled. This flag is retained for API compatibility but is ignored."
  (https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html), so no
  flag is passed: `create_network(0)`. Its value also changed (10.x: EXPLICIT_BATCH = 0, STRONGLY_TYPED = 1;
  11.x: STRONGLY_TYPED = 0; NvInfer.h of v10.16 and v11.1), which is why the bit is always computed from the
  installed module, never written as a number.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any

from runtime.errors import BackendError, ContractError
from runtime.trt.api import enum_name
from runtime.trt.gpu import tensorrt_release, unsupported_tensorrt

log = logging.getLogger(__name__)

#: Layer types that quantize or dequantize (the ONNX QuantizeLinear / DequantizeLinear nodes).
QDQ_LAYERS = frozenset({"QUANTIZE", "DEQUANTIZE", "DYNAMIC_QUANTIZE"})
#: Floating-point tensor types below fp32 that mark a mixed-precision graph.
LOW_FLOAT = frozenset({"HALF", "BF16", "FP8", "FP4"})
#: Layers whose float32 outputs are not computation (weights), left out of the recorded fp32 layers.
NOT_COMPUTE = frozenset({"CONSTANT", "SHAPE"})


@dataclass(frozen=True)
class NetworkCreation:
    """The `create_network` flags of a strongly typed network on this TensorRT."""

    flags: int
    names: tuple[str, ...]          # the creation flags set ("STRONGLY_TYPED" on 10.x, none on 11.x)
    implicit: bool                  # strong typing is TensorRT's only mode (11.x): nothing to ask for


def network_creation(trt: Any) -> NetworkCreation:
    """How to create a strongly typed network with this tensorrt module (BackendError for an unsupported one)."""
    version = str(getattr(trt, "__version__", ""))
    unsupported = unsupported_tensorrt(version)
    if unsupported:
        raise BackendError(unsupported)
    major, _ = tensorrt_release(version)
    if major >= 11:
        return NetworkCreation(0, (), True)
    flag = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    return NetworkCreation(1 << int(flag), ("STRONGLY_TYPED",), False)


def check_strongly_typed(network: Any, trt: Any, creation: NetworkCreation, tag: str) -> None:
    """On 10.x, the network must report the flag it was created with (`INetworkDefinition.get_flag`)."""
    if creation.implicit or not callable(getattr(network, "get_flag", None)):
        return
    if not network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED):
        raise BackendError(f"{tag}: TensorRT {trt.__version__} created a network that is not strongly typed "
                           f"(flags {creation.flags:#x}); the builder sets no precision, so it cannot build it")


@dataclass(frozen=True)
class NetworkTypes:
    """The types a parsed, strongly typed network computes in (they are the ONNX graph's)."""

    dtypes: dict[str, int]              # layer output type name -> number of outputs of that type
    qdq_layers: int                     # quantize / dequantize layers
    fp32_layers: tuple[str, ...]        # computing layers with a float32 output, in network order

    def low_float(self) -> dict[str, int]:
        return {name: n for name, n in self.dtypes.items() if name in LOW_FLOAT}


def network_types(network: Any) -> NetworkTypes:
    """Read every layer's output types (known once parsed: a strongly typed network infers them from the graph)."""
    dtypes: collections.Counter[str] = collections.Counter()
    qdq, fp32 = 0, []
    for i in range(int(network.num_layers)):
        layer = network.get_layer(i)
        kind = enum_name(layer.type)
        qdq += kind in QDQ_LAYERS
        outputs = [layer.get_output(j) for j in range(int(layer.num_outputs))]
        names = [enum_name(t.dtype) for t in outputs if t is not None]
        dtypes.update(names)
        if "FLOAT" in names and kind not in NOT_COMPUTE:
            fp32.append(str(layer.name))
    return NetworkTypes(dict(dtypes), qdq, tuple(fp32))


def graph_form_problem(form: str, types: NetworkTypes) -> str:
    """Why a network with `types` is not a graph of precision form `form` ("" when it is)."""
    low = types.low_float()
    if form == "fp32":
        if types.qdq_layers or low:
            return (f"it has {types.qdq_layers} quantize/dequantize layer(s) and reduced-precision tensors {low}, "
                    "an fp32 graph has neither")
        return ""
    if form == "fp16-mixed":
        if types.qdq_layers:
            return f"it has {types.qdq_layers} quantize/dequantize layer(s) (an int8-qdq graph?)"
        if not types.dtypes.get("HALF"):
            return "it has no fp16 tensor (an fp32 graph? its plan would compute in fp32)"
        return ""
    if form == "int8-qdq":
        if not types.qdq_layers or not types.dtypes.get("INT8"):
            return (f"it has {types.qdq_layers} quantize/dequantize layer(s) and {types.dtypes.get('INT8', 0)} int8 "
                    "tensor(s); INT8 is explicit quantization: QuantizeLinear/DequantizeLinear pairs in the graph")
        return ""
    return f"'{form}' is not a graph form this builder knows (fp32, fp16-mixed, int8-qdq)"


def check_graph_form(graph: str, source: Any, form: str, types: NetworkTypes) -> None:
    """Refuse to build a `form` plan from a network that is not in that form (ContractError naming the file)."""
    problem = graph_form_problem(form, types)
    if problem:
        raise ContractError(f"graph '{graph}': {source} is not in the {form} precision form: {problem}. The "
                            "builder is strongly typed (TensorRT takes every type from the ONNX graph), so a plan's "
                            f"precision must be in its graph: give it the {form} ONNX file")
    log.debug("graph '%s': %s graph, output types %s, %d Q/DQ layer(s), %d fp32 layer(s)", graph, form,
              types.dtypes, types.qdq_layers, len(types.fp32_layers))
