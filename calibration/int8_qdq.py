"""INT8 as explicit quantization: an exported graph with QuantizeLinear/DequantizeLinear (Q/DQ) nodes from the
collected feeds, in the precision form strongly typed TensorRT builds (TensorRT 11 removed implicit INT8
calibration; "Use explicit quantization with Strong Typing", TensorRT docs, Explicit Quantization).

Per graph (torch-free: onnx, onnxruntime, numpy):

1. **What is quantized** (`quantizable_nodes`): MatMul, Gemm, Conv and ConvTranspose whose weight (input 1)
   is an initializer, unless the precision policy keeps them fp32. These weight GEMMs and convolutions
   hold nearly all the FLOPs and weight bytes, and they are what TensorRT runs as INT8 kernels (a DQ is
   fused into the layer it feeds). Not quantized: products of two activations (attention's QKᵀ and AV,
   CAMPPlus's context masks — per-tensor INT8 on softmax probabilities and masks costs accuracy for little
   time), elementwise ops (TensorRT would only fuse them into neighbouring INT8 kernels; quantizing them
   adds Q/DQ pairs and error; ONNX Runtime also gives scalar constants an `axis` TensorRT's parser
   rejects), and the policy's fp32 islands.
2. **Scales** from ONNX Runtime's static quantizer (`onnxruntime.quantization.quantize_static`, QDQ format)
   run over the graph's collected feeds (`FeedReader`: the feeds as recorded, one calibration step per feed,
   so the feeds may have different lengths). `ORT_OPTIONS` says why each option: INT8 weights and
   activations, symmetric (TensorRT's parser refuses a nonzero zero point: "TensorRT only supports
   symmetric quantization"), per-channel weights on the output-channel axis (Conv 0, ConvTranspose 1,
   MatMul 1 of its [K, N] weight, Gemm by transB — ONNX Runtime's defaults; TensorRT's parser checks the
   scale count against that axis), per-tensor activations (TensorRT: "Activations-quantization does not
   support per-axis quantization"), no bias quantization (an INT32 DequantizeLinear is not an INT8/FP8
   one TensorRT accepts), float weights kept with their own Q/DQ pair (TensorRT quantizes them at build
   time with the Q scale, "Quantized Weights" in the docs; this is also what NVIDIA ModelOpt asks ONNX
   Runtime for), no output quantization (the outputs feed fp16 nodes), one Q/DQ pair per reader.
   Calibration method (`METHODS`): MinMax by default, Entropy and Percentile on request (measured on the
   tiny demo: README "Calibration").
3. **Opset 19**: fp16 Q/DQ need it (opset 13's QuantizeLinear reads float32 only). Every operator whose
   definition changed from opset 18 to 19 only gained types or attributes whose defaults keep the opset-18
   behaviour (onnx's version converter registers a CompatibleAdapter for each), so the opset import is
   raised in place; onnx.version_converter would do the same but serializes the model, which fails past 2 GB.
4. **Mixed precision**: the precision policy's pass (engines/mixed_precision.py) makes everything that is not
   fp32 an fp16 tensor exactly as in the fp16 form; each Q/DQ pair takes the precision of the node it
   feeds, so a quantized fp16 MatMul reads `x16 -> Q(scale16) -> DQ(scale16) -> fp16` — the pattern
   TensorRT's parser turns into a Quantize layer on an fp16 tensor and a Dequantize layer whose output type
   is the scale's (fp16) type, with no Cast between DQ and the layer it is fused into. A scale below fp16's
   smallest subnormal (2^-24) is raised to it first, so no fp16 scale is 0 (TensorRT requires positive
   scales).
5. **Checks** (`form_problems`): zero points all 0 and INT8, scales positive and finite, weight scales one
   per output channel on that axis, activation scales per tensor, no island quantized, graph inputs and
   outputs unchanged, onnx.checker's full check.

The gate (calibration/gate.py) runs the result's FP16+INT8 emulation (calibration/fp16_emulation.py:
`emulate_form`) on the CPU; `python -m calibration int8` (calibration/int8_build.py) records it.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from engines.mixed_precision import (DEQUANTIZE, FP16_QDQ_OPSET, QUANTIZE, MixedGraph, float_io_preserved,
                                     node_views, policy_fp32, precision_summary, to_mixed_precision)
from engines.precision import PrecisionPolicy
from runtime.errors import ContractError, InputError

from .feeds import Feed, FeedStore

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
#: calibration methods: CLI name -> onnxruntime.quantization.CalibrationMethod member
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
DEFAULT_METHOD = "minmax"
INT8 = 3                                   # onnx.TensorProto.INT8
SCALE_FLOOR = 2.0 ** -24                   # fp16's smallest subnormal: no fp16 scale rounds to 0

#: quantize_static's extra_options (onnxruntime 1.32 docstring names), each for a TensorRT requirement
ORT_OPTIONS: dict[str, Any] = {
    "ActivationSymmetric": True,           # zero point 0: TensorRT's parser refuses any other
    "WeightSymmetric": True,
    "QuantizeBias": False,                 # an INT32 bias DQ is no INT8/FP8 Dequantize TensorRT accepts
    "AddQDQPairToWeight": True,            # float weights + Q/DQ: TensorRT quantizes them with the Q scale
    "DedicatedQDQPair": True,              # one pair per reader (as ModelOpt asks for TensorRT)
    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),   # outputs feed fp16 nodes, not INT8 ones
    "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1, "MatMul": 1},   # output channels
    "CalibStridedMinMax": 1,               # one calibration step per feed: feeds of different lengths
}


@dataclass(frozen=True)
class QdqSettings:
    method: str = DEFAULT_METHOD           # a key of METHODS
    max_feeds: int | None = None           # feeds per graph, spread over the set (None: all)
    percentile: float = 99.999             # for "percentile"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"calibration method {self.method!r}: expected one of {', '.join(METHODS)}")


@dataclass
class Int8Form:
    """One graph's INT8 form: the mixed graph (`mixed.model`), the nodes quantized, what it took."""

    graph: str
    mixed: MixedGraph
    quantized: list[str]
    islands: dict[str, str]
    feeds: int
    feeds_digest: str = ""
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# What to quantize, and the data


def quantizable_nodes(model: Any, graph: str, policy: PrecisionPolicy | None) -> tuple[list[str], dict[str, str]]:
    """(names of the weight GEMMs / convolutions to quantize, the policy's fp32 islands) of a float32 graph."""
    views = node_views(model)
    islands = policy_fp32(graph, views, policy)
    weights = {i.name for i in model.graph.initializer}
    chosen = [v.name for v in views if v.op_type in QUANTIZED_OPS and len(v.inputs) > 1
              and v.inputs[1] in weights and v.name not in islands]
    return chosen, islands


def _reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class FeedReader:
    """The collected feeds of one graph as ONNX Runtime's CalibrationDataReader (`get_next`, and `__len__` /
    `set_range` for one calibration step per feed). Made by `feed_reader` (onnxruntime imported lazily)."""

    def __init__(self, store: FeedStore, graph: str, inputs: Sequence[str], limit: int | None = None) -> None:
        self.store, self.graph, self.inputs = store, graph, list(inputs)
        self.records = store.records(graph, limit)
        if not self.records:
            raise InputError(f"no collected feeds for graph '{graph}' in {store.root}; run python -m calibration "
                             "collect first")
        self.start, self.end, self.at = 0, len(self.records), 0

    def __len__(self) -> int:
        return len(self.records)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.at = start_index, min(end_index, len(self.records)), start_index

    def get_next(self) -> Feed | None:
        if self.at >= self.end:
            return None
        feed = self.store.load(self.records[self.at])
        self.at += 1
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise InputError(f"calibration feed {self.records[self.at - 1].file} of '{self.graph}' has no input "
                             f"{missing} (it has {sorted(feed)}); collect again for this export")
        return {n: feed[n] for n in self.inputs}

    def digest(self) -> str:
        """Identity of the data: the feed files (name, size)."""
        h = hashlib.sha256()
        for r in self.records:
            path = self.store.root / r.file
            h.update(f"{r.file}:{path.stat().st_size if path.is_file() else -1};".encode())
        return h.hexdigest()


def feed_reader(store: FeedStore, graph: str, inputs: Sequence[str], limit: int | None = None) -> FeedReader:
    """A FeedReader that is also an onnxruntime.quantization.CalibrationDataReader."""
    reader = type("OrtFeedReader", (FeedReader, _reader_base()), {})
    return reader(store, graph, inputs, limit)


# ---------------------------------------------------------------------------------------------------
# Making the form


def quantize(path: Path, nodes: Sequence[str], reader: FeedReader, settings: QdqSettings, workdir: Path) -> Any:
    """The Q/DQ graph of the float32 graph at `path` (scales from `reader`), opset 19, every tensor typed."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = workdir / f"{path.stem}.qdq.onnx"
    big = any(init.data_location == onnx.TensorProto.EXTERNAL
              for init in onnx.load(str(path), load_external_data=False).graph.initializer)
    options = dict(ORT_OPTIONS)
    if settings.method == "percentile":
        options["CalibPercentile"] = settings.percentile
    with _without_preprocess_advice():
        quantize_static(str(path), str(out), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=list(nodes),
                        use_external_data_format=big, extra_options=options,
                        calibrate_method=getattr(CalibrationMethod, METHODS[settings.method]))
    typed = workdir / f"{path.stem}.qdq.typed.onnx"
    onnx.shape_inference.infer_shapes_path(str(out), str(typed))     # the new Q/DQ outputs get their types
    model = onnx.load(str(typed))
    to_opset_19(model)
    return model


class _PreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """quantize_static advises (on the root logger, twice per graph) to run its pre-processing first. Not done
    on purpose: it optimizes the graph (fusions, renamed nodes), and the policy's islands and the reports
    address the exported node names."""
    root = logging.getLogger()
    advice = _PreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def to_opset_19(model: Any) -> None:
    """Raise the default-domain opset of an opset-18 (or newer) graph to at least 19, in place (module
    docstring, step 3)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if imp.version < 18:
                raise ContractError(f"opset {imp.version}: INT8 forms are made from opset-18 graphs (as "
                                    "export.build writes them)")
            imp.version = max(imp.version, FP16_QDQ_OPSET)


def restore_float_readers(model: Any, quantized: set[str]) -> int:
    """Give every node that is not quantized its float input back, in place; -> readers rewired.

    ONNX Runtime's quantizer, when one quantized node reads a tensor, points *every* reader of that tensor at
    the DequantizeLinear output (and, for a graph output, renames the producer's output and makes the
    DequantizeLinear write the graph output), so fp32 islands and other float nodes would read fake-quantized
    values. Only the quantized nodes may read them."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name: o for o in g.output}
    weights = {i.name for i in g.initializer}
    rewired = 0
    for dq in [n for n in g.node if n.op_type == DEQUANTIZE]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != QUANTIZE or q.input[0] in weights:
            continue                                 # a weight's pair
        x, y = q.input[0], dq.output[0]
        if y in outputs:                             # give the graph output its float producer back
            y_dq = f"{y}/dequantized"
            dq.output[0] = y_dq
            typed = g.value_info.add()
            typed.CopyFrom(outputs[y])
            typed.name = y_dq
            for n in g.node:
                if n is not dq:
                    _rename(n, x, y)
                    if n.name in quantized:
                        _rename(n, y, y_dq, outputs=False)
            x, y = y, y_dq
        for n in g.node:
            if n.name not in quantized and n is not dq and y in n.input:
                _rename(n, y, x, outputs=False)
                rewired += 1
    return rewired


def _rename(node: Any, old: str, new: str, outputs: bool = True) -> None:
    for j, t in enumerate(node.input):
        if t == old:
            node.input[j] = new
    if outputs:
        for j, t in enumerate(node.output):
            if t == old:
                node.output[j] = new


def floor_scales(model: Any) -> int:
    """Raise every Q/DQ scale initializer below SCALE_FLOOR to it; -> how many values were raised."""
    from onnx import numpy_helper

    names = {n.input[1] for n in model.graph.node if n.op_type in (QUANTIZE, DEQUANTIZE)}
    raised = 0
    for init in model.graph.initializer:
        if init.name in names:
            values = numpy_helper.to_array(init)
            low = values < SCALE_FLOOR
            if low.any():
                raised += int(low.sum())
                init.CopyFrom(numpy_helper.from_array(np.maximum(values, SCALE_FLOOR).astype(values.dtype), init.name))
    return raised


def make_int8_form(path: Path, graph: str, store: FeedStore, policy: PrecisionPolicy,
                   settings: QdqSettings = QdqSettings()) -> Int8Form | None:
    """The INT8 form of the float32 graph at `path` (module docstring), or None when nothing in it is to be
    quantized. Raises ContractError listing every problem the checks find."""
    import onnx

    t0 = time.perf_counter()
    original = onnx.load(str(path))
    nodes, islands = quantizable_nodes(original, graph, policy)
    if not nodes:
        return None
    inputs = [i.name for i in original.graph.input]
    reader = feed_reader(store, graph, inputs, settings.max_feeds)
    with tempfile.TemporaryDirectory(prefix=f"int8-{graph}-") as tmp:
        qdq = quantize(path, nodes, reader, settings, Path(tmp))
    rewired = restore_float_readers(qdq, set(nodes))
    if rewired:
        log.info("%s: %d reader(s) of quantized tensors that are not quantized read the float tensor again", graph,
                 rewired)
    raised = floor_scales(qdq)
    if raised:
        log.info("%s: %d scale value(s) raised to %g (fp16's smallest subnormal)", graph, raised, SCALE_FLOOR)
    del qdq.metadata_props[:]                        # the float32 graph's identity, not the quantizer's marker
    for p in original.metadata_props:
        qdq.metadata_props.add(key=p.key, value=p.value)
    mixed = to_mixed_precision(qdq, graph, policy)
    problems = form_problems(original, mixed.model, nodes, islands)
    if problems:
        raise ContractError(f"graph '{graph}': the INT8 form fails its checks: " + "; ".join(problems))
    quantized = [n for n in nodes if n in _dq_readers(mixed.model)]
    form = Int8Form(graph, mixed, quantized, islands, len(reader), reader.digest(), time.perf_counter() - t0)
    form.counts = dict(int8_summary(form))
    return form


def int8_summary(form: Int8Form) -> Mapping[str, int]:
    """Counts for logs and the manifest: the mixed-precision pass's, plus the quantized nodes and Q/DQ nodes."""
    ops = [n.op_type for n in form.mixed.model.graph.node]
    return {**precision_summary(form.mixed), "quantized_nodes": len(form.quantized),
            "quantize_linear": ops.count(QUANTIZE), "dequantize_linear": ops.count(DEQUANTIZE)}


# ---------------------------------------------------------------------------------------------------
# Checks


def _dq_readers(model: Any) -> set[str]:
    """Names of the nodes reading a DequantizeLinear output."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == DEQUANTIZE}
    return {n.name for n in model.graph.node if n.op_type != QUANTIZE and any(t in dq_out for t in n.input)}


def output_channel_axis(node: Any, weight_shape: Sequence[int]) -> int:
    """The axis of a weight that indexes the node's output channels (TensorRT's per-channel axis)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return len(weight_shape) - 1                    # MatMul: [..., K, N]


def form_problems(original: Any, model: Any, quantized: Sequence[str], islands: Mapping[str, str]) -> list[str]:
    """Every way `model` (an INT8 form of `original`) breaks what TensorRT needs or what the form promises."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes = list(g.node)
    readers: dict[str, list[Any]] = {}
    for n in nodes:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    problems = list(float_io_preserved(original, model))
    for a, b in zip(original.graph.output, g.output):
        ra, rb = len(a.type.tensor_type.shape.dim), len(b.type.tensor_type.shape.dim)
        if ra != rb:
            problems.append(f"output {a.name}: rank {ra} became {rb}")
    for n in (n for n in nodes if n.op_type in (QUANTIZE, DEQUANTIZE)):
        scale = inits.get(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: its scale is not an initializer")
            continue
        s = numpy_helper.to_array(scale).astype(np.float64)
        if not (np.all(np.isfinite(s)) and np.all(s > 0)):
            problems.append(f"{n.name}: scales must be positive and finite (min {s.min():g})")
        zero = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zero is None or zero.data_type != INT8 or np.any(numpy_helper.to_array(zero) != 0):
            problems.append(f"{n.name}: the zero point must be an INT8 zero (TensorRT: symmetric quantization)")
        if n.op_type == QUANTIZE:
            problems += _axis_problems(n, s, inits, readers)
    for name in sorted(_dq_readers(model) - set(quantized)):
        what = "an fp32 island of the precision policy" if name in islands else "a node not chosen for INT8"
        problems.append(f"{name}: {what} reads a DequantizeLinear output")
    if any(producer.op_type == DEQUANTIZE for producer in nodes for o in producer.output if o in outputs):
        problems.append("a graph output is written by a DequantizeLinear")
    missing = sorted(set(quantized) - _dq_readers(model))
    if missing:
        problems.append(f"{len(missing)} node(s) chosen for INT8 got no Q/DQ input, e.g. {missing[0]}")
    return problems


def _axis_problems(q: Any, scale: np.ndarray, inits: Mapping[str, Any], readers: Mapping[str, list]) -> list[str]:
    """A weight's Q: one scale per output channel on the output-channel axis; an activation's: one scale."""
    axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
    weight = inits.get(q.input[0])
    if weight is None:
        return [] if scale.size == 1 else [f"{q.name}: an activation must be quantized per tensor "
                                           f"({scale.size} scales)"]
    shape = list(weight.dims)
    dq = [r for o in q.output for r in readers.get(o, []) if r.op_type == DEQUANTIZE]
    users = [u for d in dq for o in d.output for u in readers.get(o, [])]
    out = []
    for u in users:
        want = output_channel_axis(u, shape)
        if scale.size != shape[want] or axis % len(shape) != want:
            out.append(f"{q.name}: weight scales must be one per output channel of {u.name} (axis {want}, "
                       f"{shape[want]} scales), got axis {axis} with {scale.size}")
    return out


def form_recipe(policy_sha256: str, settings: QdqSettings, feeds_digest: str) -> str:
    """What an INT8 form is made with besides its float32 file: policy, method, feeds and this code."""
    import engines.mixed_precision as mp

    code = hashlib.sha256(Path(mp.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()
    parts = f"{policy_sha256}:{settings.method}:{settings.max_feeds}:{settings.percentile}:{feeds_digest}:{code}"
    return hashlib.sha256(parts.encode()).hexdigest()
