"""Measure this CPU and write the export's CPU plan: per graph the fastest executor and precision that passes
the gates (runtime/cpu_plan.py holds the plan; `--backend cpu-auto` runs it).

    python -m benchmarks.cpu_plan --engines OUT [--calib CALIB | --speaker WAV] [--threads 2] [--items 4]

What it does, in order:
1. One synthesis on ONNX Runtime float32 (the reference, == eager within ~1e-5) records the feeds every graph
   gets (benchmarks/backends.py Recorder).
2. Every graph, on those feeds, with every candidate: ONNX Runtime fp32, OpenVINO fp32, OpenVINO bf16 (when the
   CPU has bf16), and for the GPT decode step ONNX Runtime on its weight-only int8 form (calibration/
   weight_only.py, written next to the export), runs interleaved round by round (benchmarks/measure.py) ->
   median milliseconds; each output's deviation from ONNX Runtime's is recorded too.
3. Gates (calibration/effect.py, the machinery calibration's fp16 effect uses): a graph whose approximate
   candidate (bf16, int8w) is the fastest by more than `--margin` is synthesized end to end with that graph so
   and everything else in float32, over the calibration items: greedy-token agreement teacher-forced and
   free-running >= 0.98, mel SNR >= 30 dB, waveform SNR >= 20 dB against float32. A refused candidate is not
   used, with the reason.
4. The whole plan (every accepted approximate graph at once) goes through the same gates; if it fails, the one
   that saves the least time is dropped (reason recorded) until it passes.
5. A non-reference candidate must beat ONNX Runtime fp32 by more than `--margin` over the graph's recorded
   calls (noise is not a speed-up) and be no slower than it by more than `--margin` on any one of them: a
   graph called at two shapes (the length regulator on the prompt, then on the codes; the prompt's call is
   cached with the voice in a service) is not moved where its per-request call gets slower.
6. The GPT weights are held once: where the export has its shared GPT file (export/gpt_shared.py), the GPT
   graphs stay in that one ONNX Runtime session, because any of them on another executor or form holds a
   second copy of the GPT weights (1.8 GiB at full size). Their other candidates are timed and shown, not
   chosen (nor gated, unless --gate-every); `--allow-gpt-copies` lets them be chosen, the copy's cost on you.

Written: OUT/cpu_plan.json (runtime/cpu_plan.py), valid for this CPU and these graphs only.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger("benchmarks")

REFERENCE = ("ort-cpu", "fp32")


@dataclass(frozen=True)
class Gates:
    """calibration effect thresholds a bf16 graph must meet against float32 (issue 22)."""

    forced_agreement: float = 0.98
    free_agreement: float = 0.98
    mel_snr_db: float = 30.0
    wav_snr_db: float = 20.0

    def verdict(self, summary: Any) -> tuple[bool, str]:
        """(passed, why not) for a calibration.effect.EffectSummary."""
        fails = []
        if summary.forced_agreement < self.forced_agreement:
            fails.append(f"teacher-forced agreement {summary.forced_agreement:.4f} < {self.forced_agreement}")
        if summary.free_agreement < self.free_agreement:
            fails.append(f"free-running agreement {summary.free_agreement:.4f} < {self.free_agreement}")
        if summary.min_mel_snr_db < self.mel_snr_db:
            fails.append(f"mel SNR {summary.min_mel_snr_db:.1f} dB < {self.mel_snr_db} dB")
        if summary.min_wav_snr_db < self.wav_snr_db:
            fails.append(f"waveform SNR {summary.min_wav_snr_db:.1f} dB < {self.wav_snr_db} dB")
        return not fails, "; ".join(fails)


@dataclass
class PlanSettings:
    engines: Path
    items: list[dict[str, str]]             # calibration items: {"text", "lang", "reference"}
    gpt_tokens: int = 48
    threads: int | None = None
    repeats: int = 5
    stage_seconds: float = 2.0
    margin: float = 0.05
    gates: Gates = field(default_factory=Gates)
    seed: int = 0
    candidates: tuple[tuple[str, str], ...] = (("ort-cpu", "fp32"), ("ov-cpu", "fp32"), ("ov-cpu", "bf16"),
                                               ("ort-cpu", "int8w"))
    graphs: tuple[str, ...] | None = None   # measure only these (the others stay ONNX Runtime fp32)
    gate_every: bool = False           # gate every approximate candidate measured, not only the fastest
    allow_gpt_copies: bool = False     # a GPT graph may leave the shared GPT session (another weights copy)


def label(choice: tuple[str, str]) -> str:
    return f"{choice[0]} {choice[1]}"


def record_feeds(opened: Any, item: Mapping[str, str], gpt_tokens: int, seed: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """The feeds one synthesis of `item` sends each graph of a backend opened with record=True (first calls;
    gpt_decode mid-generation)."""
    from runtime.request import SynthesisRequest

    from .backends import decode_call, recorded_feeds

    synth = opened.synth
    request = SynthesisRequest(text=item["text"], speaker=Path(item["reference"]))
    gen = dataclasses.replace(synth.generation_defaults, max_mel_tokens=gpt_tokens)
    synth.synthesize(request, gen, seed=seed)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    recorded = recorded_feeds(opened)
    for graph, calls in recorded.items():
        if graph == "gpt_decode":
            kept = decode_call(gpt_tokens)
            feeds[graph] = [calls[kept]] if kept in calls else list(calls.values())[-1:]
        else:
            feeds[graph] = [calls[i] for i in sorted(calls)]
    return feeds


def time_candidates(graph: str, executors: Mapping[str, Any], feeds: Sequence[Mapping[str, np.ndarray]],
                    settings: PlanSettings) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """Each candidate's median ms per recorded feed (all candidates and feeds interleaved round by round), their
    sum, and each output's largest deviation from the reference's, relative to the reference's largest
    magnitude -> (total ms, ms per call, deviation) keyed by candidate."""
    from .measure import measure_interleaved

    def runner(ex: Any, feed: Mapping[str, np.ndarray]) -> Callable[[], object]:
        return lambda: ex.run(feed)

    reference = [executors[label(REFERENCE)].run(f) for f in feeds]
    deviation = {}
    for name, ex in executors.items():
        got = [ex.run(f) for f in feeds]
        worst = 0.0
        for ref, out in zip(reference, got):
            for key, value in ref.items():
                if not np.issubdtype(value.dtype, np.floating):
                    continue
                scale = float(np.max(np.abs(value))) or 1.0
                worst = max(worst, float(np.max(np.abs(out[key].astype(np.float64) - value))) / scale)
        deviation[name] = worst
    stats = measure_interleaved({f"{n}|{i}": runner(ex, f) for n, ex in executors.items() for i, f in enumerate(feeds)},
                                settings.repeats, min_seconds=settings.stage_seconds / len(feeds), warmup_seconds=0.5)
    calls = {n: [stats[f"{n}|{i}"].median_ms for i in range(len(feeds))] for n in executors}
    return {n: float(sum(c)) for n, c in calls.items()}, calls, deviation


def slower_calls(calls: Mapping[str, Sequence[float]], margin: float) -> dict[str, str]:
    """Candidates slower than ONNX Runtime fp32 by more than `margin` on some recorded call -> which and by
    how much (they are not chosen, whatever their total)."""
    ref = calls.get(label(REFERENCE), [])
    out = {}
    for name, times in calls.items():
        worse = [(i, t, r) for i, (t, r) in enumerate(zip(times, ref)) if t > (1 + margin) * r]
        if name != label(REFERENCE) and worse:
            i, t, r = max(worse, key=lambda w: w[1] / w[2])
            out[name] = f"{name} slower on call {i + 1} of {len(ref)} ({t:.1f} ms against {r:.1f} ms)"
    return out


#: candidates that change the arithmetic: used only where the gates passed
APPROXIMATE = ("ov-cpu bf16", "ort-cpu int8w")


def worth_gating(times: Mapping[str, float], candidate: str, margin: float,
                 slower: Mapping[str, str] = {}) -> bool:
    """An approximate candidate beats every exact one by more than `margin` and is slower on no call (else it
    cannot be chosen)."""
    exact = [v for k, v in times.items() if k not in APPROXIMATE and k not in slower]
    return candidate in times and candidate not in slower and bool(exact) and times[candidate] < (1 - margin) * min(exact)


def decide(times: Mapping[str, float], verdicts: Mapping[str, tuple[bool, str]], margin: float,
           slower: Mapping[str, str] = {}) -> tuple[tuple[str, str], str]:
    """A graph's choice from its candidates' median times, the gates' verdicts on its approximate candidates
    (a candidate without a verdict was not gated) and the candidates slower on some call (`slower_calls`)
    -> ((backend, precision), reason). The fastest allowed candidate, if it beats ONNX Runtime fp32 by more
    than `margin`; else ONNX Runtime fp32."""
    ref_ms = times[label(REFERENCE)]
    allowed = {k: v for k, v in times.items()
               if (k not in APPROXIMATE or verdicts.get(k, (False, ""))[0]) and k not in slower}
    notes = [f"{k} refused by the gates ({why})" for k, (ok, why) in verdicts.items() if not ok]
    notes += [why for k, why in slower.items() if verdicts.get(k, (True, ""))[0]]
    best = min(allowed, key=allowed.get)
    if best != label(REFERENCE) and allowed[best] < (1 - margin) * ref_ms:
        gated = ", gates passed" if best in APPROXIMATE else ""
        backend, precision = best.split(" ")
        return (backend, precision), "; ".join(notes + [f"{best} {ref_ms / allowed[best]:.2f}x ONNX Runtime fp32{gated}"])
    return REFERENCE, "; ".join(notes + ["ONNX Runtime fp32 is the fastest (or within the margin)"])


def choose(times: Mapping[str, float], verdicts: Mapping[str, tuple[bool, str]], margin: float,
           held_once: bool, slower: Mapping[str, str] = {}) -> tuple[tuple[str, str], str]:
    """`decide`, except that a GPT graph whose weights are held once (step 6) stays on ONNX Runtime fp32 in the
    shared session; its reason then names the fastest candidate it gives up and why."""
    if not held_once:
        return decide(times, verdicts, margin, slower)
    notes = [f"{k} refused by the gates ({why})" for k, (ok, why) in verdicts.items() if not ok]
    ref_ms = times[label(REFERENCE)]
    faster = {k: v for k, v in times.items() if k != label(REFERENCE) and v < (1 - margin) * ref_ms
              and verdicts.get(k, (True, ""))[0] and k not in slower}
    if not faster:
        return REFERENCE, "; ".join(notes + ["ONNX Runtime fp32 is the fastest (or within the margin)"])
    best = min(faster, key=faster.get)
    ungated = " (not gated)" if best in APPROXIMATE and best not in verdicts else ""
    return REFERENCE, "; ".join(notes + [
        f"kept in the shared GPT session, the GPT weights held once: {best}{ungated} measured "
        f"{ref_ms / faster[best]:.2f}x but would hold another copy of them (--allow-gpt-copies)"])


def plan_markdown(plan: Any) -> str:
    """The plan as tables: per graph every candidate's median time, the choice and why; the gates."""
    labels = [label(c) for c in PlanSettings.candidates]
    took = "" if plan.measured_s is None else f" (in {plan.measured_s:.0f} s)"
    lines = [f"CPU plan measured {plan.created}{took} on {plan.cpu.describe()}, {plan.threads or 'default'} thread(s), "
             + ", ".join(f"{k} {v}" for k, v in plan.versions.items()) + ".", "",
             "| graph | " + " | ".join(labels) + " | chosen | × vs ORT fp32 | why |",
             "|---|" + "---|" * (len(labels) + 3)]
    for name, g in plan.graphs.items():
        cells = [f"{g.timings_ms[k]:.1f} ms" if k in g.timings_ms else "–" for k in labels]
        ref = g.timings_ms.get(label(REFERENCE))
        speed = f"{ref / g.timings_ms[g.choice.label]:.2f}×" if ref and g.choice.label in g.timings_ms else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{g.choice.label}** | {speed} | {g.reason} |")
    gated = [(name, key, v) for name, g in plan.graphs.items() for key, v in (g.gate or {}).items()
             if key in APPROXIMATE]
    if gated:
        lines += ["", "Gates (each candidate alone in the pipeline, against float32; thresholds: agreement ≥ 0.98 "
                  "teacher-forced and free-running, mel SNR ≥ 30 dB, waveform SNR ≥ 20 dB):", "",
                  "| graph | candidate | teacher-forced | free-running | min mel SNR | min wave SNR | passed |",
                  "|---|---|---|---|---|---|---|"]
        for name, key, v in gated:
            lines.append(f"| {name} | {key} | {_pct(v['forced_agreement'])} | {_pct(v['free_agreement'])} | "
                         f"{_db(v['min_mel_snr_db'])} | {_db(v['min_wav_snr_db'])} | {'yes' if v['passed'] else 'no: ' + v.get('why', '')} |")
    if plan.gates:
        v = plan.gates
        lines += ["", f"The whole plan ({', '.join(f'{g} {k}' for g, k in v.get('approximate', {}).items())}): "
                  f"teacher-forced {_pct(v['forced_agreement'])}, free-running {_pct(v['free_agreement'])}, "
                  f"min mel SNR {_db(v['min_mel_snr_db'])}, min waveform SNR {_db(v['min_wav_snr_db'])}: "
                  f"{'passed' if v['passed'] else 'failed'}."]
    return "\n".join(lines) + "\n"


def _pct(x: Any) -> str:
    return f"{100 * float(x):.2f} %"


def _db(x: Any) -> str:
    return str(x) if isinstance(x, str) else f"{float(x):.1f} dB"


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import ToolkitError

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    try:
        settings = settings_from(args)
        plan = make_plan(settings, progress=lambda s: print(s, flush=True))
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    from runtime.cpu_plan import write_plan

    path = write_plan(settings.engines, plan)
    print(f"wrote {path}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_plan(args.out, plan)
        (args.out / "results.md").write_text(plan_markdown(plan), encoding="utf-8")
        print(f"wrote {args.out / 'cpu_plan.json'} and {args.out / 'results.md'}")
    for name, g in plan.graphs.items():
        print(f"  {name:20s} {g.choice.label:13s} " + ", ".join(f"{k} {v:.1f} ms" for k, v in g.timings_ms.items())
              + (f"  ({g.reason})" if g.reason else ""))
    return 0


def make_plan(settings: PlanSettings, progress: Callable[[str], None] = lambda s: None) -> Any:
    """Steps 1-5 of the module docstring -> runtime.cpu_plan.CpuPlan (not written)."""
    from runtime.backend import Backend
    from runtime.cpu_plan import Choice, CpuPlan, GraphPlan, export_identity, this_cpu
    from calibration.weight_only import GRAPHS as WEIGHT_ONLY_GRAPHS
    from calibration.weight_only import write_weight_only
    from runtime.executors import OrtExecutor, OrtOptions
    from runtime.executors.gpt_session import shared_gpt_usable
    from runtime.executors.openvino import OvExecutor, OvOptions, cpu_capabilities, import_ov
    from runtime.manifest import read_manifest
    from runtime.synthesizer import Synthesizer

    from .backends import decode_call, open_backend

    ov = import_ov()
    manifest = read_manifest(settings.engines)
    bf16 = "BF16" in cpu_capabilities()
    candidates = [c for c in settings.candidates if c[1] != "bf16" or bf16]
    if not bf16:
        progress(f"this CPU has no bf16 in OpenVINO ({', '.join(cpu_capabilities())}): fp32 candidates only")
    t0 = time.perf_counter()
    progress(f"[1/4] recording the feeds of one synthesis on ONNX Runtime float32 ({settings.engines})")
    opened = open_backend("ort-cpu", settings.engines, None, settings.threads, record=True,
                          record_decode_call=decode_call(settings.gpt_tokens))
    feeds = record_feeds(opened, settings.items[0], settings.gpt_tokens, settings.seed)
    reference = {g: ex.inner for g, ex in opened.synth.graphs.items()}      # the runtime's own executors
    ref_plain = Synthesizer(settings.engines, Backend.from_executors(manifest, reference, name="ort-cpu"))
    ref_synth = CachedReference(ref_plain)
    graphs: dict[str, GraphPlan] = {}
    approximate: dict[tuple[str, str], Any] = {}          # (graph, candidate) -> its executor, until decided
    pinned = set()                                        # GPT graphs held in the shared session (step 6)
    if not settings.allow_gpt_copies and shared_gpt_usable(manifest, settings.engines):
        pinned = set(manifest.shared_gpt.branches)
    progress(f"[2/4] timing {len(manifest.graphs)} graphs x {', '.join(label(c) for c in candidates)}")
    for name in manifest.graphs:
        if name not in feeds:
            graphs[name] = GraphPlan(Choice(*REFERENCE), reason="not called by the recording synthesis")
            continue
        if settings.graphs is not None and name not in settings.graphs:
            graphs[name] = GraphPlan(Choice(*REFERENCE), reason="not measured (--graphs)")
            continue
        executors: dict[str, Any] = {label(REFERENCE): reference[name]}
        entry = manifest.graph(name)
        form = None
        for backend, precision in candidates:
            if (backend, precision) == REFERENCE:
                continue
            if precision == "int8w":
                if name not in WEIGHT_ONLY_GRAPHS:
                    continue
                progress(f"  {name}: writing its weight-only int8 form")
                form = write_weight_only(entry, settings.engines)
                weight_only = GraphPlan(Choice("ort-cpu", "int8w"), form=form)
                executors["ort-cpu int8w"] = OrtExecutor(weight_only.entry(entry), settings.engines, "ort-cpu",
                                                         OrtOptions(intra_op_threads=settings.threads))
                continue
            executors[label((backend, precision))] = OvExecutor(entry, settings.engines,
                                                                OvOptions(settings.threads, precision))
        times, calls, deviation = time_candidates(name, executors, feeds[name], settings)
        graphs[name] = GraphPlan(Choice(*REFERENCE), times, {"max_rel_deviation": deviation}, "", form, calls)
        for key in APPROXIMATE:
            if key in executors and (name not in pinned or settings.gate_every):   # else never gated: closed
                approximate[(name, key)] = executors.pop(key)
        for key, ex in executors.items():
            if key != label(REFERENCE):
                _close(ex)
        progress(f"  {name:20s} " + ", ".join(f"{k} {v:.1f} ms (dev {deviation[k]:.1e})" for k, v in times.items()))
    progress("[3/4] gates: each approximate candidate (bf16, weight-only int8) that is the fastest, alone, end to "
             "end against float32")
    accepted: dict[str, str] = {}                              # graph -> its approximate candidate
    for name, gp in graphs.items():
        if not gp.timings_ms:
            continue
        verdicts = {}
        slower = slower_calls(gp.call_ms, settings.margin)
        for key in APPROXIMATE:
            if (name, key) in approximate and (settings.gate_every or name not in pinned
                                               and worth_gating(gp.timings_ms, key, settings.margin, slower)):
                summary = _effect(ref_synth, manifest, reference, {name: approximate[(name, key)]}, settings,
                                  f"{name} {key}", progress)
                verdicts[key] = settings.gates.verdict(summary)
                gp.gate = {**(gp.gate or {}), key: summary.to_json() | {"passed": verdicts[key][0],
                                                                        "why": verdicts[key][1]}}
        choice, gp.reason = choose(gp.timings_ms, verdicts, settings.margin, name in pinned, slower)
        gp.choice = Choice(*choice)
        if gp.choice.label in APPROXIMATE:
            accepted[name] = gp.choice.label
        if gp.choice.precision != "int8w":
            gp.form = None
        for key in APPROXIMATE:                                # the graph's other forms: memory back now
            if (name, key) in approximate and accepted.get(name) != key:
                _close(approximate.pop((name, key)))
    progress("[4/4] the whole plan end to end: " + (", ".join(f"{g} {k}" for g, k in accepted.items())
                                                   or "no approximate graph"))
    gates: dict[str, Any] = {}
    while accepted:
        summary = _effect(ref_synth, manifest, reference, {g: approximate[(g, k)] for g, k in accepted.items()},
                          settings, "plan", progress)
        ok, why = settings.gates.verdict(summary)
        gates = summary.to_json() | {"passed": ok, "approximate": dict(accepted)}
        if ok:
            break
        drop = min(accepted, key=lambda g: graphs[g].timings_ms[label(REFERENCE)] - graphs[g].timings_ms[accepted[g]])
        graphs[drop].choice, graphs[drop].form = Choice(*REFERENCE), None
        graphs[drop].reason = f"{accepted.pop(drop)} passed alone but the whole plan failed the gates ({why}); " \
                              "dropped as the smallest saving"
    for ex in approximate.values():
        _close(ex)
    ref_plain.close()
    opened.synth.close()
    import onnxruntime

    return CpuPlan(cpu=this_cpu(), export=export_identity(manifest), graphs=graphs, threads=settings.threads,
                   versions={"onnxruntime": onnxruntime.__version__, "openvino": ov.__version__.split("-")[0]},
                   gates=gates, created=time.strftime("%Y-%m-%d %H:%M:%S"), measured_s=round(time.perf_counter() - t0, 1))


class CachedReference:
    """The float32 side of every gate, computed once: each gate compares its candidate with the same reference
    runs (same items, seed and greedy settings), so the reference's segments are remembered by (text, voice,
    seed, segment, settings) instead of being synthesized again for every candidate. Looks like the Synthesizer
    to calibration.effect.measure_effect (prepare / segment / generation_defaults)."""

    def __init__(self, synth: Any) -> None:
        self._synth = synth
        self.generation_defaults = synth.generation_defaults
        self._segments: dict[tuple, Any] = {}

    def prepare(self, request: Any, seed: int | None = None) -> Any:
        return _Prepared(self._synth.prepare(request, seed), (request.text, str(request.speaker), seed))

    def segment(self, prep: "_Prepared", index: int, generation: Any = None) -> Any:
        key = (*prep.key, index, generation)
        if key not in self._segments:
            self._segments[key] = self._synth.segment(prep.inner, index, generation)
        return self._segments[key]


@dataclass
class _Prepared:
    inner: Any
    key: tuple

    @property
    def segments(self) -> Any:
        return self.inner.segments


def _close(executor: Any) -> None:
    close = getattr(executor, "close", None)
    if close is not None:
        close()


def _effect(ref_synth: Any, manifest: Any, reference: Mapping[str, Any], replaced: Mapping[str, Any],
            settings: PlanSettings, what: str, progress: Callable[[str], None]) -> Any:
    from calibration.effect import measure_effect
    from runtime.backend import Backend
    from runtime.synthesizer import Synthesizer

    executors = {g: replaced.get(g, ex) for g, ex in reference.items()}
    test = Synthesizer(settings.engines, Backend.from_executors(manifest, executors, name="cpu-plan"))
    try:
        return measure_effect(ref_synth, test, settings.items, what, settings.gpt_tokens, seed=settings.seed,
                              progress=progress)
    finally:
        test.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_plan", description=__doc__.split("\n")[0])
    p.add_argument("--engines", type=Path, required=True, help="export directory (the plan is written into it)")
    p.add_argument("--calib", type=Path, help="calibration directory (python -m calibration collect): its items are "
                                              "the gates' texts and voices")
    p.add_argument("--speaker", type=Path, help="without --calib: the voice of the gate texts")
    p.add_argument("--texts", nargs="+", help="without --calib: the gate texts (default: two of the benchmark's)")
    p.add_argument("--items", type=int, default=4, help="calibration items synthesized by each gate")
    p.add_argument("--gpt-tokens", type=int, help="greedy codes per segment in the gates (default: the calibration's, "
                                                   "or 48)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of both runtimes (default: theirs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stage-seconds", type=float, default=2.0, help="time floor per candidate and graph")
    p.add_argument("--margin", type=float, default=0.05, help="a candidate must beat ONNX Runtime fp32 by this "
                                                              "fraction to be chosen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graphs", help="comma-separated: measure only these graphs (the others stay ONNX Runtime fp32)")
    p.add_argument("--out", type=Path, help="also write the plan and its tables (results.md) into this folder")
    p.add_argument("--gate-every", action="store_true",
                   help="run the gates for every approximate candidate (bf16, int8w), not only where it is the fastest "
                        "(a report)")
    p.add_argument("--allow-gpt-copies", action="store_true",
                   help="let a GPT graph leave the shared GPT session for a faster executor or form, which holds "
                        "another copy of the GPT weights (default: the GPT weights held once)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> PlanSettings:
    from runtime.errors import InputError

    if not (args.engines / "manifest.json").is_file():
        raise InputError(f"{args.engines}: no manifest.json (an export directory of python -m export.build)")
    gpt_tokens = args.gpt_tokens
    if args.calib is not None:
        from calibration.effect import pick_items
        from calibration.feeds import FeedStore

        store = FeedStore.open(args.calib)
        if not store.items:
            raise InputError(f"{args.calib}: no calibration items (python -m calibration collect)")
        items = pick_items(store.items, args.items)
        gpt_tokens = gpt_tokens or store.meta.get("settings", {}).get("gpt_tokens", 48)
    else:
        if args.speaker is None:
            raise InputError("give --calib CALIB (calibration items) or --speaker WAV (with --texts)")
        if not args.speaker.is_file():
            raise InputError(f"--speaker {args.speaker}: file not found")
        from .stages import DEFAULT_TEXTS

        texts = args.texts or list(DEFAULT_TEXTS)
        items = [{"text": t, "lang": "", "reference": str(args.speaker)} for t in texts[:args.items]]
    for name in ("items", "repeats"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.margin < 1:
        raise InputError(f"--margin must be in [0, 1), got {args.margin}")
    graphs = tuple(g.strip() for g in args.graphs.split(",") if g.strip()) if args.graphs else None
    if graphs is not None:
        from runtime.manifest import read_manifest

        unknown = [g for g in graphs if g not in read_manifest(args.engines, check_files=False).graphs]
        if unknown:
            raise InputError(f"--graphs: {unknown} are not graphs of {args.engines}")
    return PlanSettings(args.engines, items, gpt_tokens or 48, args.threads, args.repeats, args.stage_seconds,
                        args.margin, seed=args.seed, graphs=graphs, gate_every=args.gate_every,
                        allow_gpt_copies=args.allow_gpt_copies)


if __name__ == "__main__":
    sys.exit(main())
