"""FP16 emulation of the mixed-precision ONNX graph the engines are built from, runnable on a CPU.

Why emulate, and why on that graph: the shipped fp16 graph (engines/mixed_precision.py: fp16 tensors, the
precision policy's fp32 islands, explicit Casts) is what TensorRT and ONNX Runtime CUDA compute. ONNX
Runtime's CPU provider runs it too, but computes its fp16 nodes in float32 without rounding their inputs
and outputs (it has no fp16 kernels for most ops, inserts Casts to fp32 and drops the rounding Cast pairs
around them), so a plain CPU run hides the activation rounding. The emulation is derived from the mixed
graph itself, mechanically: every fp16 tensor becomes a float32 tensor holding fp16 values, i.e.
- an fp16 initializer becomes a float32 initializer with the same (fp16-exact) values;
- a node producing fp16 computes in float32 and its result passes through Cast(fp16) -> Cast(fp32)
  (ONNX Runtime keeps explicit Cast pairs; measured), a Cast to fp16 is followed by a Cast back;
- everything else is unchanged.
So whatever the mixed-precision pass does (which nodes, which inputs stay fp32, the Casts at the borders)
is exactly what is emulated: the analysis runs on the graph that ships under the policy being analysed.

The model of TensorRT FP16 this gives (stated assumptions, not measured here): an fp16 node computes in
float32 from fp16 inputs and rounds its outputs to fp16 (round to nearest even; overflow -> inf). Real
kernels keep fp32 accumulators for matrix products and reductions, as this does; elementwise kernels that
compute in fp16 round once per op, which a float32 op followed by one rounding reproduces (fp32 has more
than twice fp16's precision). TensorRT's fusions skip some intermediate roundings, so the emulation is, if
anything, pessimistic. Weights of fp16 nodes are clipped to ±65504 and rounded (the pass does it).

Two forms are built:
- the *emulated* model: same inputs, outputs and metadata as the float32 graph, so the runtime can run it
  in place of the original (end-to-end effect of a policy);
- the *probe* model: the float32 graph and the emulated copy side by side on the same inputs, plus per
  float tensor a small statistics vector computed in-graph (`PROBE_FIELDS`), so one run reports every
  layer without materializing thousands of activations. "raw" is an fp16 node's float32 result before its
  rounding.
The emulated models must run with graph optimizations disabled: a fusion would remove rounding points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engines.mixed_precision import (FLOAT, FLOAT16, FP16_MAX, MixedGraph,
                                     NodeView, fp16_nodes, fp16_weight, mixed_precision_model, node_views,
                                     policy_fp32, tensor_types)

log = logging.getLogger(__name__)

EMU = "emu::"                      # prefix of the emulated copy's node and tensor names in a probe model
STATS = "stats::"                  # prefix of the probe's statistics outputs
STATS_INT = "stats::int::"         # ... of an integer tensor computed from floats: [mismatches, size]
#: the statistics vector of one float tensor in a probe model, in this order
PROBE_FIELDS = ("ref_amax", "ref_nonfinite", "raw_amax", "raw_nonfinite", "emu_nonfinite", "err_max",
                "flushed", "size")

__all__ = ["EMU", "STATS", "STATS_INT", "PROBE_FIELDS", "FP16_MAX",
           "NodeView", "Emulation", "upcast", "emulate_form", "emulated_model", "probe_model", "node_views", "fp16_nodes",
           "fp16_weight", "policy_fp32", "tensor_types", "integer_from_float", "save_model", "session", "run_probe"]


# ---------------------------------------------------------------------------------------------------
# The emulation of a mixed-precision graph


@dataclass
class Emulation:
    """The float32 nodes emulating a mixed-precision graph.

    `origin[k]`: the original (float32 graph) node index node k belongs to; `raw`: tensor of the mixed graph
    -> the name of its float32 value before the fp16 rounding (only tensors produced in fp16);
    `initializers`: the mixed graph's initializers, fp16 ones as float32 with the same values."""

    nodes: list[Any]
    origin: list[int]
    initializers: list[Any]
    raw: dict[str, str] = field(default_factory=dict)
    value_info: list[Any] = field(default_factory=list)
    prefix: str = ""
    keep: frozenset[str] = frozenset()

    def name(self, tensor: str) -> str:
        """The emulation's name of a mixed-graph tensor (graph inputs and initializers are not prefixed)."""
        if not tensor or not self.prefix or tensor in self.keep:
            return tensor
        return self.prefix + tensor


def upcast(mixed: MixedGraph, prefix: str = "") -> Emulation:
    """Every fp16 tensor of `mixed` as a float32 tensor holding fp16 values (module docstring). With a
    `prefix`, node names and every tensor name except graph inputs and initializers get it."""
    from onnx import helper, numpy_helper

    g = mixed.model.graph
    types = tensor_types(mixed.model)
    inits = []
    for init in g.initializer:
        if init.data_type == FLOAT16:
            init = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name)
        inits.append(init)
    keep = frozenset({i.name for i in g.input} | {i.name for i in g.initializer})
    emu = Emulation([], [], inits, prefix=prefix, keep=keep)
    P = emu.name

    def pair(src: str, dst: str, at: int) -> None:
        mid = P(dst + "/h")
        emu.nodes.append(helper.make_node("Cast", [src], [mid], to=FLOAT16, name=P(dst + "/round16")))
        emu.nodes.append(helper.make_node("Cast", [mid], [P(dst)], to=FLOAT, name=P(dst + "/back32")))
        emu.origin += [at, at]

    for node, at in zip(g.node, mixed.origin):
        half_out = [o for o in node.output if o and types.get(o) == FLOAT16]
        new = helper.make_node(node.op_type, [P(t) for t in node.input], [], name=P(node.name), domain=node.domain)
        for a in node.attribute:
            a2 = new.attribute.add()
            a2.CopyFrom(a)
            if node.op_type == "Cast" and a2.name == "to" and a2.i == FLOAT16:
                a2.i = FLOAT
            if node.op_type == "ConstantOfShape" and a2.name == "value" and a2.t.data_type == FLOAT16:
                a2.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a2.t).astype(np.float32), a2.t.name))
        if node.op_type == "Cast" and half_out:
            # a Cast to fp16 (a border, or a converted Cast): its float32 result, then the rounding pair
            new.output.extend([P(half_out[0] + "/raw")])
            emu.raw[half_out[0]] = P(node.input[0]) if types.get(node.input[0]) == FLOAT else P(half_out[0] + "/raw")
        else:
            new.output.extend(P(o + "/raw") if o in half_out else P(o) for o in node.output)
            for o in half_out:
                emu.raw[o] = P(o + "/raw")
        emu.nodes.append(new)
        emu.origin.append(at)
        for o in half_out:
            pair(P(o + "/raw"), o, at)
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == FLOAT16:
            continue                                     # the float32 copies get their types from inference
        out = type(vi)()
        out.CopyFrom(vi)
        out.name = P(vi.name)
        emu.value_info.append(out)
    return emu


def emulate_form(mixed_model: Any) -> Any:
    """The emulation of a mixed-precision graph as it is (e.g. a shipped `onnx/fp16/<graph>.onnx` file):
    same inputs and outputs; run it with graph optimizations disabled."""
    from onnx import helper

    types = tensor_types(mixed_model)
    fp16 = {t for t, k in types.items() if k == FLOAT16}
    mixed = MixedGraph(mixed_model, {}, set(), list(range(len(mixed_model.graph.node))), fp16)
    e = upcast(mixed)
    g = mixed_model.graph
    graph = helper.make_graph(e.nodes, g.name, list(g.input), list(g.output), initializer=e.initializers,
                              value_info=e.value_info)
    return _model_like(mixed_model, graph)


def emulated_model(model: Any, views: Sequence[NodeView], half: set[str]) -> Any:
    """The float32 graph computing as TensorRT FP16 would with the nodes in `half` in fp16: the emulation of
    the mixed-precision graph engines/mixed_precision.py makes from `model`; same inputs, outputs, opset and
    metadata; run it with graph optimizations disabled."""
    from onnx import helper

    e = upcast(mixed_precision_model(model, views, half))
    g = model.graph
    graph = helper.make_graph(e.nodes, g.name, list(g.input), list(g.output), initializer=e.initializers,
                              value_info=e.value_info)
    return _model_like(model, graph)


def probe_model(model: Any, views: Sequence[NodeView], half: set[str]) -> tuple[Any, list[str]]:
    """The float32 graph + the emulation of its mixed-precision form + one statistics vector
    (PROBE_FIELDS) per float tensor.

    -> (model, tensors): output `stats::<tensor>` holds the vector of `tensor`; integer tensors computed
    from floats are listed as `stats::int::<tensor>` ([values differing from float32, size]); the original
    outputs keep their names (float32 reference) and the emulated ones are `emu::<name>`."""
    from onnx import TensorProto, helper, numpy_helper

    mixed = mixed_precision_model(model, views, half)
    e = upcast(mixed, prefix=EMU)
    g = model.graph
    types = tensor_types(model)
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

    def emu_of(t: str) -> str:
        return EMU + t if t not in e.keep else t

    def raw_of(t: str) -> str:
        return e.raw.get(mixed.renamed.get(t, t), emu_of(t))

    by_origin: dict[int, list[Any]] = {}
    for node, at in zip(e.nodes, e.origin):
        by_origin.setdefault(at, []).append(node)
    tensors = []
    ordered: list[Any] = []
    for view, node in zip(views, g.node):
        # node order = execution order in ONNX Runtime: each reference node, its emulated copy, then the
        # statistics of its outputs, so every activation is released as soon as it was measured (with the
        # statistics at the end, all activations of both copies would stay alive: tens of GB at full size)
        nodes.clear()
        for t in view.float_outputs:
            ref, emu, pre = t, emu_of(t), raw_of(t)
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
        for t in integer_from_float(view, types):     # integers computed from floats: indices, argmax
            diff = mk("Cast", [mk("Not", [mk("Equal", [t, emu_of(t)])])], to=TensorProto.FLOAT)
            count = mk("ReduceSum", [mk("Concat", [mk("Reshape", [diff, flat.name]), zero.name], axis=0)], keepdims=1)
            size = mk("Reshape", [mk("Cast", [mk("Size", [t])], to=TensorProto.FLOAT), flat.name])
            vec = f"{STATS_INT}{t}"
            nodes.append(helper.make_node("Concat", [count, size], [vec], axis=0, name=vec))
            outputs.append(helper.make_tensor_value_info(vec, TensorProto.FLOAT, [2]))
            tensors.append(STATS_INT + t)
        ordered += [node, *by_origin.get(view.index, []), *nodes]
    known = {i.name for i in g.initializer}
    initializers = list(g.initializer) + [i for i in e.initializers if i.name not in known] + [zero, flat]
    graph = helper.make_graph(ordered, g.name, list(g.input), outputs, initializer=initializers,
                              value_info=list(g.value_info) + e.value_info)
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




def save_model(model: Any, path: Path) -> Path:
    """Write `model` (external data beside it when one protobuf cannot hold it): the export's own writer."""
    from export.precision_forms import save

    save(model, path)
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
