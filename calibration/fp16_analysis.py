"""`analyze`, per graph: where FP16 breaks, layer by layer, and which layers the policy must keep in fp32.

For each graph the probe model (calibration/fp16_emulation.py) runs on the collected feeds in rounds:

1. `all fp16`  — no islands at all: shows what FP16 alone does to this graph;
2. `base`      — the islands of the base policy (the shipped engines/policy_default.json unless told
                 otherwise): what the engines would get without calibration;
3. `measured`  — base plus the layers flagged so far; repeated until a round flags nothing new (a forced
                 layer can expose the next one: an fp32 division still fails if its input was rounded to
                 zero upstream) or `max_rounds` is reached.

Per float tensor and feed the probe reports the max |activation| of the float32 run and of the emulated
run before rounding, non-finite counts, the max error against float32 and the values rounding flushed to
zero. Per layer (ONNX node = TensorRT layer) this gives:
- `amax`: max |activation| over the feeds (the overflow risk: FP16 stops at 65504);
- `rel_err`: max |emulated − float32| / max |float32| of its output (accumulated up to this layer);
- `growth`: rel_err of the output minus the largest rel_err of its inputs — the error the layer itself
  contributes (rounding alone adds ~2^-11 ≈ 4.9e-4); 0 for ops that only move values (DATA_MOVEMENT);
- `first non-finite`: the layer where NaN/Inf first appears in a feed while its inputs are finite.

A layer is flagged (kept in fp32) when, over the calibration feeds:
- `overflow`:  it computes in fp16 and its output, or an fp16 layer's input it reads from an fp32 layer,
  exceeds 65504 / `headroom` (headroom 4 by default: unseen inputs may be larger than the calibration set's);
- `non-finite`: NaN/Inf first appears there (if it is already fp32, its fp16 producers are flagged: their
  rounded outputs are the cause);
- `index`:     an integer computed from floats downstream of it (a Cast to int, an ArgMax: frame indices,
  codebook choices) takes other values than in float32 — the nearest fp16 layers upstream are flagged;
  if that has not settled it after two rounds (a near-tie argmax sensitive to any upstream rounding), its
  whole fp16 input cone is;
- `constant`:  it reads a constant that FP16 flushes to zero or cannot hold (e.g. a 1e-9 guard);
- `error`:     its growth exceeds `error_growth` (default 0.03, ~60 roundings' worth) while its inputs are
  still sound (their error below that limit; a layer amplifying an already wrong input is a consequence,
  not a cause) — subtraction of near equal values, division by small ones, large exponents.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from engines.precision import PrecisionPolicy, PolicyRule

from .feeds import FeedStore
from .fp16_emulation import (EMU, FP16_MAX, PROBE_FIELDS, STATS_INT, NodeView, fp16_nodes, node_views, policy_fp32, probe_model,
                             run_probe, save_model, session)

log = logging.getLogger(__name__)

F = {name: i for i, name in enumerate(PROBE_FIELDS)}
FLAG_KINDS = ("non-finite", "index", "overflow", "constant", "error")
#: ops that only move or select values: they add no arithmetic error (a piece of a tensor has a smaller
#: max |x| than the whole, so its *relative* error looks larger without anything having been computed)
DATA_MOVEMENT = frozenset({"Split", "Slice", "Gather", "GatherElements", "GatherND", "Reshape", "Transpose",
                           "Concat", "Expand", "Squeeze", "Unsqueeze", "Flatten", "Pad", "Tile", "Identity",
                           "Where", "ScatterND", "ScatterElements"})


@dataclass(frozen=True)
class AnalysisLimits:
    headroom: float = 4.0            # flag layers whose max |activation| exceeds 65504 / headroom
    error_growth: float = 0.03       # flag layers adding more than this relative error
    max_rounds: int = 6              # measured rounds after `base`
    max_feeds: int = 6               # feeds per graph (spread over the set)
    threads: int | None = None


@dataclass
class LayerStats:
    """One float tensor's statistics over all feeds of a round (the tensor's producer = the layer)."""

    tensor: str
    node: str
    op_type: str
    fp32: bool
    ref_amax: float = 0.0
    raw_amax: float = 0.0
    ref_nonfinite: int = 0
    emu_nonfinite: int = 0
    err_max: float = 0.0
    rel_err: float = 0.0
    growth: float = 0.0
    input_err: float = 0.0            # the largest rel_err among its inputs
    flushed: int = 0
    size: int = 0
    first_nonfinite: int = 0          # feeds in which NaN/Inf first appeared here

    @property
    def amax(self) -> float:
        return max(self.ref_amax, self.raw_amax)


@dataclass(frozen=True)
class Flag:
    node: str
    kind: str
    value: float
    why: str
    tensor: str = ""          # index flags: the integer tensor whose values changed


@dataclass
class OutputEffect:
    name: str
    kind: str                 # "float" (rel_err, nonfinite) or "int" (agreement)
    rel_err: float = 0.0
    nonfinite: int = 0
    agreement: float = 1.0


@dataclass
class RoundResult:
    label: str
    fp32_layers: int
    fp16_layers: int
    outputs: list[OutputEffect]
    flags: list[Flag]
    layers: list[LayerStats]
    seconds: float

    @property
    def nonfinite_outputs(self) -> int:
        return sum(o.nonfinite for o in self.outputs)

    def worst_output_error(self) -> float:
        errs = [o.rel_err for o in self.outputs if o.kind == "float"]
        return max(errs) if errs else 0.0


@dataclass
class GraphAnalysis:
    graph: str
    feeds: int
    nodes: int
    rounds: list[RoundResult] = field(default_factory=list)
    measured: dict[str, Flag] = field(default_factory=dict)        # node -> the flag that forced it
    constants: list[Flag] = field(default_factory=list)

    @property
    def final(self) -> RoundResult:
        return self.rounds[-1]


# ---------------------------------------------------------------------------------------------------


def constant_flags(model: Any, views: Sequence[NodeView], half: set[str]) -> list[Flag]:
    """fp16 layers reading a small constant (a guard, a scale) that FP16 flushes to zero (all its nonzero
    values) or cannot hold (beyond 65504: TensorRT clips weights)."""
    from onnx import numpy_helper

    consts: dict[str, np.ndarray] = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    flags = []
    for v in views:
        if v.name not in half:
            continue
        for t in v.inputs:
            if t not in consts:
                continue
            proto = consts[t]
            if proto.data_type != 1 or math.prod(proto.dims) > 4096:       # float, small (guards, scales)
                continue
            arr = numpy_helper.to_array(proto).astype(np.float32)
            nz = arr[arr != 0]
            if nz.size and np.all(np.abs(nz) < 2.0 ** -25):       # below half the smallest fp16 subnormal
                flags.append(Flag(v.name, "constant", float(np.abs(nz).max()),
                                  f"reads constant {float(np.abs(nz).max()):.3g}, which fp16 flushes to zero"))
            elif np.any(np.abs(arr) > FP16_MAX):
                flags.append(Flag(v.name, "constant", float(np.abs(arr).max()),
                                  f"reads constant {float(np.abs(arr).max()):.4g}, beyond fp16's range"))
    return flags


def _aggregate(views: Sequence[NodeView], tensors: Sequence[str], per_feed: list[dict[str, np.ndarray]],
               half: set[str]) -> list[LayerStats]:
    producer = {t: v for v in views for t in v.float_outputs}
    out: dict[str, LayerStats] = {}
    for t in tensors:
        if t.startswith(STATS_INT):
            continue
        v = producer[t]
        s = LayerStats(t, v.name, v.op_type, v.name not in half)
        for stats in per_feed:
            vec = stats[t]
            s.ref_amax = max(s.ref_amax, float(vec[F["ref_amax"]]))
            s.raw_amax = max(s.raw_amax, float(vec[F["raw_amax"]]))
            s.ref_nonfinite += int(vec[F["ref_nonfinite"]])
            s.emu_nonfinite += int(vec[F["emu_nonfinite"]])
            s.err_max = max(s.err_max, float(vec[F["err_max"]]))
            s.flushed += int(vec[F["flushed"]])
            s.size = max(s.size, int(vec[F["size"]]))
            ref_amax = float(vec[F["ref_amax"]])
            rel = float(vec[F["err_max"]]) / ref_amax if ref_amax > 0 else (0.0 if vec[F["err_max"]] == 0 else 1.0)
            if vec[F["emu_nonfinite"]] > vec[F["ref_nonfinite"]]:
                rel = math.inf                 # NaN/Inf where float32 is finite: the error is unbounded
            s.rel_err = max(s.rel_err, rel)
        out[t] = s
    # growth: this layer's output error minus the worst of its inputs' (graph inputs and weights: 0)
    for v in views:
        ins = [out[t].rel_err for t in v.inputs if t in out]
        worst_in = max(ins) if ins else 0.0
        for t in v.float_outputs:
            out[t].input_err = worst_in
            out[t].growth = 0.0 if v.op_type in DATA_MOVEMENT else max(0.0, out[t].rel_err - worst_in)
    # first non-finite per feed: a layer whose output has new NaN/Inf while its inputs have none
    for stats in per_feed:
        bad = {t: stats[t][F["emu_nonfinite"]] > stats[t][F["ref_nonfinite"]] for t in tensors
               if not t.startswith(STATS_INT)}
        for v in views:
            if any(bad.get(t, False) for t in v.float_outputs) and not any(bad.get(t, False) for t in v.inputs):
                out[v.float_outputs[0]].first_nonfinite += 1
                break
    return [out[t] for t in tensors if not t.startswith(STATS_INT)]


def _index_changes(tensors: Sequence[str], per_feed: list[dict[str, np.ndarray]]) -> dict[str, tuple[int, int]]:
    """integer tensor -> (values differing from float32 over the feeds, values compared)."""
    out = {}
    for t in tensors:
        if t.startswith(STATS_INT):
            out[t[len(STATS_INT):]] = (sum(int(s[t][0]) for s in per_feed), sum(int(s[t][1]) for s in per_feed))
    return out


def _fp16_sources(views: Sequence[NodeView], node: NodeView, half: set[str], whole_cone: bool = False) -> list[str]:
    """The nearest fp16 layers upstream of `node` (walking through fp32 and integer-valued layers): the
    layers whose rounding reaches it. `whole_cone`: every fp16 layer upstream, not just the nearest."""
    producer = {o: v for v in views for o in v.outputs if o}
    found, seen, stack = [], set(), [node]
    while stack:
        v = stack.pop()
        for t in v.inputs:
            p = producer.get(t)
            if p is None or p.name in seen:
                continue
            seen.add(p.name)
            if p.name in half:
                found.append(p.name)
                if whole_cone:
                    stack.append(p)
            elif p.op_type not in ("Constant", "Shape"):
                stack.append(p)
    return found


def _flags(views: Sequence[NodeView], layers: Sequence[LayerStats], half: set[str], limits: AnalysisLimits,
           n_feeds: int, index_changes: Mapping[str, tuple[int, int]] | None = None,
           escalate: set[str] = frozenset()) -> list[Flag]:
    by_tensor = {s.tensor: s for s in layers}
    producer = {t: v for v in views for t in v.float_outputs}
    limit = FP16_MAX / limits.headroom
    flags: dict[str, Flag] = {}

    def add(node: str, kind: str, value: float, why: str, tensor: str = "") -> None:
        if node not in flags:
            flags[node] = Flag(node, kind, value, why, tensor)

    for s in layers:
        if s.first_nonfinite:
            if s.node in half:
                add(s.node, "non-finite", float(s.first_nonfinite),
                    f"NaN/Inf first appears here in fp16 ({s.first_nonfinite} of {n_feeds} feeds)")
            else:
                for src in _fp16_sources(views, producer[s.tensor], half):
                    add(src, "non-finite", float(s.first_nonfinite),
                        f"its fp16 output makes fp32 layer {s.node} non-finite ({s.first_nonfinite} of "
                        f"{n_feeds} feeds)")
    by_output = {o: v for v in views for o in v.outputs if o}
    for t, (changed, total) in (index_changes or {}).items():
        if not changed:
            continue
        v = by_output[t]
        cone = t in escalate
        for src in ([v.name] if v.name in half else []) + _fp16_sources(views, v, half, cone):
            add(src, "index", float(changed), f"fp16 rounding upstream changes {changed} of {total} values of the "
                f"integer {v.op_type} output of {v.name} (indices / argmax computed from floats)"
                + ("; forcing the nearest layers did not settle it, so its whole fp16 input cone is kept fp32"
                   if cone else ""), t)
    for s in layers:
        if s.node in half and s.amax > limit:
            add(s.node, "overflow", s.amax, f"max |activation| {s.amax:.4g} over the calibration feeds: within "
                f"{limits.headroom:g}x of fp16's 65504" + (" (overflowed)" if s.amax > FP16_MAX else ""))
    for v in views:                          # fp16 layers reading large fp32 tensors: their input rounding overflows
        if v.name not in half:
            continue
        for t in v.inputs:
            s = by_tensor.get(t)
            if s is not None and not s.node in half and s.amax > limit:
                add(v.name, "overflow", s.amax, f"reads {s.tensor} from fp32 layer {s.node} with max |x| "
                    f"{s.amax:.4g}: converting it to fp16 overflows or comes within {limits.headroom:g}x")
    for s in layers:
        if s.node in half and s.growth > limits.error_growth and s.input_err <= limits.error_growth:
            add(s.node, "error", s.growth, f"adds relative error {s.growth:.3g} in fp16 (output error {s.rel_err:.3g} "
                f"of its max |x| {s.ref_amax:.3g})")
    return list(flags.values())


def _outputs(model: Any, outs_per_feed: list[dict[str, np.ndarray]]) -> list[OutputEffect]:
    effects = []
    for o in model.graph.output:
        ref_all = [d[o.name] for d in outs_per_feed]
        emu_all = [d[EMU + o.name] for d in outs_per_feed]
        if ref_all and np.issubdtype(ref_all[0].dtype, np.floating):
            e = OutputEffect(o.name, "float")
            for r, m in zip(ref_all, emu_all):
                e.nonfinite += int(np.size(m) - np.count_nonzero(np.isfinite(m)))
                scale = float(np.abs(r).max()) if r.size else 0.0
                with np.errstate(invalid="ignore"):
                    diff = np.abs(m.astype(np.float64) - r)
                err = float(np.nanmax(np.where(np.isfinite(diff), diff, np.inf))) if diff.size else 0.0
                e.rel_err = max(e.rel_err, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
        else:
            same = sum(int(np.count_nonzero(r == m)) for r, m in zip(ref_all, emu_all))
            total = sum(int(r.size) for r in ref_all)
            e = OutputEffect(o.name, "int", agreement=same / total if total else 1.0)
        effects.append(e)
    return effects


def _run_round(label: str, model: Any, views: Sequence[NodeView], half: set[str], feeds: Sequence[Mapping[str, Any]],
               limits: AnalysisLimits, n_fp32: int, workdir: Path | None, escalate: set[str]) -> RoundResult:
    import tempfile

    t0 = time.perf_counter()
    probe, tensors = probe_model(model, views, half)
    with tempfile.TemporaryDirectory(prefix="fp16probe-", dir=workdir) as tmp:
        if _small_enough(probe):
            sess = session(probe, limits.threads)
        else:                       # GPT graphs: the weights twice exceed one protobuf's 2 GiB
            sess = session(save_model(probe, Path(tmp) / "probe.onnx"), limits.threads)
        del probe
        per_feed, outs = [], []
        for feed in feeds:
            stats, values = run_probe(sess, tensors, feed)
            per_feed.append(stats)
            outs.append(values)
        del sess
    layers = _aggregate(views, tensors, per_feed, half)
    flags = constant_flags(model, views, half) + _flags(views, layers, half, limits, len(feeds),
                                                        _index_changes(tensors, per_feed), escalate)
    seen: set[str] = set()
    flags = [f for f in flags if not (f.node in seen or seen.add(f.node))]
    return RoundResult(label, n_fp32, len(half), _outputs(model, outs), flags, layers, time.perf_counter() - t0)


def _small_enough(model: Any) -> bool:
    return sum(init.ByteSize() for init in model.graph.initializer) < 1_500_000_000


def analyze_graph(graph: str, model_path: Path, store: FeedStore, base: PrecisionPolicy | None,
                  limits: AnalysisLimits = AnalysisLimits(), progress: Callable[[str], None] = lambda s: None,
                  workdir: Path | None = None) -> GraphAnalysis:
    """The rounds of the module docstring for one graph."""
    import onnx

    model = onnx.load(str(model_path))
    views = node_views(model)
    feeds = list(store.feeds(graph, limits.max_feeds))
    if not feeds:
        raise ValueError(f"no collected feeds for graph '{graph}'")
    result = GraphAnalysis(graph, len(feeds), len(views))

    index_rounds: dict[str, int] = {}       # integer tensor -> consecutive rounds its values changed

    def one(label: str, fp32: Mapping[str, str]) -> RoundResult:
        half = fp16_nodes(views, fp32)
        progress(f"{graph}: round '{label}' ({len(half)} fp16 / {len(views)} layers, {len(feeds)} feeds)")
        escalate = {t for t, n in index_rounds.items() if n >= 2}
        r = _run_round(label, model, views, half, feeds, limits, len(views) - len(half), workdir, escalate)
        changed = {f.tensor for f in r.flags if f.kind == "index"}
        for t in list(index_rounds):
            if t not in changed:
                del index_rounds[t]
        for t in changed:
            index_rounds[t] = index_rounds.get(t, 0) + 1
        log.info("%s %s: worst output error %.3g, %d non-finite outputs, %d flags (%.1f s)", graph, label,
                 r.worst_output_error(), r.nonfinite_outputs, len(r.flags), r.seconds)
        return r

    result.rounds.append(one("all fp16", {}))
    fp32 = policy_fp32(graph, views, base)
    if base is not None:
        result.rounds.append(one("base", fp32))
    for i in range(limits.max_rounds):
        new = [f for f in result.final.flags if f.node not in fp32]
        if not new:
            break
        for f in new:
            result.measured[f.node] = f
            fp32[f.node] = f.why
        result.rounds.append(one(f"measured {i + 1}", fp32))
    left = [f for f in result.final.flags if f.node not in fp32]
    if left:
        log.warning("%s: %d layers still flagged after %d measured rounds: %s", graph, len(left), limits.max_rounds,
                    ", ".join(f.node for f in left[:5]))
    return result


def measured_rules(analysis: GraphAnalysis) -> list[PolicyRule]:
    """One rule per layer the calibration forced: the exact node name (fnmatch-escaped), with the finding."""
    return [PolicyRule(escape_pattern(node), (), (), "fp32", f"calibration ({f.kind}): {f.why}")
            for node, f in analysis.measured.items()]


def escape_pattern(name: str) -> str:
    """`name` as an fnmatch pattern matching exactly itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# ---------------------------------------------------------------------------------------------------
# Record (analysis.json): what the report is written from


def _num(x: float) -> Any:
    return x if math.isfinite(x) else str(x)


def _layer_json(s: LayerStats) -> dict[str, Any]:
    return {"layer": s.node, "op": s.op_type, "fp32": s.fp32, "amax": _num(s.amax), "rel_err": _num(s.rel_err),
            "growth": _num(s.growth), "nonfinite": s.emu_nonfinite, "flushed": s.flushed,
            "first_nonfinite": s.first_nonfinite}


def analysis_json(a: GraphAnalysis, top: int = 8) -> dict[str, Any]:
    rounds = []
    for r in a.rounds:
        by_amax = sorted(r.layers, key=lambda s: -s.amax)[:top]
        by_growth = sorted((s for s in r.layers if s.growth > 0), key=lambda s: -s.growth)[:top]
        origins = [s for s in r.layers if s.first_nonfinite]
        rounds.append({
            "label": r.label, "fp32_layers": r.fp32_layers, "fp16_layers": r.fp16_layers,
            "seconds": round(r.seconds, 2),
            "outputs": [{"name": o.name, "kind": o.kind, "rel_err": _num(o.rel_err), "nonfinite": o.nonfinite,
                         "agreement": o.agreement} for o in r.outputs],
            "flags": [{"layer": f.node, "kind": f.kind, "value": _num(f.value), "why": f.why} for f in r.flags],
            "max_amax": [_layer_json(s) for s in by_amax],
            "max_growth": [_layer_json(s) for s in by_growth],
            "first_nonfinite": [_layer_json(s) for s in origins],
        })
    return {"graph": a.graph, "feeds": a.feeds, "layers": a.nodes, "rounds": rounds,
            "measured": [{"layer": n, "kind": f.kind, "why": f.why} for n, f in a.measured.items()]}
