"""FP16 emulation of an exported ONNX graph, runnable in ONNX Runtime on a CPU.

Why emulate on the ONNX graph rather than the PyTorch module: the precision policy addresses TensorRT
layers, which the ONNX parser names after the ONNX nodes (`<module path>/<torch op>/<ONNX op>`). Emulating
node by node measures exactly the units a policy rule can pin to fp32, in the graph TensorRT compiles,
and needs no fp16 CPU kernels (PyTorch has few on CPU). The eager model and this graph agree to ~1e-5
(export.verify), so the float32 run here is the eager reference within that.

The model of TensorRT FP16 (stated assumptions, not measured here):
- a node not kept in fp32 computes in float32 from fp16-rounded inputs and stores its float outputs in
  fp16: every float input of such a node is rounded to fp16 (round to nearest even; overflow -> inf) and
  so is each float output. Real kernels keep fp32 accumulators for matrix products and reductions, as this
  does; elementwise kernels that compute in fp16 round once per op, which a float32 op followed by one
  rounding reproduces (fp32 has more than twice fp16's precision). TensorRT's fusions skip some
  intermediate roundings, so the emulation is, if anything, pessimistic.
- weights (initializers) used by fp16 nodes are converted as TensorRT does it: clipped to ±65504, then
  rounded (subnormals kept).
- a node kept in fp32 (the policy) takes its inputs as they come (an fp16 producer's output is already
  rounded, as TensorRT's reformat from fp16 to fp32 is exact) and its outputs stay float32.
- nodes without a float output, Constant and Shape nodes are never rounded (the same filter as
  engines.precision.forceable).

Two forms are built:
- the *emulated* model: the graph with Cast(fp16)->Cast(fp32) pairs inserted, same inputs, outputs and
  metadata, so the runtime can run it in place of the original (end-to-end effect of a policy);
- the *probe* model: the float32 graph and its emulated copy side by side on the same inputs, plus per
  float tensor a small statistics vector computed in-graph (`PROBE_FIELDS`), so one run reports every
  layer without materializing thousands of activations.
The emulated models must run with graph optimizations disabled: a fusion would remove rounding points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from engines.precision import LayerInfo, PrecisionPolicy, forceable, select_fp32_layers

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
EMU = "emu::"                      # prefix of the emulated copy's node and tensor names in a probe model
STATS = "stats::"                  # prefix of the probe's statistics outputs
STATS_INT = "stats::int::"         # ... of an integer tensor computed from floats: [mismatches, size]
#: the statistics vector of one float tensor in a probe model, in this order
PROBE_FIELDS = ("ref_amax", "ref_nonfinite", "raw_amax", "raw_nonfinite", "emu_nonfinite", "err_max",
                "flushed", "size")

#: ONNX op type -> the TensorRT LayerType its parser produces (the main layer; approximate, used only to
#: apply `types` filters of a precision policy to ONNX nodes). Unlisted ops map to their upper-cased name.
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
}

_DTYPE_NAMES = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8", 2: "UINT8",
                11: "DOUBLE"}


class EmulationError(ValueError):
    """The graph has a form the emulation does not handle (named in the message)."""


@dataclass(frozen=True)
class NodeView:
    """One ONNX node as the analysis sees it: position, tensors, and the LayerInfo a policy matches."""

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
    """Every node with its LayerInfo; output types come from the graph's value_info (run ONNX shape
    inference first if the exporter did not write them: an output of unknown type is not float)."""
    from onnx import TensorProto

    types = tensor_types(model)
    views = []
    for i, node in enumerate(model.graph.node):
        if any(a.type in (5, 10) for a in node.attribute):        # GRAPH / GRAPHS attributes: If, Loop, Scan
            raise EmulationError(f"node {node.name or i} ({node.op_type}) has a subgraph; control flow is not "
                                 "emulated (the exported IndexTTS2 graphs have none)")
        outs = tuple(node.output)
        dtypes = tuple(_DTYPE_NAMES.get(types.get(o, 0), "NONE") for o in outs if o)
        floats = tuple(o for o in outs if o and types.get(o) == TensorProto.FLOAT)
        name = node.name or f"{node.op_type}_{i}"
        layer = LayerInfo(name, ONNX_TO_TRT_LAYER.get(node.op_type, node.op_type.upper()), dtypes)
        views.append(NodeView(i, name, node.op_type, tuple(node.input), outs, floats, layer))
    return views


def policy_fp32(graph: str, views: Sequence[NodeView], policy: PrecisionPolicy | None) -> dict[str, str]:
    """node name -> reason, for the nodes `policy` keeps in fp32 (none without a policy)."""
    if policy is None:
        return {}
    return dict(select_fp32_layers(graph, [v.layer for v in views], policy))


def fp16_nodes(views: Sequence[NodeView], fp32: Iterable[str]) -> set[str]:
    """Names of the nodes that compute in fp16 under the given fp32 set."""
    keep = set(fp32)
    return {v.name for v in views if forceable(v.layer) and v.float_outputs and v.name not in keep}


def fp16_weight(values: np.ndarray) -> np.ndarray:
    """A float32 weight as TensorRT stores it for an fp16 layer: clipped to ±65504, rounded to fp16."""
    return np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Building the models


class _Builder:
    """Appends the emulated copy of a graph (and optionally its statistics) to a node list."""

    def __init__(self, model: Any, views: Sequence[NodeView], half: set[str], prefix: str) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.TP, self.nh = helper, TensorProto, numpy_helper
        self.model, self.views, self.half, self.prefix = model, views, half, prefix
        g = model.graph
        self.graph_inputs = {i.name for i in g.input}
        self.inits = {init.name: init for init in g.initializer}
        self.types = tensor_types(model)
        self.producer_half: dict[str, bool] = {}        # tensor -> produced by an fp16 node (already rounded)
        self.nodes: list[Any] = []
        self.new_inits: list[Any] = []
        self._rounded: dict[str, str] = {}
        self._n = 0

    def uid(self, stem: str) -> str:
        self._n += 1
        return f"{self.prefix}{stem}#{self._n}"

    def emu_name(self, tensor: str) -> str:
        """The emulated copy's name of a tensor (graph inputs and initializers are shared)."""
        if not tensor or tensor in self.graph_inputs or tensor in self.inits:
            return tensor
        return self.prefix + tensor

    def is_float(self, tensor: str) -> bool:
        return self.types.get(tensor) == self.TP.FLOAT

    def round_pair(self, src: str, dst: str, stem: str) -> None:
        h = self.helper
        mid = self.uid(stem + "/h")
        self.nodes.append(h.make_node("Cast", [src], [mid], to=self.TP.FLOAT16, name=self.uid(stem + "/to16")))
        self.nodes.append(h.make_node("Cast", [mid], [dst], to=self.TP.FLOAT, name=self.uid(stem + "/to32")))

    def rounded_input(self, tensor: str) -> str:
        """The fp16-rounded form of `tensor` as an fp16 node's input (created once per tensor)."""
        if not tensor or not self.is_float(tensor) or self.producer_half.get(tensor, False):
            return self.emu_name(tensor)
        if tensor in self._rounded:
            return self._rounded[tensor]
        if tensor in self.inits:
            arr = self.nh.to_array(self.inits[tensor]).astype(np.float32, copy=False)
            name = self.uid(tensor + "/fp16w")
            self.new_inits.append(self.nh.from_array(fp16_weight(arr), name))
        else:
            name = self.uid(tensor + "/fp16in")
            self.round_pair(self.emu_name(tensor), name, tensor)
        self._rounded[tensor] = name
        return name

    def copy_nodes(self) -> dict[str, str]:
        """Append the emulated nodes; -> {original float tensor: its raw (pre-rounding) emulated name}."""
        raw_names: dict[str, str] = {}
        self.segments: list[tuple[int, int]] = []        # per view: its slice of self.nodes
        for view, node in zip(self.views, self.model.graph.node):
            start = len(self.nodes)
            half = view.name in self.half
            new = self.helper.make_node(node.op_type, [], [], name=self.prefix + view.name, domain=node.domain)
            new.attribute.extend(node.attribute)
            new.input.extend(self.rounded_input(t) if half else self.emu_name(t) for t in node.input)
            outs = []
            for o in node.output:
                if half and o in view.float_outputs:
                    raw = self.uid(o + "/raw")
                    outs.append(raw)
                    raw_names[o] = raw
                else:
                    outs.append(self.emu_name(o))
                    if o in view.float_outputs:
                        raw_names[o] = self.emu_name(o)
            new.output.extend(outs)
            self.nodes.append(new)
            for o in node.output:
                if half and o in view.float_outputs:
                    self.round_pair(raw_names[o], self.emu_name(o), o)
                if o:
                    self.producer_half[o] = half and o in view.float_outputs
            self.segments.append((start, len(self.nodes)))
        return raw_names


def emulated_model(model: Any, views: Sequence[NodeView], half: set[str]) -> Any:
    """The graph computing as TensorRT FP16 would with the nodes in `half` in fp16 (module docstring):
    same inputs, outputs, opset and metadata; run it with graph optimizations disabled."""
    from onnx import helper

    b = _Builder(model, views, half, prefix="")
    b.copy_nodes()
    g = model.graph
    graph = helper.make_graph(b.nodes, g.name, list(g.input), list(g.output),
                              initializer=list(g.initializer) + b.new_inits, value_info=list(g.value_info))
    return _model_like(model, graph)


def probe_model(model: Any, views: Sequence[NodeView], half: set[str]) -> tuple[Any, list[str]]:
    """The float32 graph + its emulated copy + one statistics vector (PROBE_FIELDS) per float tensor.

    -> (model, tensors): output `stats::<tensor>` holds the vector of `tensor`; integer tensors computed
    from floats are listed as `stats::int::<tensor>` ([values differing from float32, size]); the original
    outputs keep their names (float32 reference) and the emulated ones are `emu::<name>`."""
    from onnx import TensorProto, helper, numpy_helper

    b = _Builder(model, views, half, prefix=EMU)
    raw = b.copy_nodes()
    g = model.graph
    zero = numpy_helper.from_array(np.zeros(1, np.float32), STATS + "zero")
    flat = numpy_helper.from_array(np.array([-1], np.int64), STATS + "flat")
    nodes: list[Any] = []          # the statistics nodes of the view being processed
    outputs = list(g.output) + [helper.make_tensor_value_info(EMU + o.name, o.type.tensor_type.elem_type, None)
                                for o in g.output]
    n = [0]

    def mk(op: str, inputs: list[str], **attrs: Any) -> str:
        n[0] += 1
        out = f"{STATS}{op}#{n[0]}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def finite_amax_and_bad(x: str) -> tuple[str, str]:
        a = mk("Abs", [mk("Reshape", [x, flat.name])])
        bad = mk("Or", [mk("IsNaN", [a]), mk("IsInf", [a])])
        clean = mk("Where", [bad, zero.name, a])
        amax = mk("ReduceMax", [mk("Concat", [clean, zero.name], axis=0)], keepdims=1)
        count = mk("ReduceSum", [mk("Concat", [mk("Cast", [bad], to=TensorProto.FLOAT), zero.name], axis=0)],
                   keepdims=1)
        return amax, count

    tensors = []
    ordered: list[Any] = []
    for view, node, (start, end) in zip(views, g.node, b.segments):
        # node order = execution order in ONNX Runtime: each reference node, its emulated copy, then the
        # statistics of its outputs, so every activation is released as soon as it was measured (with the
        # statistics at the end, all activations of both copies would stay alive: tens of GB at full size)
        nodes.clear()
        for t in view.float_outputs:
            ref, emu, pre = t, b.emu_name(t), raw[t]
            ref_amax, ref_bad = finite_amax_and_bad(ref)
            raw_amax, raw_bad = finite_amax_and_bad(pre)
            _, emu_bad = finite_amax_and_bad(emu)
            err_max, _ = finite_amax_and_bad(mk("Sub", [emu, ref]))
            if pre != emu:
                flushed_b = mk("And", [mk("Not", [mk("Equal", [pre, zero.name])]), mk("Equal", [emu, zero.name])])
                flushed = mk("ReduceSum", [mk("Concat", [mk("Reshape", [mk("Cast", [flushed_b], to=TensorProto.FLOAT),
                                                                        flat.name]), zero.name], axis=0)], keepdims=1)
            else:
                flushed = zero.name
            size = mk("Cast", [mk("Size", [ref])], to=TensorProto.FLOAT)
            size = mk("Reshape", [size, flat.name])
            vec = f"{STATS}{t}"
            nodes.append(helper.make_node("Concat", [ref_amax, ref_bad, raw_amax, raw_bad, emu_bad, err_max, flushed,
                                                     size], [vec], axis=0, name=vec))
            outputs.append(helper.make_tensor_value_info(vec, TensorProto.FLOAT, [len(PROBE_FIELDS)]))
            tensors.append(t)
        for t in integer_from_float(view, b.types):     # integers computed from floats: indices, argmax
            diff = mk("Cast", [mk("Not", [mk("Equal", [t, b.emu_name(t)])])], to=TensorProto.FLOAT)
            count = mk("ReduceSum", [mk("Concat", [mk("Reshape", [diff, flat.name]), zero.name], axis=0)], keepdims=1)
            size = mk("Reshape", [mk("Cast", [mk("Size", [t])], to=TensorProto.FLOAT), flat.name])
            vec = f"{STATS_INT}{t}"
            nodes.append(helper.make_node("Concat", [count, size], [vec], axis=0, name=vec))
            outputs.append(helper.make_tensor_value_info(vec, TensorProto.FLOAT, [2]))
            tensors.append(STATS_INT + t)
        ordered += [node, *b.nodes[start:end], *nodes]
    graph = helper.make_graph(ordered, g.name, list(g.input), outputs,
                              initializer=list(g.initializer) + b.new_inits + [zero, flat],
                              value_info=list(g.value_info))
    return _model_like(model, graph), tensors


def integer_from_float(view: NodeView, types: Mapping[str, int]) -> list[str]:
    """Integer outputs of a node that reads a float input (Cast to int, ArgMax, TopK indices, ...): where
    fp16 changes which index is taken, e.g. the length regulator's floor(dst * T_in / T_out)."""
    if not any(types.get(t) == 1 for t in view.inputs if t):
        return []
    return [o for o in view.outputs if o and types.get(o) in (6, 7)]


def _model_like(model: Any, graph: Any) -> Any:
    from onnx import helper

    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="indextts2-calibration")
    out.ir_version = model.ir_version
    for p in model.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    return out


# ---------------------------------------------------------------------------------------------------
# Saving and running


TWO_GIB = 2 ** 31 - 1024


def save_model(model: Any, path: Path) -> Path:
    """Write `model` (external data beside it when it is too large for one protobuf)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(init.ByteSize() for init in model.graph.initializer) > TWO_GIB // 2
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def session(model_or_path: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with graph optimizations disabled (fusions would drop rounding points)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    # run the nodes in the order they are listed (probe_model interleaves reference, emulation and
    # statistics): ONNX Runtime's default order walks back from the outputs and would compute the whole
    # reference graph before the first statistic, keeping every activation alive
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        so.intra_op_num_threads = int(threads)
    src = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_probe(sess: Any, tensors: Sequence[str], feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                                       dict[str, np.ndarray]]:
    """One probe run -> ({tensor: stats vector}, {output name: array} with the reference and `emu::` outputs)."""
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    values = sess.run(None, {k: v for k, v in feed.items() if k in inputs})
    by_name = dict(zip(names, values))
    stats = {t: by_name.pop(t if t.startswith(STATS_INT) else STATS + t) for t in tensors}
    return stats, by_name
