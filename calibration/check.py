"""The shipped fp16 graphs held to the calibration's bounds on feeds the analysis did not see.

    python -m calibration check --engines OUT --calib CALIB [--feeds 2] [--threads N]

Per graph with an fp16 form in OUT's manifest and a bound in CALIB/fp16_bounds.json:
- plain ONNX Runtime CPU: the form itself is loaded and run once (does it run here at all; the error,
  naming the operator, if not). Its numbers are not the fp16 numbers: the CPU provider computes many fp16
  nodes in float32;
- the bounds: the form's emulation (fp16_emulation.emulate_form: every fp16 result rounded, as TensorRT
  computes it) against the float32 graph on up to `--feeds` held-out feeds (the store's records after the
  ones the analysis used; a graph whose every feed was analysed is checked on those, and says so), each
  output within bounds.OutputBound.limit().
Written to CALIB/fp16_check.json; the report (calibration/report.py) shows it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from runtime.errors import InputError
from runtime.manifest import read_manifest

from .bounds import BOUNDS_NAME, deviation, problems, read_bounds
from .feeds import FeedStore
from .fp16_emulation import emulate_form, save_model, session

log = logging.getLogger(__name__)

CHECK_NAME = "fp16_check.json"


@dataclass
class GraphCheck:
    graph: str
    runs_on_ort_cpu: bool
    ort_cpu_error: str = ""
    held_out: bool = True                  # False: every feed was analysed; checked on those
    feeds: int = 0
    worst: dict[str, float] = field(default_factory=dict)    # output -> worst rel. error (float) / agreement (int)
    limits: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_graph(graph: str, fp32_path: Path, form_path: Path, store: FeedStore, bounds: dict, analysed: int,
                feeds: int, threads: int | None) -> GraphCheck:
    t0 = time.perf_counter()
    records = store.records(graph)
    held = records[analysed:]
    result = GraphCheck(graph, True, held_out=bool(held))
    held = (held or records)[:feeds]
    ref_sess = session(fp32_path, threads)
    inputs = {i.name for i in ref_sess.get_inputs()}
    names = [o.name for o in ref_sess.get_outputs()]
    try:
        plain = session(form_path, threads)
        first = {k: v for k, v in store.load(held[0]).items() if k in inputs}
        plain.run(None, first)
        del plain
    except Exception as err:  # noqa: BLE001 — what ONNX Runtime says is the finding
        result.runs_on_ort_cpu = False
        result.ort_cpu_error = str(err).splitlines()[0][:300]
    # through a file: an emulated form may exceed one protobuf's 2 GB (the 2.5 prefill's 60 510-row text table
    # in float32 beside the GPT's weights), which ONNX Runtime cannot take as bytes
    with tempfile.TemporaryDirectory(prefix=f"check-{graph}-") as tmp:
        emu_path = save_model(emulate_form(onnx.load(str(form_path))), Path(tmp) / f"{graph}.onnx")
        emu_sess = session(emu_path, threads)
        for record in held:
            feed = {k: v for k, v in store.load(record).items() if k in inputs}
            ref = dict(zip(names, ref_sess.run(None, feed)))
            emu = dict(zip(names, emu_sess.run(None, feed)))
            result.problems += problems(graph, bounds, ref, emu)
            for name, bound in bounds.items():
                kind, value = deviation(ref[name], emu[name])
                prev = result.worst.get(name)
                worse = max if kind == "float" else min
                result.worst[name] = value if prev is None else worse(prev, value)
                result.limits[name] = bound.limit()
            result.feeds += 1
        del emu_sess
    result.seconds = time.perf_counter() - t0
    return result


def check_shipped(engines: str | Path, calib: str | Path, feeds: int = 2, threads: int | None = None,
                  progress: Callable[[str], None] = lambda s: None) -> list[GraphCheck]:
    engines, calib = Path(engines), Path(calib)
    bounds_path = calib / BOUNDS_NAME
    if not bounds_path.is_file():
        raise InputError(f"{bounds_path}: no fp16 bounds; run python -m calibration analyze first")
    if feeds < 1:
        raise InputError(f"--feeds must be >= 1, got {feeds}")
    record = json.loads(bounds_path.read_text(encoding="utf-8"))
    bounds = read_bounds(bounds_path)
    manifest = read_manifest(engines)
    store = FeedStore.open(calib)
    results = []
    for graph, entry in manifest.graphs.items():
        form = entry.forms.get("fp16")
        if form is None or graph not in bounds or graph not in store.graphs:
            continue
        if form.policy_sha256 != record.get("policy_sha256"):
            log.warning("%s: its fp16 form was made with policy %s, the bounds with %s", graph,
                        form.policy_sha256[:12], str(record.get("policy_sha256"))[:12])
        progress(f"checking {graph}")
        analysed = int(record.get("feeds", {}).get(graph, 0))
        results.append(check_graph(graph, entry.path(engines), engines / form.file, store, bounds[graph], analysed,
                                   feeds, threads))
        r = results[-1]
        progress(f"{graph}: {'within bounds' if r.ok else 'OUT OF BOUNDS'} on {r.feeds} "
                 f"{'held-out' if r.held_out else 'analysed'} feed(s); ORT CPU "
                 f"{'runs it' if r.runs_on_ort_cpu else 'cannot: ' + r.ort_cpu_error} ({r.seconds:.0f} s)")
    (calib / CHECK_NAME).write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n", encoding="utf-8")
    return results
