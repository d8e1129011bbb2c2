"""The OpenVINO executor: one compiled model per graph on the CPU, with a precision hint per graph.

Why OpenVINO beside ONNX Runtime: on CPUs with bf16 units (AVX512-BF16, AMX) OpenVINO runs a float32
graph in bf16 when asked (`INFERENCE_PRECISION_HINT`), which ONNX Runtime's CPU provider cannot do, and
the DiT step is compute-bound there. It is not faster everywhere (the GPT decode step and BigVGAN are not,
issue 22), so which graph runs where is a per-graph plan (runtime/cpu_plan.py), and this executor only
runs what it is told.

It reads the same float32 ONNX file ONNX Runtime does (OpenVINO's ONNX frontend, external data
included), so there is nothing to export. The checks are the ORT executor's: feeds through BaseExecutor,
the file's identity from its ONNX metadata (OpenVINO keeps the metadata under the model's `framework`
rt_info), inputs and outputs by name in contract order.

`precision`: "fp32" (OpenVINO's f32, the ORT result within ~1e-7) or "bf16" (matmuls and convolutions in
bf16 with float32 accumulation; its error is what calibration's gates measure before a plan may use it).
A bf16 hint on a CPU without bf16 support is refused here, not silently run in f32.

Outputs are copied out of OpenVINO's own tensors (or into the caller's buffers): an infer request reuses
its output memory on the next run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.errors import BackendError, CheckpointError, ContractError, EngineMismatchError
from runtime.executors.base import BaseExecutor, Feed
from runtime.manifest import GraphEntry

log = logging.getLogger(__name__)

#: the precisions this executor offers -> OpenVINO's `INFERENCE_PRECISION_HINT` value
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
INSTALL_HINT = "pip install openvino (or the project's `cpu` extra)"


@dataclass(frozen=True)
class OvOptions:
    """Compile settings of one graph. `threads` None/0 = OpenVINO's default (every core); `precision` its hint
    (a plan's per-graph choices reach here one executor at a time, runtime/executors/__init__.py)."""

    threads: int | None = None
    precision: str = "fp32"


def import_ov() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise BackendError(f"openvino is not installed: {INSTALL_HINT}") from err
    return openvino


_CORE: Any = None


def ov_core() -> Any:
    """One OpenVINO Core per process (it owns the plugins; creating one loads them)."""
    global _CORE
    if _CORE is None:
        _CORE = import_ov().Core()
    return _CORE


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's CPU optimization capabilities here ("FP32", "BF16", "INT8", ...)."""
    return tuple(str(c) for c in ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def compile_config(options: OvOptions, graph: str) -> dict[str, Any]:
    precision = options.precision
    if precision not in OV_PRECISIONS:
        raise BackendError(f"graph '{graph}': OpenVINO precision {precision!r} is not one of {', '.join(OV_PRECISIONS)}")
    if precision == "bf16" and "BF16" not in cpu_capabilities():
        raise BackendError(f"graph '{graph}': bf16 was asked for, but this CPU has no bf16 support in OpenVINO "
                           f"(capabilities: {', '.join(cpu_capabilities())}); run it in f32")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = int(options.threads)
    return config


class OvExecutor(BaseExecutor):
    """One graph of an export directory compiled by OpenVINO for the CPU (`backend` "ov-cpu")."""

    backend = "ov-cpu"

    def __init__(self, entry: GraphEntry, root: str | Path, options: OvOptions = OvOptions()) -> None:
        super().__init__()
        self.name, self.entry = entry.name, entry
        self.precision = options.precision
        path = entry.path(root)
        if not path.is_file():
            raise CheckpointError(f"graph '{entry.name}': {path} is missing; rebuild with python -m export.build")
        core = ov_core()
        config = compile_config(options, entry.name)
        t0 = time.perf_counter()
        try:
            model = core.read_model(str(path))
        except Exception as err:  # noqa: BLE001 — OpenVINO raises RuntimeError for any bad file
            raise CheckpointError(f"graph '{entry.name}': OpenVINO cannot read {path}: {err}") from err
        self._check_identity(model, path)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as err:  # noqa: BLE001
            raise BackendError(f"graph '{entry.name}': OpenVINO cannot compile {path} for the CPU: {err}") from err
        del model                           # the compiled model holds its own (converted) weights
        self._request = self.compiled.create_infer_request()
        self._output_names = [t.name for t in entry.outputs]
        self._output_dtypes = [np.dtype(t.dtype) for t in entry.outputs]
        self._closed = False
        log.info("%s: OpenVINO CPU %s in %.2f s", entry.name, self.precision, time.perf_counter() - t0)

    def _check_identity(self, model: Any, path: Path) -> None:
        def meta(key: str) -> str | None:
            where = ["framework", key]
            return str(model.get_rt_info(where).astype(str)) if model.has_rt_info(where) else None

        graph, fingerprint = meta("indextts2.graph"), meta("indextts2.fingerprint")
        if graph != self.entry.name or fingerprint != self.entry.fingerprint:
            raise EngineMismatchError(
                f"graph '{self.entry.name}': {path} was not produced by the build this manifest describes "
                f"(its metadata says graph {graph!r}, fingerprint {str(fingerprint)[:12]}..., the manifest "
                f"{self.entry.fingerprint[:12]}...); rebuild with python -m export.build")
        inputs = tuple(p.get_node().get_friendly_name() for p in model.inputs)
        outputs = tuple(next(iter(o.get_names()), "") for o in model.outputs)
        want_in = tuple(t.name for t in self.entry.inputs)
        want_out = tuple(t.name for t in self.entry.outputs)
        if inputs != want_in or outputs != want_out:
            raise ContractError(f"graph '{self.entry.name}': {path} has inputs {inputs} and outputs {outputs}, "
                                f"the manifest says {want_in} -> {want_out}")

    def _ensure_open(self) -> None:
        if self._closed:
            raise BackendError(f"graph '{self.name}': this OpenVINO executor was closed")

    def _run(self, feed: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray], checked: object) -> Feed:
        try:
            # share_inputs: OpenVINO reads the caller's arrays in place (they stay unchanged until run returns)
            self._request.infer(feed, share_inputs=True)
        except Exception as err:  # noqa: BLE001 — OpenVINO's exception types are not part of our API
            raise BackendError(f"graph '{self.name}': OpenVINO failed: {err}") from err
        result: Feed = {}
        for i, name in enumerate(self._output_names):
            data = self._request.get_output_tensor(i).data
            if name in outputs:
                np.copyto(outputs[name], data, casting="same_kind")
                result[name] = outputs[name]
            else:                           # the contract's dtype (OpenVINO may compute an index in int32)
                result[name] = np.array(data, dtype=self._output_dtypes[i], copy=True)
        return result

    def close(self) -> None:
        """Free the compiled model (its weights); the executor cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._request = None
            self.compiled = None
