"""One opened backend: the graph executors and the GPT steps a synthesizer runs, and who closes them.

Why one object: which executor runs which graph, and who keeps the GPT's KV cache, is the backend's
business, decided here once — the synthesizer (runtime/synthesizer.py) only reads `graphs` and
`gpt_steps`, whatever the backend. On `ort-cpu` / `ort-cuda` the GPT steps are GraphGptSteps over the
graph set's own `gpt_prefill` / `gpt_decode` executors (host cache). On `trt` they are TrtGptSteps
(runtime/trt/gpt_steps.py): both GPT engines on one stream, the cache on the device, the decode step
replayed from CUDA graphs; the graph set then opens every other graph (it would open a separate
executor of a GPT graph only if asked for one by name, as the benchmarks do to time the prefill alone).

Everything is opened by `open_backend`, so a missing, corrupt or mismatched file fails at load, not in
the middle of a request. Injected executors (the eager torch executors for parity, calibration's and the
benchmarks' recording wrappers) become a Backend through `Backend.from_executors`, with GraphGptSteps over
them.

Ownership: `close()` closes the GPT steps first (they run on the executors), then what the backend
opened (`owned`, e.g. the graph set); executors handed to `from_executors` stay their caller's unless the
caller passes their owner in `owned`. `close()` may be called more than once.

This module sits above runtime/executors and runtime/gpt because it composes both (runtime/gpt/graph_steps
imports runtime/executors, so it cannot live inside that package without an import cycle).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from runtime.contracts import graph_names
from runtime.errors import ContractError
from runtime.executors import GraphSet, OrtOptions, backend_status, resolve_backend
from runtime.executors.base import Executor
from runtime.gpt.graph_steps import GraphGptSteps, geometry_of
from runtime.gpt.steps import GptSteps
from runtime.manifest import Manifest

log = logging.getLogger(__name__)

#: the graphs the GPT steps run (on trt they are opened by the steps, not by the graph set)
STEP_GRAPHS = ("gpt_prefill", "gpt_decode")


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass
class Backend:
    """What one synthesizer runs: `graphs` by contract name, `gpt_steps` for the decode loop.

    `name`: the resolved backend (`ort-cpu`, `ort-cuda`, `trt`; for injected executors their `backend`
    attribute, joined with '+' when they differ). `owned`: closed after the GPT steps, in order.
    """

    name: str
    graphs: Mapping[str, Executor]
    gpt_steps: GptSteps
    owned: tuple[Closeable, ...] = ()
    _closed: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_executors(cls, manifest: Manifest, executors: Mapping[str, Executor], *,
                       owned: Sequence[Closeable] = (), name: str | None = None) -> "Backend":
        """A Backend over given executors (every graph of the synthesizer, GPT steps included): GraphGptSteps
        over their `gpt_prefill` / `gpt_decode`. The executors are not closed unless their owner is in `owned`."""
        names = graph_names(manifest.version)
        missing = [g for g in names if g not in executors]
        if missing:
            raise ContractError(f"the given executors have no graph(s) {missing}; synthesis runs all of "
                                f"{', '.join(names)} (pass one executor per graph, keyed by its name)")
        steps = GraphGptSteps(executors["gpt_prefill"], executors["gpt_decode"], geometry_of(manifest))
        return cls(name or _backend_name(executors), executors, steps, tuple(owned))

    def close(self) -> None:
        """Close the GPT steps, then what the backend owns; the second call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.gpt_steps.close()
        finally:
            _close_all(self.owned)

    @property
    def closed(self) -> bool:
        return self._closed


def open_backend(manifest: Manifest, root: str | Path, backend: str = "auto", *,
                 ort_options: OrtOptions = OrtOptions(), precision: str | None = None,
                 cpu_plan_fallback: bool = False) -> Backend:
    """Open every graph of the export directory `root` on `backend` (runtime.executors.BACKENDS) now.

    `precision`: which graph form to run (runtime.executors.graph_form; default: the manifest's on trt /
    ort-cuda, fp32 on ort-cpu; on ov-cpu the OpenVINO precision hint, fp32 or bf16). `cpu_plan_fallback`:
    on cpu-auto, run ONNX Runtime float32 (with a warning) when the export has no CPU plan valid here,
    instead of refusing. Raises what the first file that cannot be opened raises, after closing whatever
    was already open.
    """
    require_graphs(manifest, root)
    if backend == "cpu-auto" and cpu_plan_fallback:
        status = backend_status("cpu-auto", root)
        if not status.ok:
            log.warning("cpu-auto: %s\nrunning ONNX Runtime float32 instead (asked for: --cpu-plan-fallback)",
                        status.detail)
            backend = "ort-cpu"
    name = resolve_backend(backend, root, precision)
    graph_set = GraphSet(manifest, root, name, ort_options, precision)
    steps: GptSteps | None = None
    try:
        if name == "trt":           # the KV cache stays on the GPU; the steps open both GPT engines
            from runtime.trt.gpt_steps import open_trt_gpt_steps

            steps = open_trt_gpt_steps(manifest, root, precision)
            graph_set.open_all(exclude=STEP_GRAPHS)
        else:
            graph_set.open_all()
            steps = GraphGptSteps(graph_set["gpt_prefill"], graph_set["gpt_decode"], geometry_of(manifest))
    except BaseException:
        _close_all((*((steps,) if steps is not None else ()), graph_set))
        raise
    log.info("backend %s: %d graph(s) open, GPT steps %s", name, len(graph_set.opened), type(steps).__name__)
    return Backend(name, graph_set, steps, (graph_set,))


def require_graphs(manifest: Manifest, root: str | Path) -> None:
    """ContractError unless the export directory has every graph synthesis runs."""
    names = graph_names(manifest.version)
    missing = [g for g in names if g not in manifest.graphs]
    if missing:
        raise ContractError(f"{root}: the manifest has no graph(s) {missing}; synthesis needs all of "
                            f"{', '.join(names)} (python -m export.build --checkpoints CKPT --out "
                            f"{root} --graphs {','.join(missing)})")


def _backend_name(executors: Mapping[str, Executor]) -> str:
    names = sorted({str(ex.backend) for ex in executors.values()})
    return "+".join(names) if names else "custom"


def _close_all(objects: Sequence[Closeable]) -> None:
    """Close each in order; every one is closed even if an earlier one raises (the first error is raised)."""
    error: BaseException | None = None
    for obj in objects:
        try:
            obj.close()
        except BaseException as err:  # noqa: BLE001 — re-raised below, after the others are closed
            error = error or err
    if error is not None:
        raise error
