"""`report`: the Markdown account of a calibration directory (collection, FP16 analysis, policy, effect,
INT8 gate), written from its JSON records so it can be regenerated without rerunning anything."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .feeds import FeedStore

ANALYSIS_NAME = "analysis.json"
EFFECT_NAME = "effect.json"
GATE_NAME = "int8_gate.json"
REPORT_NAME = "REPORT.md"


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return {"inf": "∞", "-inf": "−∞", "nan": "NaN"}.get(x, x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "∞" if x > 0 else ("−∞" if x < 0 else "NaN")
        if x == 0:
            return "0"
        return f"{x:.{digits}g}"
    return str(x)


def _round(a: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((r for r in a["rounds"] if r["label"] == label), None)


def _out_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    parts = []
    for o in r["outputs"]:
        if o["kind"] == "float":
            cell = _f(o["rel_err"], 2)
            if o["nonfinite"]:
                cell += f" ({o['nonfinite']} NaN/Inf)"
        else:
            cell = f"{100 * o['agreement']:.1f}% equal"
        parts.append(cell)
    return " / ".join(parts)


def render(calib: Path) -> str:
    store = FeedStore.open(calib)
    analysis = _load(calib / ANALYSIS_NAME)
    effect = _load(calib / EFFECT_NAME)
    gate = _load(calib / GATE_NAME)
    meta = store.meta
    lines = ["# Calibration report", ""]
    settings = meta.get("settings", {})
    refs = sorted({i["reference"] for i in store.items})
    texts = sorted({(i["lang"], i["text"]) for i in store.items})
    lines += [f"Export: `{meta.get('export', '?')}` (IndexTTS2 {meta.get('version', '2.0')}); feeds collected with the **{meta.get('backend', '?')}** backend "
              f"on {meta.get('created', '?')}: {len(store.items)} syntheses = {len(texts)} texts "
              f"({', '.join(sorted({t[0] for t in texts}))}) × {len(refs)} reference voices; GPT capped at "
              f"{settings.get('gpt_tokens', '?')} codes, {settings.get('euler_steps', '?')} Euler steps "
              f"(kept: decode calls {settings.get('decode_calls', '?')}, DiT steps first/middle/last).", ""]
    if analysis:
        lim = analysis.get("limits", {})
        lines += [f"FP16 model: ONNX graph emulated node by node on ONNX Runtime (calibration/fp16_emulation.py); "
                  f"flag limits: headroom {lim.get('headroom')}× below 65504, error growth > {lim.get('error_growth')}, "
                  f"{lim.get('max_feeds')} feeds per graph; base policy: `{analysis.get('base', '?')}`.", ""]
        lines += ["## FP16 safety per graph", "",
                  "Output error = max |fp16 − fp32| / max |fp32| over the feeds (integer outputs: share of equal "
                  "values). *all fp16*: no fp32 layer; *base*: the base policy's islands; *calibrated*: base plus "
                  "the measured layers.", "",
                  "| graph | layers | feeds | all fp16: output error | flags | base: output error | calibrated: "
                  "output error | fp32 layers (measured) | max \\|activation\\| | first NaN/Inf (all fp16) |",
                  "|---|---:|---:|---|---:|---|---|---|---|---|"]
        for a in analysis["graphs"]:
            r0, rb, rf = _round(a, "all fp16"), _round(a, "base"), a["rounds"][-1]
            top = rf["max_amax"][0] if rf["max_amax"] else None
            origin = r0["first_nonfinite"][0]["layer"] if r0 and r0["first_nonfinite"] else "none"
            lines.append(f"| {a['graph']} | {a['layers']} | {a['feeds']} | {_out_cell(r0)} | "
                         f"{len(r0['flags']) if r0 else '–'} | {_out_cell(rb)} | {_out_cell(rf)} | "
                         f"{rf['fp32_layers']} ({len(a['measured'])}) | "
                         f"{_f(top['amax']) if top else '–'} | `{origin}` |")
        lines.append("")
        measured = [(a["graph"], m) for a in analysis["graphs"] for m in a["measured"]]
        lines += ["## Layers the calibration forced to fp32", ""]
        if measured:
            lines += ["| graph | layer | finding |", "|---|---|---|"]
            lines += [f"| {g} | `{m['layer']}` | {m['why']} |" for g, m in measured]
        else:
            lines.append("None beyond the base policy: no layer overflowed, produced NaN/Inf or exceeded the error "
                         "limit once the base islands were applied.")
        lines.append("")
        lines += ["## What FP16 alone does (no islands)", "",
                  "The flags of the *all fp16* round: what the base policy and the measured rules prevent.", ""]
        for a in analysis["graphs"]:
            r0 = _round(a, "all fp16")
            if r0 and r0["flags"]:
                shown = r0["flags"][:6]
                lines.append(f"- **{a['graph']}** ({len(r0['flags'])} flags): " + "; ".join(
                    f"`{f['layer']}` {f['kind']} ({_f(f['value'])})" for f in shown)
                    + (" …" if len(r0["flags"]) > len(shown) else ""))
        lines.append("")
        lines += ["## Largest activations and error sources (calibrated round)", ""]
        for a in analysis["graphs"]:
            rf = a["rounds"][-1]
            amax = ", ".join(f"`{s['layer']}` {_f(s['amax'])}{' (fp32)' if s['fp32'] else ''}" for s in rf["max_amax"][:3])
            growth = ", ".join(f"`{s['layer']}` {_f(s['growth'], 2)}{' (fp32)' if s['fp32'] else ''}"
                               for s in rf["max_growth"][:3])
            lines.append(f"- **{a['graph']}**: max |x| {amax}; most error added: {growth or 'none'}")
        lines.append("")
    if effect:
        lines += ["## End-to-end effect against float32", "",
                  "Greedy decoding, same seed. Teacher-forced agreement: the GPT's greedy choice at every position "
                  "of the float32 codes; free-running: both generate on their own. SNR of the teacher-forced run "
                  "(identical codes and noise): the arithmetic alone.", "",
                  "| variant | items | tokens | greedy agreement (teacher-forced) | free-running agreement | "
                  "min mel SNR | min waveform SNR |", "|---|---:|---:|---:|---:|---:|---:|"]
        for v in effect["variants"]:
            tokens = sum(i["tokens"] for i in v["items"])
            lines.append(f"| {v['label']} | {len(v['items'])} | {tokens} | {100 * v['forced_agreement']:.2f}% | "
                         f"{100 * v['free_agreement']:.2f}% | {_f(v['min_mel_snr_db'])} dB | "
                         f"{_f(v['min_wav_snr_db'])} dB |")
        lines.append("")
        for v in effect["variants"]:
            lines += [f"<details><summary>{v['label']}: per item</summary>", "",
                      "| text | voice | tokens | teacher-forced | free-running (first difference) | mel SNR | wave SNR |",
                      "|---|---|---:|---:|---|---:|---:|"]
            for i in v["items"]:
                text = i["text"] if len(i["text"]) <= 40 else i["text"][:37] + "…"
                lines.append(f"| {text} | {Path(i['reference']).name} | {i['tokens']} | "
                             f"{100 * i['forced_agreement']:.1f}% | {100 * i['free_agreement']:.1f}% "
                             f"({_f(i['first_divergence'])}) | {_f(i['mel_snr_db'])} dB | {_f(i['wav_snr_db'])} dB |")
            lines += ["", "</details>", ""]
    lines += ["## Collected inputs", "", "| graph | feeds | input | dtype | shape range | min | max | mean | std |",
              "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for g, gf in sorted(store.graphs.items()):
        for name, s in gf.stats.items():
            shape = "×".join(str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in s.dims)
            lines.append(f"| {g} | {len(gf.feeds)} | {name} | {s.dtype} | {shape} | {_f(s.min)} | {_f(s.max)} | "
                         f"{_f(s.mean)} | {_f(s.std)} |")
    lines.append("")
    lines += ["## Shipped fp16 graphs against the bounds", ""] + _check_section(_load(calib / "fp16_check.json")) + [""]
    lines += ["## INT8", ""] + _int8_section(gate) + [""]
    return "\n".join(lines)


def _check_section(checks: list[dict[str, Any]] | None) -> list[str]:
    """`python -m calibration check`: each shipped fp16 form's emulation against float32 on held-out feeds."""
    if not checks:
        return ["No check record: `python -m calibration check --engines OUT --calib CALIB` runs each shipped fp16 "
                "form (made with this policy) on feeds the analysis did not see, against the bounds above."]
    lines = ["Each fp16 form `export.build --precision-policy` wrote, emulated (fp16 rounding after every fp16 "
             "node) against its float32 graph; limit = 2 × the analysis's worst + one fp16 step (integer outputs: "
             "0.5 % less agreement). 'ORT CPU' = the form itself loads and runs on ONNX Runtime's CPU provider.", "",
             "| graph | feeds | held out | output: worst (limit) | within | ORT CPU |", "|---|---:|---|---|---|---|"]
    for c in checks:
        outs = "; ".join(f"{n}: {_f(v)} ({_f(c['limits'][n])})" for n, v in c["worst"].items())
        cpu = "runs" if c["runs_on_ort_cpu"] else f"cannot: {c['ort_cpu_error']}"
        lines.append(f"| {c['graph']} | {c['feeds']} | {'yes' if c['held_out'] else 'no (all analysed)'} | {outs} | "
                     f"{'yes' if not c['problems'] else 'NO: ' + '; '.join(c['problems'])} | {cpu} |")
    return lines


def _int8_section(gate: dict[str, Any] | None) -> list[str]:
    """The INT8 gate's decisions: where they were measured, the limits, per graph the form and the numbers."""
    if not gate:
        return ["No INT8 gate record: `python -m calibration int8 --engines OUT --calib CALIB` makes each graph's "
                "INT8 form (Q/DQ from the collected feeds, calibration/int8_qdq.py) and gates it on the CPU "
                "(calibration/gate.py)."]
    lim = gate["limits"]
    lines = [f"INT8 forms (explicit quantization: Q/DQ from the collected feeds on the fp16 form) judged on "
             f"{gate.get('judged_on', 'the CPU through ONNX Runtime')} (greedy, teacher-forced; record of "
             f"{gate.get('created', '?')}). Limits: greedy-token "
             f"agreement ≥ {lim['min_token_agreement']}, min mel SNR ≥ {lim['min_mel_snr_db']} dB, min waveform "
             f"SNR ≥ {lim['min_wav_snr_db']} dB. A graph without INT8 runs its fp16 form as int8 form.", "",
             "| graph | int8 form | INT8 nodes | Q/DQ pairs | items | token agreement | min mel SNR | min wave SNR | why |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for g, d in gate["graphs"].items():
        m, c = d.get("metrics") or {}, d.get("counts") or {}
        form = "INT8" if d["accepted"] else "fp16 (refused)" if m else "fp16"
        agree = f"{100 * m['token_agreement']:.1f}%" if "token_agreement" in m else "–"
        mel = f"{_f(m['min_mel_snr_db'])} dB" if m.get("min_mel_snr_db") is not None else ("∞" if m else "–")
        wav = f"{_f(m['min_wav_snr_db'])} dB" if m.get("min_wav_snr_db") is not None else ("∞" if m else "–")
        lines.append(f"| {g} | {form} | {c.get('quantized_nodes', '–')} | {c.get('quantize_linear', '–')} | "
                     f"{m.get('items', '–')} | {agree} | {mel} | {wav} | {'; '.join(d['reasons']) or '–'} |")
    return lines


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_report(calib: Path, out: Path | None = None) -> Path:
    out = out or calib / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(calib), encoding="utf-8")
    return out
