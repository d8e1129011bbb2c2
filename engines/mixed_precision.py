"""FP16 with fp32 islands written into the ONNX graph itself: the form strongly typed TensorRT builds.

Why in the graph: TensorRT 11 removed weak typing (precision flags, per-layer precision, INT8 calibrators;
deprecated since 10.12). A strongly typed network computes every tensor in the type the graph gives it, so
the ONNX file has to say which tensors are fp16 and which stay fp32. The same file then means the same
numbers in TensorRT, in ONNX Runtime CUDA, and in the CPU emulation calibration runs on it
(calibration/fp16_emulation.py derives its emulation from this graph, not from the policy).

Why our own pass (and not ModelOpt AutoCast or onnxconverter-common): the islands are a node-name list from
the precision policy (engines/precision.py; a calibration run's measured policy), and this pass applies
exactly that list and nothing else — AutoCast adds its own data/initializer-magnitude rules on top, and
`nvidia-modelopt` pulls torch and a CUDA 12 onnxruntime-gpu next to our CPU onnxruntime (the two share
one module folder), failed on 4 of the 11 tiny graphs with its defaults and named every fixed dimension
`unk`, which broke ONNX Runtime on two of them; onnxconverter-common clamps weights to ±1e4 rather than
fp16's ±65504, made 3 graphs ONNX Runtime cannot load and turned float32 graph outputs into fp16 (measured:
README "Precision in the graph").

The transformation, for the set `half` of nodes computing in fp16 (all nodes with a float output except
Constant/Shape nodes and the policy's fp32 nodes; `fp16_nodes`):
- a half node reads every float input as fp16: an fp16 tensor as is, an initializer as an fp16 copy
  (clipped to ±65504, then rounded to nearest even, subnormals kept: what TensorRT does to fp32 weights of
  an fp16 layer), anything else (graph inputs, fp32 nodes' outputs, Constant outputs) through one
  Cast(to=FLOAT16) per tensor; its float outputs become fp16 tensors; a Cast(to=FLOAT) node in the half
  set casts to FLOAT16 instead, a ConstantOfShape gets an fp16 value;
- an fp32 node (island, or a node without float outputs: comparisons, ArgMax, Cast to int) reads every fp16
  tensor through one Cast(to=FLOAT) per tensor, and its outputs stay as they are;
- exceptions from the ONNX type constraints: Resize's `roi` and `scales` stay float32 (`FLOAT32_INPUTS`),
  LayerNormalization's Mean/InvStdDev outputs stay float32 (type U excludes fp16), Shape and Size read
  any type (no Cast);
- graph inputs and outputs keep the contract's dtypes: an output computed in fp16 is produced under
  `<name>/fp16` and cast to float32 under its own name;
- QuantizeLinear / DequantizeLinear (an INT8 form's Q/DQ, calibration/int8_qdq.py) take the precision of
  the compute node they feed, never the policy's: a DequantizeLinear is fp16 when every node reading it is
  (its scale becomes an fp16 copy, its output fp16), a QuantizeLinear when every DequantizeLinear reading it
  is (it reads its input and scale as fp16); the pair then shares one fp16 scale. This is the strongly typed
  form TensorRT builds (its ONNX parser makes the Dequantize layer's output type the scale's type) and
  needs opset 19 (QuantizeLinear-13 / DequantizeLinear-13 accept float32 only); an older graph with fp16
  Q/DQ is refused.
Node names and tensor names are kept (so policy rules and calibration reports keep meaning); the inserted
Casts are named `<tensor>/to_fp16` and `<tensor>/to_fp32`. Graphs with control flow (If/Loop/Scan) are
refused (the exported IndexTTS2 graphs have none).

ONNX Runtime's CPU provider runs the result, but not in fp16: it has fp16 kernels only for data
movement and a few fused ops, and otherwise inserts Casts to fp32 around fp16 nodes and removes the model's
own fp32->fp16->fp32 Cast pairs feeding them (measured: an fp16 Add returned values no fp16 can hold), so
a CPU run of this graph sees the weight rounding but not the activation rounding. The activation
rounding is what calibration's emulation (Cast pairs, which ONNX Runtime keeps) measures on this graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from runtime.errors import ContractError

from .precision import LayerInfo, PrecisionPolicy, forceable, select_fp32_layers

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FLOAT, FLOAT16 = 1, 10                   # onnx.TensorProto.FLOAT / FLOAT16
#: inputs that stay float32 whatever the node computes in (ONNX type constraints): Resize roi and scales
FLOAT32_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,)}
#: outputs that stay float32 (LayerNormalization's Mean and InvStdDev have type U: float or bfloat16)
FLOAT32_OUTPUTS: dict[str, tuple[int, ...]] = {"LayerNormalization": (1, 2)}
#: inputs read for their shape only: an fp16 tensor is fine as it is
SHAPE_ONLY_INPUTS: dict[str, tuple[int, ...]] = {"Shape": (0,), "Size": (0,)}
#: ops whose float output type comes from an attribute this pass does not rewrite
DTYPE_ATTRIBUTE_OPS = frozenset({"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                                 "RandomUniformLike", "Bernoulli", "Multinomial"})

#: ONNX op type -> the TensorRT LayerType its parser produces (the main layer; approximate). Used to apply
#: the `types` filters of a precision policy to ONNX nodes. Unlisted ops map to their upper-cased name.
ONNX_TO_TRT_LAYER: dict[str, str] = {
    **{op: "ELEMENTWISE" for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Equal", "Less",
                                    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Sum")},
    **{op: "UNARY" for op in ("Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Tan", "Floor",
                              "Ceil", "Round", "Erf", "Not", "Sign", "Asin", "Acos", "Atan", "Sinh", "Cosh",
                              "IsNaN", "IsInf")},
    **{op: "ACTIVATION" for op in ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Softplus",
                                   "Softsign", "HardSigmoid", "ThresholdedRelu", "Clip", "Mish", "Gelu")},
    **{op: "REDUCE" for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                               "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")},
    **{op: "NORMALIZATION" for op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization")},
    **{op: "SHUFFLE" for op in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")},
    "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION",
    "ConvTranspose": "DECONVOLUTION", "Concat": "CONCATENATION", "Slice": "SLICE", "Expand": "SLICE",
    "Gather": "GATHER", "GatherElements": "GATHER", "Where": "SELECT", "Pad": "PADDING", "Cast": "CAST",
    "Constant": "CONSTANT", "ConstantOfShape": "FILL", "Range": "FILL", "Shape": "SHAPE", "Split": "SLICE",
    "TopK": "TOPK", "ArgMax": "TOPK", "ArgMin": "TOPK", "ScatterND": "SCATTER", "Tile": "SLICE",
    "CumSum": "CUMULATIVE", "Einsum": "EINSUM", "Resize": "RESIZE", "BatchNormalization": "SCALE",
    "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE",
}
#: explicit quantization nodes: their precision follows the node they feed (`fp16_nodes`)
QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
#: the first opset whose QuantizeLinear / DequantizeLinear take fp16 data and scales
FP16_QDQ_OPSET = 19

_DTYPE_NAMES = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8", 2: "UINT8",
                11: "DOUBLE"}


class MixedPrecisionError(ContractError):
    """The graph has a form the mixed-precision pass does not handle (named in the message)."""


# ---------------------------------------------------------------------------------------------------
# What the policy sees of an ONNX graph


@dataclass(frozen=True)
class NodeView:
    """One ONNX node: position, tensors, and the LayerInfo a policy rule matches (name, op, output types)."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_outputs: tuple[str, ...]
    layer: LayerInfo


def tensor_types(model: Any) -> dict[str, int]:
    """ONNX elem_type of every named tensor the graph declares (inputs, outputs, value_info, initializers)."""
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({init.name: init.data_type for init in g.initializer})
    return types


def node_views(model: Any) -> list[NodeView]:
    """Every node with its LayerInfo; output types come from the graph's value_info (the exporter writes
    them; an output of unknown type counts as not float). Control flow is refused."""
    types = tensor_types(model)
    views = []
    for i, node in enumerate(model.graph.node):
        if any(a.type in (5, 10) for a in node.attribute):        # GRAPH / GRAPHS attributes: If, Loop, Scan
            raise MixedPrecisionError(f"node {node.name or i} ({node.op_type}) has a subgraph; control flow is "
                                      "not handled (the exported IndexTTS2 graphs have none)")
        outs = tuple(node.output)
        dtypes = tuple(_DTYPE_NAMES.get(types.get(o, 0), "NONE") for o in outs if o)
        floats = tuple(o for o in outs if o and types.get(o) == FLOAT)
        name = node.name or f"{node.op_type}_{i}"
        layer = LayerInfo(name, ONNX_TO_TRT_LAYER.get(node.op_type, node.op_type.upper()), dtypes, op=node.op_type)
        views.append(NodeView(i, name, node.op_type, tuple(node.input), outs, floats, layer))
    return views


def policy_fp32(graph: str, views: Sequence[NodeView], policy: PrecisionPolicy | None) -> dict[str, str]:
    """node name -> reason, for the nodes `policy` keeps in fp32 (none without a policy). Q/DQ nodes are
    never the policy's: their precision follows the node they feed (`fp16_nodes`)."""
    if policy is None:
        return {}
    return dict(select_fp32_layers(graph, [v.layer for v in views if v.op_type not in (QUANTIZE, DEQUANTIZE)],
                                   policy))


def fp16_nodes(views: Sequence[NodeView], fp32: Iterable[str]) -> set[str]:
    """Names of the nodes that compute in fp16 under the given fp32 set (Q/DQ nodes: as their readers)."""
    keep = set(fp32)
    half = {v.name for v in views if forceable(v.layer) and v.float_outputs and v.name not in keep
            and v.op_type not in (QUANTIZE, DEQUANTIZE)}
    return half | _qdq_following_readers(views, half)


def _qdq_following_readers(views: Sequence[NodeView], half: set[str]) -> set[str]:
    """The Q/DQ nodes that are fp16 given the other nodes' precision `half`: a DequantizeLinear whose readers
    are all fp16, then a QuantizeLinear whose readers (DequantizeLinear nodes) are all fp16. Shape and Size
    do not count (they read any type); a Q/DQ node nobody else reads stays fp32."""
    readers: dict[str, list[str]] = {}
    for v in views:
        for j, t in enumerate(v.inputs):
            if t and j not in SHAPE_ONLY_INPUTS.get(v.op_type, ()):
                readers.setdefault(t, []).append(v.name)
    out: set[str] = set()
    for kind in (DEQUANTIZE, QUANTIZE):                      # DQ first: a Q's readers are DQ nodes
        for v in views:
            if v.op_type == kind:
                names = [r for o in v.outputs if o for r in readers.get(o, [])]
                if names and all(r in half or r in out for r in names):
                    out.add(v.name)
    return out


def fp16_weight(values: np.ndarray) -> np.ndarray:
    """A float32 weight as an fp16 layer holds it (float32 array of fp16 values): clipped to ±65504, then
    rounded to nearest even (subnormals kept)."""
    return np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# The pass


@dataclass
class MixedGraph:
    """A mixed-precision graph and what was done to it.

    `origin[k]`: the index of the original node that node k of `model` belongs to (its own copy, the Casts
    inserted for its inputs, the Casts after it for graph outputs), so a reader can pair nodes with the
    float32 graph's; `fp16_tensors`: tensors of `model` that are fp16; `renamed`: graph output -> the
    name its fp16 producer writes."""

    model: Any
    fp32_nodes: dict[str, str]
    half: set[str]
    origin: list[int]
    fp16_tensors: set[str]
    renamed: dict[str, str] = field(default_factory=dict)
    casts: int = 0

    @property
    def fp16_count(self) -> int:
        return len(self.half)


def to_mixed_precision(model: Any, graph: str, policy: PrecisionPolicy) -> MixedGraph:
    """The fp16 graph of `model` (a float32 graph named `graph`) with `policy`'s fp32 islands."""
    views = node_views(model)
    fp32 = policy_fp32(graph, views, policy)
    mixed = mixed_precision_model(model, views, fp16_nodes(views, fp32))
    mixed.fp32_nodes = fp32
    log.info("%s: %d fp16 node(s), %d fp32 island node(s), %d Cast(s) added", graph, mixed.fp16_count, len(fp32),
             mixed.casts)
    return mixed


def mixed_precision_model(model: Any, views: Sequence[NodeView], half: set[str]) -> MixedGraph:
    """The graph with the nodes in `half` computing in fp16 (module docstring)."""
    from onnx import helper, numpy_helper

    g = model.graph
    types = tensor_types(model)
    inits = {init.name: init for init in g.initializer}
    graph_outputs = {o.name for o in g.output}
    used_names = {n.name for n in g.node}
    bad = [v for v in views if v.name in half and v.op_type in DTYPE_ATTRIBUTE_OPS]
    if bad:
        raise MixedPrecisionError(f"nodes {[v.name for v in bad[:5]]} ({bad[0].op_type}) take their output type from "
                                  "an attribute this pass does not rewrite; keep them fp32 in the precision policy")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    qdq = [v.name for v in views if v.name in half and v.op_type in (QUANTIZE, DEQUANTIZE)]
    if qdq and opset < FP16_QDQ_OPSET:
        raise MixedPrecisionError(f"{len(qdq)} QuantizeLinear/DequantizeLinear node(s) (e.g. {qdq[0]}) would read or "
                                  f"write fp16, which needs opset {FP16_QDQ_OPSET} (this graph has opset {opset}); "
                                  "convert the graph first (onnx.version_converter)")

    fp16: set[str] = set()                       # tensors (by new name) that are fp16
    renamed: dict[str, str] = {}                 # graph output computed in fp16 -> producer's fp16 name
    for v in views:
        if v.name in half:
            pinned = FLOAT32_OUTPUTS.get(v.op_type, ())
            for k, o in enumerate(v.outputs):
                if o in v.float_outputs and k not in pinned and o in graph_outputs:
                    renamed[o] = f"{o}/fp16"

    nodes: list[Any] = []
    origin: list[int] = []
    new_inits: dict[str, Any] = {}
    new_value_info: list[Any] = []
    casts: dict[tuple[str, int], str] = {}
    shapes = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}

    def unique(stem: str) -> str:
        name, k = stem, 1
        while name in used_names:
            k += 1
            name = f"{stem}#{k}"
        used_names.add(name)
        return name

    def current(t: str) -> str:
        return renamed.get(t, t)

    def cast(t: str, to: int, at: int) -> str:
        key = (t, to)
        if key not in casts:
            src = current(t)
            out = unique(f"{t}/to_fp16" if to == FLOAT16 else f"{t}/to_fp32")
            nodes.append(helper.make_node("Cast", [src], [out], to=to, name=out))
            origin.append(at)
            new_value_info.append(_value_info_like(shapes.get(t), out, to))
            casts[key] = out
            if to == FLOAT16:
                fp16.add(out)
        return casts[key]

    def as_half(t: str, at: int) -> str:
        if current(t) in fp16:
            return current(t)
        if t in inits:
            name = f"{t}/fp16"
            if name not in new_inits:
                arr = numpy_helper.to_array(inits[t]).astype(np.float32, copy=False)
                new_inits[name] = numpy_helper.from_array(fp16_weight(arr).astype(np.float16), name)
            return name
        return cast(t, FLOAT16, at)

    def as_float(t: str, at: int) -> str:
        return cast(t, FLOAT, at) if current(t) in fp16 else current(t)

    for v, node in zip(views, g.node):
        new = helper.make_node(node.op_type, [], [], name=node.name, domain=node.domain)
        new.attribute.extend(node.attribute)
        if node.doc_string:
            new.doc_string = node.doc_string
        is_half = v.name in half
        pinned_in = FLOAT32_INPUTS.get(v.op_type, ())
        shape_only = SHAPE_ONLY_INPUTS.get(v.op_type, ())
        ins = []
        for j, t in enumerate(node.input):
            if not t:
                ins.append(t)
            elif j in shape_only:
                ins.append(current(t))
            elif is_half and types.get(t) == FLOAT and j not in pinned_in:
                ins.append(as_half(t, v.index))
            else:
                ins.append(as_float(t, v.index))
        new.input.extend(ins)
        outs = []
        pinned_out = FLOAT32_OUTPUTS.get(v.op_type, ())
        for k, o in enumerate(node.output):
            if is_half and o in v.float_outputs and k not in pinned_out:
                name = renamed.get(o, o)
                fp16.add(name)
                outs.append(name)
            else:
                outs.append(o)
        new.output.extend(outs)
        if is_half:
            _half_attributes(new, helper, numpy_helper)
        nodes.append(new)
        origin.append(v.index)
        for o in node.output:
            if o in renamed:                     # the graph output keeps its name and float32 type
                nodes.append(helper.make_node("Cast", [renamed[o]], [o], to=FLOAT, name=unique(f"{o}/to_fp32")))
                origin.append(v.index)
                new_value_info.append(_value_info_like(shapes.get(o), renamed[o], FLOAT16))

    referenced = {t for n in nodes for t in n.input}
    initializers = [init for init in g.initializer if init.name in referenced] + \
                   [init for name, init in new_inits.items() if name in referenced]
    value_info = []
    for vi in g.value_info:
        if vi.name in fp16:
            vi = _value_info_like(vi, vi.name, FLOAT16)
        value_info.append(vi)
    graph = helper.make_graph(nodes, g.name, list(g.input), list(g.output), initializer=initializers,
                              value_info=value_info + [vi for vi in new_value_info if vi is not None])
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name,
                            producer_version=model.producer_version)
    out.ir_version = model.ir_version
    for p in model.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    n_casts = sum(1 for n, i in zip(nodes, origin) if n.op_type == "Cast") - sum(1 for n in g.node if n.op_type == "Cast")
    return MixedGraph(out, {}, set(half), origin, fp16, renamed, n_casts)


def _half_attributes(node: Any, helper: Any, numpy_helper: Any) -> None:
    """Attributes that fix a float output type, rewritten for an fp16 node."""
    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to" and a.i == FLOAT:
                a.i = FLOAT16
    elif node.op_type == "ConstantOfShape":
        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is None:
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        elif value.t.data_type == FLOAT:
            arr = fp16_weight(numpy_helper.to_array(value.t)).astype(np.float16)
            value.t.CopyFrom(numpy_helper.from_array(arr, value.t.name))


def _value_info_like(vi: Any, name: str, elem_type: int) -> Any:
    """A value_info for `name` with `vi`'s shape (when known) and `elem_type`."""
    from onnx import ValueInfoProto

    out = ValueInfoProto()
    if vi is not None:
        out.CopyFrom(vi)
    out.name = name
    out.type.tensor_type.elem_type = elem_type
    return out


def float_io_preserved(original: Any, mixed: Any) -> list[str]:
    """Graph inputs/outputs whose name or dtype differ between the two graphs (must be none)."""
    problems = []
    for kind in ("input", "output"):
        a = [(v.name, v.type.tensor_type.elem_type) for v in getattr(original.graph, kind)]
        b = [(v.name, v.type.tensor_type.elem_type) for v in getattr(mixed.graph, kind)]
        if a != b:
            problems.append(f"graph {kind}s {a} became {b}")
    return problems


def precision_summary(mixed: MixedGraph) -> Mapping[str, int]:
    """Counts for logs and the manifest: fp16 nodes, fp32 island nodes, Casts added."""
    return {"fp16_nodes": mixed.fp16_count, "fp32_nodes": len(mixed.fp32_nodes), "casts_added": mixed.casts}
