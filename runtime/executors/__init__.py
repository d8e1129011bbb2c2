"""Backends and the set of executors one synthesizer uses.

`--backend` names: `ort-cpu`, `ort-cuda`, `trt`, and `auto` (trt > ort-cuda > ort-cpu: the first that
can really run here). `backend_status` says for each whether it can run and why not; `GraphSet` opens
one executor per graph lazily (a graph nobody calls is never loaded) and keeps it. What a synthesizer
opens — these executors plus the GPT steps, all at load — is runtime/backend.py:open_backend.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterator, Mapping

from runtime.errors import BackendError, InputError
from runtime.executors.base import Executor, Feed, check_feed
from runtime.executors.ort import (
    OrtExecutor,
    OrtOptions,
    cuda_provider_available,
    import_ort,
)
from runtime.manifest import Manifest, read_manifest
from runtime.trt.engine_plan import ENGINES_DIR, plan_paths
from runtime.trt.gpu import Probe, cuda_devices, tensorrt

log = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort-cuda", "ort-cpu")
AUTO_ORDER = ("trt", "ort-cuda", "ort-cpu")
#: graphs whose TensorRT executor replays CUDA graphs (gpt_decode's is opened by runtime/trt/gpt_steps.py)
CUDA_GRAPH_GRAPHS = ("dit_step",)

__all__ = ["BACKENDS", "Executor", "Feed", "GraphSet", "OrtExecutor", "OrtOptions", "backend_status",
           "check_feed", "graph_form", "open_executor", "resolve_backend"]


def backend_status(backend: str, root: str | Path | None = None, precision: str | None = None) -> Probe:
    """Whether `backend` can run the graphs of the export directory `root` here (never raises).
    `precision`: the TensorRT plans to look for (default: the manifest's)."""
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


def resolve_backend(requested: str, root: str | Path | None = None, precision: str | None = None) -> str:
    """The backend to use for `requested` ('auto' picks the first usable of trt, ort-cuda, ort-cpu)."""
    if requested not in BACKENDS:
        raise InputError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
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
    if backend == "ort-cpu":
        return precision or "fp32"
    kind = precision or manifest.precision
    if backend == "ort-cuda" and kind != "fp32" and kind not in entry.forms:
        log.warning("%s: this export has no %s form (exported before precision moved into the graphs); ONNX Runtime "
                    "CUDA runs the float32 graph — re-run python -m export.build --precision fp16", name, kind)
        return "fp32"
    return kind


def open_executor(manifest: Manifest, root: str | Path, name: str, backend: str,
                  ort_options: OrtOptions = OrtOptions(), precision: str | None = None) -> Executor:
    if backend not in BACKENDS or backend == "auto":
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    entry = manifest.graph(name).form(graph_form(manifest, name, backend, precision))
    if backend in ("ort-cpu", "ort-cuda"):
        return OrtExecutor(entry, root, backend, ort_options)
    from runtime.trt.executor import TrtExecutor

    # static shapes for all 25 steps of a segment: the Euler step is replayed from a CUDA graph
    return TrtExecutor(entry, root, precision or manifest.precision, cuda_graphs=name in CUDA_GRAPH_GRAPHS)


class GraphSet(Mapping[str, Executor]):
    """The executors of one export directory on one backend, opened on first use (thread-safe)."""

    def __init__(self, manifest: Manifest, root: str | Path, backend: str,
                 ort_options: OrtOptions = OrtOptions(), precision: str | None = None) -> None:
        self.manifest, self.root, self.backend, self.ort_options = manifest, Path(root), backend, ort_options
        self.precision = precision
        self._open: dict[str, Executor] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Executor:
        with self._lock:
            if name not in self._open:
                self._open[name] = open_executor(self.manifest, self.root, name, self.backend, self.ort_options,
                                                 self.precision)
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
