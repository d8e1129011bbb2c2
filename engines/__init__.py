"""ONNX -> TensorRT plans (DESIGN.md §5): one plan per graph and precision under `OUT/engines/`.

- `available() -> (bool, reason)`: whether TensorRT and an NVIDIA GPU are usable here. It never
  raises and imports nothing heavy at module level (tensorrt is imported lazily, STYLE.md practice 8),
  so `engines` imports everywhere.
- `build_all(manifest, out, precision, ...)`: every graph's plan, reused when its key (graph, ONNX
  sha256, precision, graph form, profiles, TensorRT version, GPU, precision policy) is unchanged, else built
  (engines/builder.py) as a strongly typed network: the precision is the ONNX graph's (fp32; fp16-mixed with
  explicit Casts around fp32 islands; int8-qdq with Q/DQ nodes), the builder sets none (engines/strong_typing.py).
  -> `EngineResults` (engines/outcome.py): one typed
  `EngineOutcome` per graph (built / reused / failed with the reason). One failed graph does not stop the
  others; the failures are raised together at the end (`EngineBuildFailures`, carrying the results).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from runtime.errors import BackendError, InputError, ToolkitError

from .outcome import EngineOutcome, EngineResults

if TYPE_CHECKING:
    from runtime.manifest import GraphEntry, Manifest
    from runtime.trt.engine_plan import GpuInfo

log = logging.getLogger(__name__)


class EngineBuildFailures(BackendError):
    """Some graphs' plans could not be built. `results`: every graph's outcome; `built`: the plans that are
    ready; `failed`: graph -> reason."""

    def __init__(self, results: EngineResults) -> None:
        self.results = results
        self.built, self.failed = results.plans, results.failed
        lines = "\n".join(f"  - {name}: {why}" for name, why in self.failed.items())
        super().__init__(f"{len(self.failed)} engine(s) failed to build ({len(self.built)} ready):\n{lines}")


def graph_file(manifest: "Manifest", name: str, settings: Any) -> "GraphEntry":
    """The manifest entry of the ONNX file a plan of `name` is built from: the graph's form of the build's
    precision (fp32: the graph itself; fp16: its mixed-precision form; int8: its Q/DQ form), whose precision
    policy must be the build's (the policy enters the plan's key; a form made with another policy would be
    recorded under the wrong one). A missing form is a CheckpointError naming the command that makes it."""
    entry = manifest.graph(name)
    if settings.precision == "fp32":
        return entry
    view = entry.form(settings.precision)
    made_with = entry.forms[settings.precision].policy_sha256
    if made_with != settings.policy.sha256():
        raise InputError(f"graph '{name}': its {settings.precision} form was made with another precision policy "
                         f"({made_with[:12]}) than this build's {settings.policy.source} "
                         f"({settings.policy.sha256()[:12]}); re-run python -m export.build --precision fp16 with the "
                         "same --precision-policy")
    return view


def available() -> tuple[bool, str]:
    """(True, description) when TensorRT imports and a CUDA GPU is visible, else (False, reason).

    The probe itself is runtime.trt.gpu's, shared with the runtime's backend choice."""
    from runtime.trt.gpu import tensorrt

    probe = tensorrt()
    return probe.ok, probe.detail


def build_all(manifest: "Manifest", out: str | Path, precision: str, policy_path: str | Path | None = None,
              workspace_gib: float = 4.0, graphs: Sequence[str] | None = None, *, trt: Any = None,
              gpu: "GpuInfo | None" = None) -> EngineResults:
    """Build (or reuse) one plan per graph of `manifest` (or of `graphs`) under `out/engines/`.

    `policy_path`: the precision policy file the mixed-precision graphs were made with (e.g. a calibration
    run's precision_policy.json; default: the shipped one), part of the plans' keys; `workspace_gib`:
    TensorRT's workspace pool limit. `trt` / `gpu` replace the tensorrt module and the GPU identity (tests).
    -> one outcome per graph (built or reused, with its plan), in manifest order. Raises
    EngineBuildFailures (with every outcome, the failed ones with their reason) after trying every graph."""
    from runtime.trt.api import import_tensorrt
    from runtime.trt.engine_plan import PRECISIONS

    from .builder import GIB, BuildSettings, ensure_plan
    from .precision import load_policy

    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    names = list(graphs) if graphs else list(manifest.graphs)
    unknown = [n for n in names if n not in manifest.graphs]
    if unknown:
        raise InputError(f"graphs {unknown} are not in the manifest (it has: {', '.join(manifest.graphs)})")
    if workspace_gib <= 0:
        raise InputError(f"workspace {workspace_gib} GiB: must be positive")
    settings = BuildSettings(precision, load_policy(policy_path), int(workspace_gib * GIB))
    trt = trt if trt is not None else import_tensorrt()
    if gpu is None:
        from runtime.trt.gpu import gpu_info

        gpu = gpu_info(settings.device)
        if gpu is None:
            raise BackendError(f"no usable CUDA GPU (device {settings.device}): TensorRT engines cannot be built here")
    log.info("engines: %s, TensorRT %s on %s, policy %s", precision, trt.__version__, gpu.describe(),
             settings.policy.source if precision != "fp32" else "-")
    outcomes: list[EngineOutcome] = []
    for i, name in enumerate(names, 1):
        tag = f"[{i}/{len(names)}] {name}"
        t0 = time.perf_counter()
        try:
            entry = graph_file(manifest, name, settings)
            # a graph the INT8 gate refused has its fp16 form as int8 form: built (and keyed) as what it is
            here = dataclasses.replace(settings, graph_form=entry.graph_form) if entry.graph_form else settings
            outcome = ensure_plan(entry, out, here, trt=trt, gpu=gpu, tag=tag)
        except Exception as err:  # noqa: BLE001 — reported per graph; the others are still built
            log.error("%s: engine FAILED after %.1f s: %s", tag, time.perf_counter() - t0, err,
                      exc_info=not isinstance(err, ToolkitError))
            outcomes.append(EngineOutcome(name, "failed", f"{type(err).__name__}: {err}"))
            continue
        outcomes.append(EngineOutcome(name, "reused" if outcome.reused else "built", plan=outcome.plan))
    results = EngineResults(precision, tuple(outcomes), f"TensorRT {trt.__version__} on {gpu.describe()}")
    if not results.ok:
        raise EngineBuildFailures(results)
    return results
