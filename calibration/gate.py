"""The INT8 gate: a graph's INT8 form is kept only if the synthesis it takes part in stays close to float32.
It runs on the CPU, through ONNX Runtime, before any TensorRT plan exists.

Each INT8 form is judged alone: the pipeline runs with that one graph as the form's FP16+INT8 emulation and
every other graph float32, over calibration items, greedy decoding (calibration/effect.py), so a refusal
names the graph that caused it. The emulation (calibration/fp16_emulation.py: `emulate_form`) is derived
from the form file itself, like the FP16 analysis's: every fp16 tensor is a float32 tensor rounded to fp16
after the node that writes it, QuantizeLinear/DequantizeLinear compute as ONNX defines them (round half to
even, saturate), and ONNX Runtime runs it with graph optimizations off. Not the form itself on the CPU:
ONNX Runtime's CPU provider computes fp16 nodes in float32 without rounding their results
(engines/mixed_precision.py), so a plain run would show the INT8 error without the fp16 one, and with
optimizations on it would fuse Q/DQ into its own integer kernels. What TensorRT computes differs from the
emulation only in accumulation order and in not rounding the dequantized INT8 inputs to fp16 (the
emulation does: slightly pessimistic).

Limits (`Int8Limits`, stated here and in the report):
- greedy-token agreement (teacher-forced) >= 0.98 — 2% of positions may flip where near ties are common;
  elsewhere INT8 GPT quantization kept only 26% of greedy tokens, which this refuses;
- minimum mel SNR >= 25 dB and minimum waveform SNR >= 15 dB over the items (teacher-forced, identical
  codes and noise, so the difference is the arithmetic). For scale: the FP16 emulation with the
  calibrated policy reaches ~50 dB on both (calibration/REPORT.md); 25 dB mel SNR is an error of ~6% of
  the mel's RMS; the waveform limit is lower because small phase shifts cost waveform SNR while being
  inaudible.

The decisions are recorded in `<calib>/int8_gate.json` (merged per graph: a graph not judged in a run keeps
its earlier decision), with where they were measured and each form's counts; `python -m calibration int8`
(calibration/int8_build.py) records an accepted form in the manifest and gives a refused graph its fp16
form as int8 form.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from runtime.errors import InputError

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
               "min_wav_snr_db": summary.min_wav_snr_db if math.isfinite(summary.min_wav_snr_db) else None,
               "items": len(summary.items), "tokens": sum(i.tokens for i in summary.items)}
    return GateDecision(not reasons, reasons, metrics)


def evaluate(ref: Any, open_test: Callable[[str], Any], candidates: Sequence[str], items: Sequence[Mapping[str, str]],
             gpt_tokens: int, limits: Int8Limits = Int8Limits(),
             progress: Callable[[str], None] = lambda s: None) -> dict[str, GateDecision]:
    """Judge each candidate graph alone: `open_test(graph)` -> a synthesizer running that graph's INT8 form
    and every other graph as `ref` does."""
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


def judged_on() -> str:
    """Where the gate measures, for the record and the report."""
    import onnxruntime

    return (f"CPU, ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider, graph optimizations off): each "
            "graph's INT8 form as its FP16+INT8 emulation, every other graph float32")


def judge_emulations(engines_dir: Path, calib: Path, emulations: Mapping[str, Path], n_items: int,
                     progress: Callable[[str], None], limits: Int8Limits = Int8Limits(),
                     threads: int | None = None) -> dict[str, GateDecision]:
    """Run each graph's emulated INT8 form (a file per graph, `emulations`) alone against the float32 graphs
    over `n_items` calibration items, on the CPU."""
    from runtime.executors import GraphSet, OrtExecutor, OrtOptions
    from runtime.manifest import read_manifest
    from runtime.synthesizer import Synthesizer

    from .feeds import FeedStore

    manifest = read_manifest(engines_dir)
    store = FeedStore.open(calib)
    items = pick_items(store.items, n_items)
    gpt_tokens = store.meta.get("settings", {}).get("gpt_tokens", 48)
    ref_graphs = GraphSet(manifest, engines_dir, "ort-cpu", OrtOptions(intra_op_threads=threads))
    ref_graphs.open_all()
    ref = Synthesizer(engines_dir, executors=ref_graphs)
    emulated = OrtOptions(intra_op_threads=threads, optimization="disable")     # fusions would drop roundings

    def open_test(graph: str) -> Any:
        path = Path(emulations[graph]).resolve()
        entry = dataclasses.replace(manifest.graph(graph), file=path.name, external_data={}, forms={})
        executors = {g: (OrtExecutor(entry, path.parent, "ort-cpu", emulated) if g == graph else ref_graphs[g])
                     for g in manifest.graphs}
        return Synthesizer(engines_dir, executors=executors)

    try:
        return evaluate(ref, open_test, list(emulations), items, gpt_tokens, limits, progress)
    finally:
        ref.close()


def write_gate_record(calib: Path, limits: Int8Limits, decisions: Mapping[str, GateDecision],
                      extra: Mapping[str, Mapping[str, Any]] | None = None, where: str = "") -> Path:
    """Record `decisions` (with `extra` facts per graph) in CALIB/int8_gate.json, keeping the earlier decisions
    of graphs not judged now."""
    path = Path(calib) / GATE_NAME
    graphs = _recorded_graphs(path)
    graphs.update({g: {**asdict(d), **dict((extra or {}).get(g, {}))} for g, d in decisions.items()})
    data = {"limits": asdict(limits), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "judged_on": where or judged_on(), "graphs": graphs}
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
