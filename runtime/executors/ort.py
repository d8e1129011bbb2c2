"""The ONNX Runtime executor: one InferenceSession per graph, driven through IO binding.

DESIGN.md §4. Why IO binding: inputs are bound by address (the decode step's per-layer KV-cache views
are never copied on the host) and outputs can be written into the caller's preallocated arrays, so a
decode step allocates nothing on the Python side. A binding is only redone for an input whose address,
shape or dtype changed since the last run; the executor keeps a reference to every bound array so an
address can never be reused by another array while it is bound. Feed checks are BaseExecutor's
(runtime/executors/base.py: only when the binding key changes); this module implements only `_run`.

CUDA: ONNX Runtime silently falls back to the CPU when the CUDA execution provider cannot be loaded
(missing CUDA/cuDNN libraries, no GPU). `ort-cuda` therefore checks the providers the session really
got and refuses to pretend. Inputs and outputs stay host arrays (ORT copies them to and from the GPU on
each run); the KV cache lives on the host for this backend. Keeping it on the device is what the
TensorRT executor does (the engines issue).

A graph file whose ONNX metadata names another graph or another build fingerprint than the manifest
is refused (an export directory assembled from different builds must not run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from runtime.errors import (
    BackendError,
    CheckpointError,
    ContractError,
    EngineMismatchError,
)
from runtime.executors.base import BaseExecutor, Feed, value_key
from runtime.manifest import GraphEntry

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class OrtOptions:
    """Session settings. `intra_op_threads` None/0 = ONNX Runtime's default (one per physical core)."""

    intra_op_threads: int | None = None
    inter_op_threads: int = 1
    device_id: int = 0
    optimization: str = "all"           # "disable" | "basic" | "extended" | "all"


def import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu "
                           "(never both: they share one module folder)") from err
    return ort


def cuda_provider_available() -> bool:
    """The installed onnxruntime was built with the CUDA provider (not yet proof that it will load)."""
    try:
        return CUDA_PROVIDER in import_ort().get_available_providers()
    except BackendError:
        return False


def session_options(options: OrtOptions) -> Any:
    ort = import_ort()
    so = ort.SessionOptions()
    if options.intra_op_threads:
        so.intra_op_num_threads = int(options.intra_op_threads)
    so.inter_op_num_threads = int(options.inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if options.optimization not in levels:
        raise BackendError(f"unknown ONNX Runtime optimization level {options.optimization!r} "
                           f"(one of {', '.join(levels)})")
    so.graph_optimization_level = levels[options.optimization]
    so.log_severity_level = 4          # fatal only: a failed run is reported once, as our BackendError
    return so


class BranchOf(NamedTuple):
    """A graph's place in a session holding several graphs: the session, the branch-selector input's name
    and this graph's index."""

    session: Any
    selector: str
    index: int


class OrtExecutor(BaseExecutor):
    """One graph of an export directory in ONNX Runtime (`backend` "ort-cpu" or "ort-cuda").

    `branch`: run the graph as its branch of a session that holds several graphs (the shared GPT session,
    runtime/executors/gpt_session.py) instead of opening a session of its own: inputs and outputs are the
    session's `<graph>/<name>`, the branch index is bound once, and the session's identity was checked when
    it was opened."""

    def __init__(self, entry: GraphEntry, root: str | Path, backend: str = "ort-cpu",
                 options: OrtOptions = OrtOptions(), *, branch: "BranchOf | None" = None) -> None:
        super().__init__()
        if backend not in ("ort-cpu", "ort-cuda"):
            raise BackendError(f"OrtExecutor: backend must be ort-cpu or ort-cuda, got {backend!r}")
        self.name, self.entry, self.backend = entry.name, entry, backend
        self._bound_in: dict[str, tuple] = {}
        self._bound_out: dict[str, tuple | None] = {}
        self._keep: dict[str, np.ndarray] = {}
        self._input_names = [t.name for t in entry.inputs]
        if branch is not None:
            self.session, self._prefix = branch.session, f"{entry.name}/"
            self.providers = tuple(self.session.get_providers())
            self._output_names = [t.name for t in entry.outputs]
            self._binding = self.session.io_binding()
            selector = np.array(branch.index, np.int64)
            self._binding.bind_input(branch.selector, "cpu", 0, selector.dtype.type, [], selector.ctypes.data)
            self._keep["branch"] = selector
            return
        self._prefix = ""
        ort = import_ort()
        path = entry.path(root)
        if not path.is_file():
            raise CheckpointError(f"graph '{entry.name}': {path} is missing; rebuild with python -m export.build")
        providers: list[Any] = [CPU_PROVIDER]
        if backend == "ort-cuda":
            if not cuda_provider_available():
                raise BackendError("ort-cuda: this onnxruntime has no CUDA execution provider "
                                   "(install onnxruntime-gpu instead of onnxruntime)")
            providers = [(CUDA_PROVIDER, {"device_id": options.device_id}), CPU_PROVIDER]
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(options), providers=providers)
        except Exception as err:  # noqa: BLE001 — ORT raises its own exception types for a bad file
            raise CheckpointError(f"graph '{entry.name}': ONNX Runtime cannot load {path}: {err}") from err
        active = self.session.get_providers()
        if backend == "ort-cuda" and CUDA_PROVIDER not in active:
            raise BackendError(f"ort-cuda: ONNX Runtime did not activate the CUDA execution provider for "
                               f"'{entry.name}' (active: {active}); check the CUDA/cuDNN libraries and the GPU")
        self.providers = tuple(active)
        self._check_identity(path)
        self._binding = self.session.io_binding()
        self._output_names = [o.name for o in self.session.get_outputs()]
        log.info("%s: ONNX Runtime session (%s) in %.2f s", entry.name, active[0], time.perf_counter() - t0)

    def _check_identity(self, path: Path) -> None:
        meta = self.session.get_modelmeta().custom_metadata_map
        graph, fingerprint = meta.get("indextts2.graph"), meta.get("indextts2.fingerprint")
        if graph != self.entry.name or fingerprint != self.entry.fingerprint:
            raise EngineMismatchError(
                f"graph '{self.entry.name}': {path} was not produced by the build this manifest describes "
                f"(its metadata says graph {graph!r}, fingerprint {str(fingerprint)[:12]}..., the manifest "
                f"{self.entry.fingerprint[:12]}...); rebuild with python -m export.build")
        inputs = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        want_in = tuple(t.name for t in self.entry.inputs)
        want_out = tuple(t.name for t in self.entry.outputs)
        if inputs != want_in or outputs != want_out:
            raise ContractError(f"graph '{self.entry.name}': {path} has inputs {inputs} and outputs {outputs}, "
                                f"the manifest says {want_in} -> {want_out}")

    def _run(self, feed: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray], checked: object) -> Feed:
        for name in self._input_names:                    # rebind only what moved since the last run
            if self._bound_in.get(name) != value_key(feed[name]):
                self._bind_input(name, feed[name])
        for name in self._output_names:
            buf = outputs.get(name)
            if buf is None:                 # ORT allocates: rebind every run (the shape may change)
                self._binding.bind_output(self._prefix + name, "cpu")
                self._bound_out[name] = None
                continue
            key = value_key(buf)
            if self._bound_out.get(name) != key:
                self._binding.bind_output(self._prefix + name, "cpu", 0, buf.dtype.type, list(buf.shape),
                                          buf.ctypes.data)
                self._keep[f"out:{name}"] = buf
                self._bound_out[name] = key
        try:
            self.session.run_with_iobinding(self._binding)
        except Exception as err:  # noqa: BLE001 — ORT's exception types are not part of our API
            raise BackendError(f"graph '{self.name}': ONNX Runtime failed: {err}") from err
        result: Feed = {}
        values = None
        for i, name in enumerate(self._output_names):
            if name in outputs:
                result[name] = outputs[name]
            else:                           # ORT reuses its own output buffer next run: copy it out
                values = values if values is not None else self._binding.get_outputs()
                result[name] = np.array(values[i].numpy(), copy=True)
        return result

    def _bind_input(self, name: str, value: np.ndarray) -> None:
        self._binding.bind_input(self._prefix + name, "cpu", 0, value.dtype.type, list(value.shape),
                                 value.ctypes.data)
        self._bound_in[name] = value_key(value)
        self._keep[name] = value
