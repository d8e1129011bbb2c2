"""`python -m calibration int8`: every graph's INT8 form (explicit quantization), gated on the CPU, recorded in
the manifest; the INT8 TensorRT plans where TensorRT and a GPU exist.

INT8 needs calibration data, and calibration sits above export and engines (DESIGN.md §1), so INT8 is made
here rather than by `export.build` (which refuses `--precision int8` and names this command). The steps:

1. check the inputs: the export's manifest with its fp16 forms (made with the same precision policy: an
   INT8 form is that fp16 form plus Q/DQ, and a refused graph falls back to it), the calibration
   directory (collected for this export's sizes);
2. per graph, the INT8 form (calibration/int8_qdq.py) written to `CALIB/int8/forms/<graph>.onnx` with its
   FP16+INT8 emulation `CALIB/int8/emulated/<graph>.onnx`; a graph with nothing to quantize, without
   feeds, or whose form fails its checks keeps its fp16 form (reason recorded);
3. the INT8 gate (calibration/gate.py) on the CPU: each emulated form alone in the pipeline against float32;
4. the manifest, rewritten atomically: an accepted graph's `forms["int8"]` is `onnx/int8/<graph>.onnx`
   (counts with the quantized nodes and Q/DQ nodes), a refused one's is its fp16 form's file with a `note`
   saying why — so `--engine-precision int8` always has every graph; the decisions go to
   `CALIB/int8_gate.json` (calibration/report.py shows them);
5. where TensorRT and a GPU exist, `engines.build_all(manifest, OUT, "int8")` builds the plans from those
   forms; elsewhere the engines are skipped with the reason (EngineResults).

`judge` (the gate's measurement) and `build` (the TensorRT step) are injectable so the flow runs in tests
without synthesizing or TensorRT. `regate_int8` (`python -m calibration int8-gate`) judges the recorded
INT8 forms again (e.g. with more items) and falls back the ones now refused.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from engines.outcome import EngineResults
from runtime.errors import InputError, ToolkitError
from runtime.manifest import GraphEntry, GraphForm, Manifest

from .effect import pick_items
from .gate import GateDecision, Int8Limits, judge_emulations, judged_on, write_gate_record
from .int8_qdq import DEFAULT_METHOD, Int8Form, QdqSettings, form_recipe, make_int8_form

log = logging.getLogger(__name__)

INT8 = "int8"
FP16_GRAPH_FORM = "fp16-mixed"    # a fallback's graph form, in the engine builder's words (engine_plan.GRAPH_FORMS)
WORK_DIR = "int8"                 # under CALIB: forms/ and emulated/ (the candidates the gate judges)

#: (engines_dir, calib, {graph: emulated form file}, n_items, progress, limits) -> graph -> decision
Judge = Callable[[Path, Path, Mapping[str, Path], int, Callable[[str], None], Int8Limits], Mapping[str, GateDecision]]
#: (manifest, engines_dir, graphs) -> the int8 plans' outcomes
Build = Callable[[Manifest, Path, Sequence[str]], EngineResults]


@dataclass(frozen=True)
class Int8Settings:
    items: int = 4                              # calibration items the gate synthesizes per graph
    graphs: tuple[str, ...] | None = None       # None: every graph of the manifest
    policy_path: Path | None = None             # fp32 islands (default: the shipped policy)
    method: str = DEFAULT_METHOD                # calibration method (calibration/int8_qdq.py METHODS)
    max_feeds: int | None = None                # calibration feeds per graph (None: all collected)
    workspace_gib: float = 4.0                  # TensorRT's workspace limit for the plans
    limits: Int8Limits = field(default_factory=Int8Limits)
    threads: int | None = None


@dataclass
class GraphOutcome:
    """What one graph's int8 form is: "int8" (accepted) or "fp16" (refused, nothing to quantize, no feeds,
    or the form failed), with the reasons, the form's counts and the gate's metrics."""

    graph: str
    form: GraphForm
    status: str
    reasons: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Int8Build:
    """Per graph, the int8 form recorded (`outcomes`), the gate record, the manifest written, the plans."""

    outcomes: dict[str, GraphOutcome]
    record: Path | None
    manifest: Path
    engines: EngineResults
    seconds: float = 0.0

    @property
    def accepted(self) -> list[str]:
        return [g for g, o in self.outcomes.items() if o.status == INT8]

    @property
    def fallbacks(self) -> list[str]:
        return [g for g, o in self.outcomes.items() if o.status != INT8]

    @property
    def ok(self) -> bool:
        """Every graph has a runnable int8 form (INT8 or its fp16 form) and no plan failed to build."""
        return self.engines.ok

    def lines(self) -> list[str]:
        out = [f"INT8 forms: {len(self.accepted)} accepted, {len(self.fallbacks)} on their fp16 form "
               f"({self.seconds:.0f} s); gate -> {self.record}; manifest -> {self.manifest}"]
        for g, o in self.outcomes.items():
            m = o.metrics
            gate = (f"agreement {m['token_agreement']:.3f}, mel SNR {_db(m.get('min_mel_snr_db'))}, "
                    f"wave SNR {_db(m.get('min_wav_snr_db'))}" if m else "not judged")
            qdq = f"{o.counts.get('quantized_nodes', 0)} INT8 nodes, {o.counts.get('quantize_linear', 0)} Q/DQ pairs"
            why = f": {'; '.join(o.reasons)}" if o.reasons else ""
            out.append(f"  {g:20s} {o.status:4s}  {qdq}; {gate}{why}")
        out.append(self.engines.summary())
        return out


def _db(x: Any) -> str:
    return "∞" if x is None else f"{x:.1f} dB"


# ---------------------------------------------------------------------------------------------------
# Inputs


def _check_inputs(engines_dir: Path, calib: Path, settings: Int8Settings) -> tuple[Manifest, Any, list[str]]:
    """(manifest, policy, graphs) after checking the manifest, its fp16 forms, the calibration directory."""
    from engines.precision import load_policy
    from runtime.manifest import read_manifest

    from .feeds import FeedStore

    manifest = read_manifest(engines_dir)
    store = FeedStore.open(calib)
    if store.meta.get("dims") and store.meta["dims"] != asdict(manifest.dims):
        raise InputError(f"{calib} was collected for a model with other sizes than {engines_dir} (dims differ); "
                         f"collect again for this export (python -m calibration collect --engines {engines_dir})")
    names = list(settings.graphs) if settings.graphs else list(manifest.graphs)
    unknown = [g for g in names if g not in manifest.graphs]
    if unknown:
        raise InputError(f"graphs {unknown} are not in {engines_dir} (it has {', '.join(manifest.graphs)})")
    policy = load_policy(settings.policy_path)
    flag = f" --precision-policy {settings.policy_path}" if settings.policy_path else ""
    missing = [g for g in names if "fp16" not in manifest.graph(g).forms]
    if missing:
        raise InputError(f"graphs {missing} have no fp16 form in {engines_dir}: INT8 forms are fp16 forms with Q/DQ; "
                         f"run python -m export.build --precision fp16{flag} first")
    other = [g for g in names if manifest.graph(g).forms["fp16"].policy_sha256 != policy.sha256()]
    if other:
        raise InputError(f"the fp16 forms of {other} were made with another precision policy than "
                         f"{settings.policy_path or 'the shipped one'} ({policy.sha256()[:12]}); pass the policy "
                         f"export.build used (--precision-policy) or re-run python -m export.build --precision "
                         f"fp16{flag}")
    return manifest, policy, names


# ---------------------------------------------------------------------------------------------------
# The command


def build_int8(engines_dir: str | Path, calib: str | Path, settings: Int8Settings = Int8Settings(), *,
               progress: Callable[[str], None] = lambda s: None, judge: Judge | None = None,
               build: Build | None = None) -> Int8Build:
    """Make, gate and record the int8 forms of the export at `engines_dir`; build the plans where possible."""
    from .feeds import FeedStore

    t0 = time.perf_counter()
    engines_dir, calib = Path(engines_dir), Path(calib)
    manifest, policy, names = _check_inputs(engines_dir, calib, settings)
    store = FeedStore.open(calib)
    qdq = QdqSettings(settings.method, settings.max_feeds)
    outcomes: dict[str, GraphOutcome] = {}
    emulations: dict[str, Path] = {}
    for i, g in enumerate(names, 1):
        progress(f"[{i}/{len(names)}] {g}: INT8 form ({settings.method} calibration)")
        made = _make_candidate(manifest.graph(g), engines_dir, calib, store, policy, qdq)
        if isinstance(made, GraphOutcome):
            outcomes[g] = made
            progress(f"  {g}: keeps its fp16 form ({'; '.join(made.reasons)})")
        else:
            outcomes[g], emulations[g] = made
    n_items = len(pick_items(store.items, settings.items))
    progress(f"INT8 gate on the CPU over {len(emulations)} form(s), {n_items} calibration item(s) each")
    decisions = _judge(judge, engines_dir, calib, emulations, settings, progress)
    for g, d in decisions.items():
        _apply_decision(outcomes[g], d, manifest.graph(g))
    manifest_path = _record(manifest, engines_dir, calib, outcomes, decisions, settings)
    results = _plans(build, engines_dir, names, settings, progress)
    return Int8Build(outcomes, calib / "int8_gate.json" if outcomes else None, manifest_path, results,
                     time.perf_counter() - t0)


def _make_candidate(entry: GraphEntry, engines_dir: Path, calib: Path, store: Any, policy: Any,
                    qdq: QdqSettings) -> GraphOutcome | tuple[GraphOutcome, Path]:
    """The graph's INT8 form and its emulation written under CALIB/int8/, or its fp16 fallback (with why)."""
    from export.precision_forms import save

    from .fp16_emulation import emulate_form, save_model

    g = entry.name
    if g not in store.graphs:
        return fallback(entry, ["no calibration feeds for this graph"])
    try:
        form = make_int8_form(entry.path(engines_dir), g, store, policy, qdq)
    except ToolkitError as err:
        log.error("%s: INT8 form failed: %s", g, err)
        return fallback(entry, [f"INT8 form failed: {err}"])
    if form is None:
        return fallback(entry, ["nothing to quantize: no MatMul/Gemm/Conv/ConvTranspose with weights outside the "
                                "fp32 islands"])
    path = calib / WORK_DIR / "forms" / f"{g}.onnx"
    save(form.mixed.model, path)
    emulation = save_model(emulate_form(form.mixed.model), calib / WORK_DIR / "emulated" / f"{g}.onnx")
    outcome = GraphOutcome(g, _int8_record(entry, form, path, policy, qdq), INT8, counts=dict(form.counts),
                           seconds=form.seconds)
    log.info("%s: INT8 form %s: %s (%d feeds, %.1f s)", g, path, form.counts, form.feeds, form.seconds)
    return outcome, emulation


def _int8_record(entry: GraphEntry, form: Int8Form, path: Path, policy: Any, qdq: QdqSettings) -> GraphForm:
    """The manifest's record of an accepted form (its file is copied to onnx/int8/ when it is recorded)."""
    from export.graph_checks import external_data_files
    from export.precision_forms import form_file
    from runtime.manifest import sha256_file

    return GraphForm(kind=INT8, file=form_file(entry.name, INT8), sha256=sha256_file(path), made_from=entry.sha256,
                     policy_sha256=policy.sha256(), policy=str(policy.source),
                     external_data={f: sha256_file(path.parent / f) for f in external_data_files(path)},
                     counts=dict(form.counts), recipe=form_recipe(policy.sha256(), qdq, form.feeds_digest),
                     note=f"{qdq.method} calibration over {form.feeds} feed(s)")


def fallback(entry: GraphEntry, reasons: list[str], counts: Mapping[str, int] | None = None,
             metrics: Mapping[str, Any] | None = None) -> GraphOutcome:
    """The graph's fp16 form as its int8 form, with why."""
    fp16 = entry.forms["fp16"]
    note = "fp16 form (no INT8): " + "; ".join(reasons)
    form = dataclasses.replace(fp16, kind=INT8, note=note, recipe="", graph_form=FP16_GRAPH_FORM,
                               counts={**fp16.counts, "quantized_nodes": 0, "quantize_linear": 0, "dequantize_linear": 0})
    return GraphOutcome(entry.name, form, "fp16", list(reasons), dict(counts or {}), dict(metrics or {}))


def _judge(judge: Judge | None, engines_dir: Path, calib: Path, emulations: Mapping[str, Path],
           settings: Int8Settings, progress: Callable[[str], None]) -> dict[str, GateDecision]:
    if not emulations:
        return {}
    if judge is not None:
        return dict(judge(engines_dir, calib, emulations, settings.items, progress, settings.limits))
    return judge_emulations(engines_dir, calib, emulations, settings.items, progress, settings.limits,
                            settings.threads)


def _apply_decision(outcome: GraphOutcome, decision: GateDecision, entry: GraphEntry) -> None:
    """An accepted form stays; a refused graph falls back to its fp16 form, with the gate's reasons."""
    outcome.metrics = dict(decision.metrics)
    if not decision.accepted:
        refused = fallback(entry, [f"refused by the INT8 gate: {'; '.join(decision.reasons)}"], outcome.counts,
                           decision.metrics)
        outcome.form, outcome.status, outcome.reasons = refused.form, refused.status, refused.reasons


def _record(manifest: Manifest, engines_dir: Path, calib: Path, outcomes: Mapping[str, GraphOutcome],
            decisions: Mapping[str, GateDecision], settings: Int8Settings) -> Path:
    """Copy the accepted forms into the export, rewrite the manifest atomically, record the gate."""
    from runtime.manifest import write_manifest

    graphs = dict(manifest.graphs)
    for g, o in outcomes.items():
        if o.status == INT8:
            _install(calib / WORK_DIR / "forms" / f"{g}.onnx", engines_dir / o.form.file, o.form)
        graphs[g] = dataclasses.replace(graphs[g], forms={**graphs[g].forms, INT8: o.form})
    path = write_manifest(dataclasses.replace(manifest, graphs=graphs), engines_dir)
    for g, o in outcomes.items():                  # an earlier run's INT8 file the manifest no longer names
        if o.status != INT8:
            stale = engines_dir / "onnx" / INT8 / f"{g}.onnx"
            stale.unlink(missing_ok=True)
            stale.with_name(stale.name + ".data").unlink(missing_ok=True)
    extra = {g: {"status": o.status, "form": o.form.file, "counts": o.counts, "note": o.form.note}
             for g, o in outcomes.items()}
    decided = {g: decisions.get(g) or GateDecision(False, o.reasons) for g, o in outcomes.items()}
    write_gate_record(calib, settings.limits, decided, extra, judged_on())
    return path


def _install(src: Path, dst: Path, form: GraphForm) -> None:
    """Copy a form file (and its external data) into the export, checking it is the one recorded."""
    from runtime.manifest import sha256_file

    if dst.is_file() and sha256_file(dst) == form.sha256:
        return                                     # already there (int8-gate judges installed forms)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for name in form.external_data:
        shutil.copy2(src.parent / name, dst.parent / name)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    if sha256_file(tmp) != form.sha256:
        tmp.unlink()
        raise InputError(f"{src} changed while the INT8 command ran; run it again")
    tmp.replace(dst)


def _plans(build: Build | None, engines_dir: Path, names: Sequence[str], settings: Int8Settings,
           progress: Callable[[str], None]) -> EngineResults:
    """The int8 TensorRT plans from the recorded forms, or why not here."""
    import engines
    from runtime.manifest import read_manifest

    manifest = read_manifest(engines_dir)
    if build is None:
        ok, reason = engines.available()
        if not ok:
            return EngineResults.all_skipped(names, INT8, reason)

        def build(m: Manifest, out: Path, graphs: Sequence[str]) -> EngineResults:
            return engines.build_all(m, out, INT8, settings.policy_path, settings.workspace_gib, graphs)

    progress(f"building the int8 TensorRT plans of {len(names)} graph(s)")
    try:
        return build(manifest, engines_dir, names)
    except engines.EngineBuildFailures as err:
        log.error("%s", err)
        return err.results


# ---------------------------------------------------------------------------------------------------
# Judging the recorded forms again


def regate_int8(engines_dir: str | Path, calib: str | Path, settings: Int8Settings = Int8Settings(), *,
                progress: Callable[[str], None] = lambda s: None, judge: Judge | None = None) -> Int8Build:
    """`python -m calibration int8-gate`: judge the manifest's INT8 forms (not the fp16 fallbacks) again on
    the CPU; a form now refused falls back to the fp16 form. No plan is built (run `int8` for that)."""
    import onnx

    from runtime.manifest import read_manifest

    from .fp16_emulation import emulate_form, save_model

    t0 = time.perf_counter()
    engines_dir, calib = Path(engines_dir), Path(calib)
    manifest = read_manifest(engines_dir)
    names = [g for g, e in manifest.graphs.items() if INT8 in e.forms and e.forms[INT8].counts.get("quantized_nodes")
             and (settings.graphs is None or g in settings.graphs)]
    if not names:
        raise InputError(f"{engines_dir}: no INT8 forms to judge; make them with python -m calibration int8 "
                         f"--engines {engines_dir} --calib {calib}")
    outcomes, emulations = {}, {}
    for g in names:
        entry = manifest.graph(g)
        form = entry.forms[INT8]
        model = onnx.load(str(engines_dir / form.file))
        emulations[g] = save_model(emulate_form(model), calib / WORK_DIR / "emulated" / f"{g}.onnx")
        outcomes[g] = GraphOutcome(g, form, INT8, counts=dict(form.counts))
    decisions = _judge(judge, engines_dir, calib, emulations, settings, progress)
    for g, d in decisions.items():
        _apply_decision(outcomes[g], d, manifest.graph(g))
    path = _record(manifest, engines_dir, calib, outcomes, decisions, settings)
    skipped = EngineResults.all_skipped(names, INT8, "not rebuilt by int8-gate (python -m calibration int8 builds "
                                                     "the plans)")
    return Int8Build(outcomes, calib / "int8_gate.json", path, skipped, time.perf_counter() - t0)
