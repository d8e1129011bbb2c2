"""Backends and the set of executors one synthesizer uses.

`--backend` names: `ort-cpu`, `ort-cuda`, `trt`, `ov-cpu` (OpenVINO on the CPU, runtime/executors/openvino.py),
`cpu-auto` (per graph what the export's CPU plan chose: ONNX Runtime or OpenVINO, float32 or bf16;
runtime/cpu_plan.py), and `auto` (trt > ort-cuda > cpu-auto > ort-cpu: the first that can really run here;
cpu-auto only when a plan measured on this CPU for this export is there). `backend_status` says for each
whether it can run and why not; `GraphSet` opens one executor per graph lazily (a graph nobody calls is
never loaded) and keeps it. What a synthesizer opens — these executors plus the GPT steps, all at load —
is runtime/backend.py:open_backend.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

from runtime.errors import BackendError, InputError
from runtime.executors.base import Executor, Feed, check_feed
from runtime.executors.gpt_session import SharedGptSession, shared_gpt_usable
from runtime.executors.ort import (
    OrtExecutor,
    OrtOptions,
    cuda_provider_available,
    import_ort,
)
from runtime.manifest import Manifest, read_manifest
from runtime.trt.engine_plan import ENGINES_DIR, plan_paths
from runtime.trt.gpu import Probe, cuda_devices, tensorrt

if TYPE_CHECKING:
    from runtime.cpu_plan import CpuPlan

log = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort-cuda", "cpu-auto", "ov-cpu", "ort-cpu")
AUTO_ORDER = ("trt", "ort-cuda", "cpu-auto", "ort-cpu")
#: the backends whose graph form is always the float32 ONNX file (OpenVINO's bf16 is a compile hint)
CPU_PLAN_BACKENDS = ("cpu-auto", "ov-cpu")
#: graphs whose TensorRT executor replays CUDA graphs (gpt_decode's is opened by runtime/trt/gpt_steps.py)
CUDA_GRAPH_GRAPHS = ("dit_step",)

__all__ = ["BACKENDS", "Executor", "Feed", "GraphSet", "OrtExecutor", "OrtOptions", "backend_status",
           "check_feed", "graph_form", "open_executor", "resolve_backend"]


def backend_status(backend: str, root: str | Path | None = None, precision: str | None = None) -> Probe:
    """Whether `backend` can run the graphs of the export directory `root` here (never raises).
    `precision`: the TensorRT plans to look for (default: the manifest's); on ov-cpu the bf16 hint."""
    if backend == "ov-cpu":
        return _openvino_status(precision)
    if backend == "cpu-auto":
        return _cpu_plan_status(root)
    if backend == "ort-cpu":
        try:
            ort = import_ort()
        except BackendError as err:
            return Probe(False, str(err))
        return Probe(True, f"onnxruntime {ort.__version__}, CPU")
    if backend == "ort-cuda":
        if not cuda_provider_available():
            return Probe(False, "this onnxruntime has no CUDA execution provider (needs onnxruntime-gpu)")
        gpu = cuda_devices()
        return Probe(gpu.ok, f"onnxruntime CUDA provider, {gpu.detail}" if gpu.ok else gpu.detail)
    if backend == "trt":
        probe = tensorrt()
        if not probe.ok:
            return probe
        if root is None:
            return probe
        try:
            manifest = read_manifest(root, check_files=False)
        except Exception as err:  # noqa: BLE001 — a probe reports, it never raises
            return Probe(False, f"no readable manifest in {root} ({err})")
        precision = precision or manifest.precision
        missing = [g for g in manifest.graphs if not plan_paths(root, g, precision)[0].is_file()]
        if missing:
            return Probe(False, f"no {precision} TensorRT engines for {', '.join(missing)} in "
                                f"{Path(root) / ENGINES_DIR} (build them with python -m export.build on this GPU machine)")
        return Probe(True, f"{probe.detail}, {precision} engines")
    return Probe(False, f"unknown backend {backend!r}")


def _openvino_status(precision: str | None = None) -> Probe:
    from runtime.executors.openvino import cpu_capabilities, import_ov

    try:
        ov = import_ov()
        caps = cpu_capabilities()
    except Exception as err:  # noqa: BLE001 — a probe reports, it never raises
        return Probe(False, str(err))
    if precision == "bf16" and "BF16" not in caps:
        return Probe(False, f"openvino {ov.__version__}: this CPU has no bf16 support ({', '.join(caps)})")
    return Probe(True, f"openvino {ov.__version__}, CPU ({', '.join(caps)})")


def _cpu_plan_status(root: str | Path | None) -> Probe:
    from runtime.cpu_plan import read_plan

    if root is None:
        return Probe(False, "needs an export directory with a CPU plan (python -m benchmarks.cpu_plan)")
    try:
        plan = read_plan(root, read_manifest(root, check_files=False))
    except Exception as err:  # noqa: BLE001 — a probe reports, it never raises
        return Probe(False, str(err))
    for backend in sorted(plan.backends):
        status = backend_status(backend)
        if not status.ok:
            return Probe(False, f"the CPU plan runs graphs on {backend}, which cannot run here: {status.detail}")
    chosen = [f"{g} {p.choice.label}" for g, p in plan.graphs.items() if p.choice.label != "ort-cpu fp32"]
    return Probe(True, "CPU plan: " + (", ".join(chosen) + "; the rest ort-cpu fp32" if chosen
                                       else "every graph on ort-cpu fp32"))


def resolve_backend(requested: str, root: str | Path | None = None, precision: str | None = None) -> str:
    """The backend to use for `requested` ('auto' picks the first usable of trt, ort-cuda, ort-cpu)."""
    if requested not in BACKENDS:
        raise InputError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if precision == "bf16" and requested != "ov-cpu":
        raise InputError(f"precision bf16 is OpenVINO's precision hint: it runs on --backend ov-cpu (or per graph, "
                         f"where the CPU plan chose it, on cpu-auto), not on {requested}")
    if requested != "auto":
        status = backend_status(requested, root, precision)
        if not status.ok:
            raise BackendError(f"backend {requested} cannot run here: {status.detail}")
        return requested
    reasons = []
    for name in AUTO_ORDER:
        status = backend_status(name, root, precision)
        if status.ok:
            log.info("backend auto -> %s (%s)", name, status.detail)
            return name
        reasons.append(f"{name}: {status.detail}")
    raise BackendError("no backend can run here:\n  " + "\n  ".join(reasons))


def graph_form(manifest: Manifest, name: str, backend: str, precision: str | None = None) -> str:
    """Which form of graph `name` a backend runs ("fp32", "fp16", "int8"; manifest.GraphForm).

    trt and ort-cuda run the form of the engine precision (`precision`, default the export's), so both
    compute the same graph; ort-cuda falls back to float32 (with a warning) when an older export has no
    such form. ort-cpu runs float32 unless a precision is asked for explicitly: ONNX Runtime's CPU provider
    computes fp16 nodes in float32 anyway (engines/mixed_precision.py), so the fp16 form is only slower there,
    but it can be run for a parity check."""
    entry = manifest.graph(name)
    if backend in CPU_PLAN_BACKENDS:          # OpenVINO reads the float32 graph; bf16 is its compile hint
        return "fp32"
    if backend == "ort-cpu":
        return precision or "fp32"
    kind = precision or manifest.precision
    if backend == "ort-cuda" and kind != "fp32" and kind not in entry.forms:
        log.warning("%s: this export has no %s form (exported before precision moved into the graphs); ONNX Runtime "
                    "CUDA runs the float32 graph — re-run python -m export.build --precision fp16", name, kind)
        return "fp32"
    return kind


def open_executor(manifest: Manifest, root: str | Path, name: str, backend: str,
                  ort_options: OrtOptions = OrtOptions(), precision: str | None = None,
                  plan: "CpuPlan | None" = None, shared: SharedGptSession | None = None) -> Executor:
    """One graph's executor on `backend`. ov-cpu: OpenVINO with the `precision` hint (fp32 | bf16, default
    fp32); cpu-auto: what `plan` chose for the graph. `shared`: the one ONNX Runtime session of the GPT
    graphs (runtime/executors/gpt_session.py); a GPT graph on ort-cpu float32 runs as its branch."""
    if backend not in BACKENDS or backend == "auto":
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    entry = manifest.graph(name).form(graph_form(manifest, name, backend, precision))
    if backend == "cpu-auto":
        if plan is None:
            raise InputError("backend cpu-auto needs the export's CPU plan (runtime/cpu_plan.py read_plan)")
        choice = plan.choice(name)
        backend, precision = choice.backend, choice.precision
        if precision == "int8w":             # the plan's weight-only int8 form, in a session of its own
            return OrtExecutor(plan.graphs[name].entry(entry), root, "ort-cpu", ort_options)
    if backend == "ov-cpu":
        from runtime.executors.openvino import OvExecutor, OvOptions

        hint = precision or "fp32"
        if hint not in ("fp32", "bf16"):
            raise InputError(f"ov-cpu runs the float32 graphs in fp32 or bf16 (OpenVINO's precision hint), not {hint!r}")
        return OvExecutor(entry, root, OvOptions(threads=ort_options.intra_op_threads, precision=hint))
    if backend == "ort-cpu" and shared is not None and name in shared.branches and entry.form_kind == "fp32":
        return shared.executor(entry)
    if backend in ("ort-cpu", "ort-cuda"):
        return OrtExecutor(entry, root, backend, ort_options)
    from runtime.trt.executor import TrtExecutor

    # static shapes for all 25 steps of a segment: the Euler step is replayed from a CUDA graph
    return TrtExecutor(entry, root, precision or manifest.precision, cuda_graphs=name in CUDA_GRAPH_GRAPHS)


class GraphSet(Mapping[str, Executor]):
    """The executors of one export directory on one backend, opened on first use (thread-safe)."""

    def __init__(self, manifest: Manifest, root: str | Path, backend: str,
                 ort_options: OrtOptions = OrtOptions(), precision: str | None = None,
                 plan: "CpuPlan | None" = None) -> None:
        self.manifest, self.root, self.backend, self.ort_options = manifest, Path(root), backend, ort_options
        self.precision = precision
        self.plan = plan
        if backend == "cpu-auto" and plan is None:
            from runtime.cpu_plan import read_plan

            self.plan = read_plan(root, manifest)
        self._open: dict[str, Executor] = {}
        self._lock = threading.Lock()
        # the GPT graphs in one ONNX Runtime session (their weights held once), opened with the first of them
        self._shared: SharedGptSession | None = None
        self._use_shared = backend in ("ort-cpu", "cpu-auto") and (precision or "fp32") == "fp32" \
            and shared_gpt_usable(manifest, root)

    def __getitem__(self, name: str) -> Executor:
        with self._lock:
            if name not in self._open:
                if self._use_shared and self._shared is None and name in self.manifest.shared_gpt.branches \
                        and (self.plan is None or self.plan.choice(name).label == "ort-cpu fp32"):
                    self._shared = SharedGptSession(self.manifest, self.root, self.ort_options)
                self._open[name] = open_executor(self.manifest, self.root, name, self.backend, self.ort_options,
                                                 self.precision, self.plan, self._shared)
            return self._open[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.graphs)

    def __len__(self) -> int:
        return len(self.manifest.graphs)

    @property
    def opened(self) -> tuple[str, ...]:
        """The graphs whose executors are open now, in opening order."""
        with self._lock:
            return tuple(self._open)

    def open_all(self, exclude: tuple[str, ...] = ()) -> None:
        """Load every graph now (benchmarks and servers: no first-request loading delay)."""
        for name in self.manifest.graphs:
            if name not in exclude:
                self[name]

    def close(self) -> None:
        """Free what the executors hold (device memory for TensorRT); they cannot be used afterwards."""
        with self._lock:
            for executor in self._open.values():
                close = getattr(executor, "close", None)
                if close is not None:
                    close()
            self._open.clear()
            if self._shared is not None:
                self._shared.close()
                self._shared = None
