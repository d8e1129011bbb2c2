"""The INT8 gate: an INT8 plan is kept only if the synthesis it takes part in stays close to float32.

Each INT8 graph is judged alone: the pipeline runs with that one graph on its INT8 executor and every other
graph on the float32 reference, over calibration items, greedy decoding (calibration/effect.py). So a
refusal names the graph that caused it. Limits (`Int8Limits`, stated here and in the report):

- greedy-token agreement (teacher-forced) >= 0.98 — 2% of positions may flip where near ties are common;
  elsewhere INT8 GPT quantization kept only 26% of greedy tokens, which this refuses;
- minimum mel SNR >= 25 dB and minimum waveform SNR >= 15 dB over the items (teacher-forced, identical
  codes and noise, so the difference is the arithmetic). For scale: the FP16 emulation with the
  calibrated policy reaches ~50 dB on both (calibration/REPORT.md); 25 dB mel SNR is an error of ~6% of
  the mel's RMS; the waveform limit is lower because small phase shifts cost waveform SNR while being
  inaudible.

A refused graph's plan is renamed `<graph>.int8.plan.refused` (the runtime never loads it) and recorded
in `<calib>/int8_gate.json`; `calibration.int8.calibrator_factory` then returns None for it, so
`python -m calibration int8` (calibration/int8_build.py) rebuilds that graph as FP16 with its fp32
islands under its int8 plan name. Only plans that really hold INT8 layers are judged (a plan built as
fp16 fallback says `notes["int8"] = false` in its record), and the record is merged per graph: a graph
not judged in a run keeps its earlier decision, so a refusal stays until its entry (or the record) is
deleted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from runtime.errors import BackendError, InputError

from .effect import EffectSummary, measure_effect, pick_items

log = logging.getLogger(__name__)

GATE_NAME = "int8_gate.json"


@dataclass(frozen=True)
class Int8Limits:
    min_token_agreement: float = 0.98
    min_mel_snr_db: float = 25.0
    min_wav_snr_db: float = 15.0


@dataclass
class GateDecision:
    accepted: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def decide(summary: EffectSummary, limits: Int8Limits = Int8Limits()) -> GateDecision:
    """Accept or refuse from one graph's end-to-end effect."""
    reasons = []
    if summary.forced_agreement < limits.min_token_agreement:
        reasons.append(f"greedy-token agreement {summary.forced_agreement:.3f} < {limits.min_token_agreement}")
    if not summary.min_mel_snr_db >= limits.min_mel_snr_db:
        reasons.append(f"mel SNR {summary.min_mel_snr_db:.1f} dB < {limits.min_mel_snr_db} dB")
    if not summary.min_wav_snr_db >= limits.min_wav_snr_db:
        reasons.append(f"waveform SNR {summary.min_wav_snr_db:.1f} dB < {limits.min_wav_snr_db} dB")
    if any(i.nonfinite for i in summary.items):
        reasons.append("NaN/Inf in the mel")
    metrics = {"token_agreement": summary.forced_agreement,
               "min_mel_snr_db": summary.min_mel_snr_db if math.isfinite(summary.min_mel_snr_db) else None,
               "min_wav_snr_db": summary.min_wav_snr_db if math.isfinite(summary.min_wav_snr_db) else None}
    return GateDecision(not reasons, reasons, metrics)


def evaluate(ref: Any, open_test: Callable[[str], Any], candidates: Sequence[str], items: Sequence[Mapping[str, str]],
             gpt_tokens: int, limits: Int8Limits = Int8Limits(),
             progress: Callable[[str], None] = lambda s: None) -> dict[str, GateDecision]:
    """Judge each candidate graph alone: `open_test(graph)` -> a synthesizer running that graph on its INT8
    executor and every other graph as `ref` does."""
    decisions = {}
    for graph in candidates:
        test = open_test(graph)
        try:
            summary = measure_effect(ref, test, items, f"int8 {graph}", gpt_tokens, free_running=False,
                                     progress=progress)
        finally:
            close = getattr(test, "close", None)
            if close is not None and test is not ref:
                close()
        decisions[graph] = decide(summary, limits)
        d = decisions[graph]
        progress(f"{graph}: INT8 {'accepted' if d.accepted else 'REFUSED: ' + '; '.join(d.reasons)}")
    return decisions


def write_gate_record(calib: Path, limits: Int8Limits, decisions: Mapping[str, GateDecision]) -> Path:
    """Record `decisions` in CALIB/int8_gate.json, keeping the earlier decisions of graphs not judged now."""
    path = Path(calib) / GATE_NAME
    graphs = _recorded_graphs(path)
    graphs.update({g: asdict(d) for g, d in decisions.items()})
    data = {"limits": asdict(limits), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "graphs": graphs}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _recorded_graphs(path: Path) -> dict[str, dict]:
    """graph -> recorded decision (as JSON) of the gate record at `path` ({} without one)."""
    if not path.is_file():
        return {}
    try:
        graphs = dict(json.loads(path.read_text(encoding="utf-8"))["graphs"])
        incomplete = [g for g, d in graphs.items() if not {"accepted", "reasons"} <= set(d)]
        if incomplete:
            raise KeyError(f"no decision for {incomplete}")
        return graphs
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path}: unreadable INT8 gate record ({err}); delete it and run the gate again") from err


def refused_graphs(calib: str | Path) -> dict[str, str]:
    """graph -> why, for the graphs the gate refused (none without a record)."""
    graphs = _recorded_graphs(Path(calib) / GATE_NAME)
    return {g: "; ".join(d["reasons"]) for g, d in graphs.items() if not d["accepted"]}


def int8_plans(engines_dir: Path, graphs: Sequence[str]) -> list[str]:
    """The graphs of `graphs` whose int8 plan exists and holds INT8 layers: a plan built as fp16 fallback
    (its record says `notes["int8"] = false`) is no INT8 candidate for the gate."""
    from runtime.errors import ToolkitError
    from runtime.trt.engine_plan import plan_paths, read_record

    found = []
    for g in graphs:
        plan, sidecar = plan_paths(engines_dir, g, "int8")
        if not plan.exists():
            continue
        try:
            if read_record(sidecar).notes.get("int8") is False:
                continue
        except ToolkitError:
            pass                                       # judged anyway: the executor names the problem
        found.append(g)
    return found


def refuse_plans(engines_dir: Path, decisions: Mapping[str, GateDecision]) -> list[Path]:
    """Rename the refused graphs' INT8 plans (and records) so that no runtime loads them."""
    from runtime.trt.engine_plan import plan_paths

    moved = []
    for graph, d in decisions.items():
        if d.accepted:
            continue
        for path in plan_paths(engines_dir, graph, "int8"):
            if path.exists():
                target = path.with_name(path.name + ".refused")
                os.replace(path, target)
                moved.append(target)
    return moved


def judge_int8_plans(engines_dir: Path, calib: Path, candidates: Sequence[str], n_items: int,
                     progress: Callable[[str], None], limits: Int8Limits = Int8Limits()) -> dict[str, GateDecision]:
    """Run each candidate's INT8 TensorRT plan alone against the float32 reference (ONNX Runtime CPU)
    over `n_items` calibration items. Needs TensorRT and a GPU."""
    from runtime.executors import GraphSet, OrtOptions, backend_status
    from runtime.manifest import read_manifest
    from runtime.synthesizer import Synthesizer

    from .feeds import FeedStore

    status = backend_status("trt", engines_dir, "int8")
    if not status.ok:
        raise BackendError(f"the INT8 gate runs INT8 TensorRT plans: {status.detail}")
    manifest = read_manifest(engines_dir)
    store = FeedStore.open(calib)
    items = pick_items(store.items, n_items)
    gpt_tokens = store.meta.get("settings", {}).get("gpt_tokens", 48)
    ref_graphs = GraphSet(manifest, engines_dir, "ort-cpu", OrtOptions())
    ref_graphs.open_all()
    ref = Synthesizer(engines_dir, executors=ref_graphs)
    trt_graphs = GraphSet(manifest, engines_dir, "trt", OrtOptions(), "int8")

    def open_test(graph: str) -> Any:
        executors = {g: (trt_graphs[g] if g == graph else ref_graphs[g]) for g in manifest.graphs}
        return Synthesizer(engines_dir, executors=executors)

    return evaluate(ref, open_test, candidates, items, gpt_tokens, limits, progress)


@dataclass(frozen=True)
class GateOutcome:
    """What one gate run decided and did: the decisions, the record written, the plans moved aside."""

    decisions: dict[str, GateDecision]
    record: Path | None
    moved: list[Path]

    @property
    def refused(self) -> list[str]:
        return [g for g, d in self.decisions.items() if not d.accepted]

    def lines(self) -> list[str]:
        accepted = len(self.decisions) - len(self.refused)
        head = (f"INT8 gate -> {self.record}: {accepted} accepted, {len(self.refused)} refused" if self.record
                else "INT8 gate: no INT8 plan to judge")
        return [head] + [f"  {g} refused: {'; '.join(self.decisions[g].reasons)}" for g in self.refused] + [
            f"  refused plan moved aside: {p}" for p in self.moved]


def apply_gate(engines_dir: Path, calib: Path, decisions: Mapping[str, GateDecision],
               limits: Int8Limits = Int8Limits()) -> GateOutcome:
    """Record the decisions (merged per graph) and move the refused plans aside."""
    if not decisions:
        return GateOutcome({}, None, [])
    record = write_gate_record(calib, limits, decisions)
    return GateOutcome(dict(decisions), record, refuse_plans(engines_dir, decisions))


def run_int8_gate(engines_dir: Path, calib: Path, n_items: int, progress: Callable[[str], None],
                  limits: Int8Limits = Int8Limits()) -> GateOutcome:
    """The CLI's `int8-gate`: judge the existing INT8 plans (needs TensorRT and a GPU), record, move aside."""
    from runtime.manifest import read_manifest

    candidates = int8_plans(engines_dir, list(read_manifest(engines_dir).graphs))
    if not candidates:
        raise InputError(f"{engines_dir}: no INT8 plans; build them with python -m calibration int8 --engines "
                         f"{engines_dir} --calib {calib}")
    decisions = judge_int8_plans(engines_dir, calib, candidates, n_items, progress, limits)
    return apply_gate(engines_dir, calib, decisions, limits)
