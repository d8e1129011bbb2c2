"""The one executor interface every backend implements: named inputs -> named outputs.

DESIGN.md §4. The orchestration (runtime/synthesizer.py) and the decode loop never know which backend
runs a graph; they hand an executor a feed (`dict[str, np.ndarray]`, the contract names of DESIGN.md §3)
and read its outputs by name. Backends: ONNX Runtime (runtime/executors/ort.py), eager PyTorch
(export/torch_executor.py, the parity reference) and TensorRT (the engines issue).

Buffers: `run(feed, outputs=...)` may be given preallocated output arrays; a backend that can write into
them (IO binding, device buffers) does so without allocating, which is how the decode step avoids any
per-step allocation beyond the logits read-back. Without `outputs`, the returned arrays belong to the
caller. Input arrays must stay unchanged until `run` returns (backends may bind them by address).

Feeds are checked against the manifest's signature of the graph (names, dtypes, ranks, static sizes,
one size per dynamic axis) so that a wrong feed is a `ContractError` naming the tensor, not an error
from inside a library.

`BaseExecutor` is where that check lives for every backend (Polygraphy's `BaseRunner.infer` /
`infer_impl`): `run` computes the feed's binding key (names, addresses, shapes, strides, dtypes of the
inputs and output targets; never the contents), checks the feed and targets only when the key differs
from the last run's, and hands the checked result to `_run`, the one method a backend implements. A
decode step that feeds the same arrays every step is therefore checked once, not once per token.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from runtime.errors import ContractError
from runtime.manifest import GraphEntry, TensorSignature

Feed = dict[str, np.ndarray]


@runtime_checkable
class Executor(Protocol):
    """Runs one graph."""

    name: str                          # the graph (contract) name
    backend: str                       # "ort-cpu", "ort-cuda", "trt", "torch"

    def run(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> Feed:
        """Inputs by contract name -> every output by name (the `outputs` arrays themselves when given)."""
        ...


def check_feed(entry: GraphEntry, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, int]:
    """Check `feed` against the graph's input signature; -> the dynamic axis sizes it implies.

    `names`: check only these inputs (the others were checked before and have not changed).
    """
    missing = [t.name for t in entry.inputs if t.name not in feed]
    if missing:
        raise ContractError(f"graph '{entry.name}': input(s) {missing} missing from the feed "
                            f"(it needs {[t.name for t in entry.inputs]})")
    unknown = sorted(set(feed) - {t.name for t in entry.inputs})
    if unknown:
        raise ContractError(f"graph '{entry.name}': the feed has inputs {unknown} the graph does not take "
                            f"(it takes {[t.name for t in entry.inputs]})")
    sizes: dict[str, int] = {}
    for spec in entry.inputs:
        if names is not None and spec.name not in names:
            continue
        _check_tensor(entry.name, spec, feed[spec.name], sizes)
    return sizes


def _check_tensor(graph: str, spec: TensorSignature, value: object, sizes: dict[str, int]) -> None:
    where = f"graph '{graph}' input '{spec.name}'"
    if not isinstance(value, np.ndarray):
        raise ContractError(f"{where}: expected a numpy array, got {type(value).__name__}")
    check_tensor_shape(where, spec, value.dtype, value.shape, sizes)
    if not value.flags.c_contiguous:
        raise ContractError(f"{where}: the array must be C-contiguous (pass np.ascontiguousarray(...))")


def check_tensor_shape(where: str, spec: TensorSignature, dtype: np.dtype, shape: tuple[int, ...],
                       sizes: dict[str, int]) -> None:
    """dtype, rank, static sizes, and one size per dynamic axis across the inputs (recorded in `sizes`);
    shared by host arrays here and the TensorRT executor's device arrays."""
    if dtype != np.dtype(spec.dtype):
        raise ContractError(f"{where}: dtype {dtype}, the contract says {spec.dtype}")
    if len(shape) != len(spec.shape):
        raise ContractError(f"{where}: shape {shape} has rank {len(shape)}, the contract says "
                            f"{len(spec.shape)} {tuple(spec.shape)}")
    for axis, (dim, got) in enumerate(zip(spec.shape, shape)):
        if isinstance(dim, int):
            if got != dim:
                raise ContractError(f"{where}: axis {axis} is {got}, the contract says {dim} "
                                    f"(shape {shape} vs {tuple(spec.shape)})")
        elif dim in sizes and sizes[dim] != got:
            raise ContractError(f"{where}: axis {axis} ('{dim}') is {got}, another input has {dim} = {sizes[dim]}")
        else:
            sizes[dim] = int(got)


def output_shapes(entry: GraphEntry, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...] | None]:
    """Each output's shape at these axis sizes, or None when it depends on data (e.g. length_regulator's
    max(ylens)) or on an axis no input carries."""
    out: dict[str, tuple[int, ...] | None] = {}
    for spec in entry.outputs:
        try:
            out[spec.name] = spec.concrete(sizes)
        except KeyError:
            out[spec.name] = None
    return out


def check_outputs(entry: GraphEntry, outputs: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> None:
    """Preallocated output buffers must have the shape and dtype the graph will write."""
    want = output_shapes(entry, sizes)
    dtypes = {t.name: t.dtype for t in entry.outputs}
    for name, buf in outputs.items():
        if not isinstance(buf, np.ndarray):
            raise ContractError(f"graph '{entry.name}': output target '{name}' must be a numpy array, "
                                f"got {type(buf).__name__}")
        if name not in want:
            raise ContractError(f"graph '{entry.name}': no output named '{name}' (it has {list(want)})")
        shape = want[name]
        if shape is None:
            raise ContractError(f"graph '{entry.name}': output '{name}' has a data-dependent shape; "
                                "it cannot be preallocated")
        if buf.shape != shape or buf.dtype != np.dtype(dtypes[name]) or not buf.flags.c_contiguous:
            raise ContractError(f"graph '{entry.name}': output buffer '{name}' is {buf.dtype}{buf.shape}, "
                                f"the graph writes {dtypes[name]}{shape} (C-contiguous)")


def value_key(value: Any) -> tuple:
    """What the checks and bindings of one feed value depend on: where it is, its shape, strides and dtype
    (never its contents). Host arrays by address; device arrays (anything with `ptr`, `shape`, `dtype`, e.g.
    runtime.trt.cuda.DeviceArray) by device pointer; anything else by identity (it fails the check)."""
    if isinstance(value, np.ndarray):
        return ("host", value.ctypes.data, value.shape, value.strides, value.dtype.str)
    ptr = getattr(value, "ptr", None)
    if isinstance(ptr, int) and hasattr(value, "shape") and hasattr(value, "dtype"):
        return ("device", type(value).__name__, ptr, tuple(value.shape), np.dtype(value.dtype).str)
    return ("other", id(value))


def binding_key(feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> tuple:
    """The key of a whole call: every input and output target by name (order-independent)."""
    return (tuple((n, value_key(feed[n])) for n in sorted(feed)),
            tuple((n, value_key(outputs[n])) for n in sorted(outputs)))


class BaseExecutor:
    """The shared half of every executor: checks on change, one lock, `_run` for the backend.

    Subclasses set `name`, `backend` and `entry`, and implement `_run(feed, outputs, checked)`; they may
    override `_check(feed, outputs)` (default: check_feed + check_outputs -> the dynamic axis sizes),
    whose result is cached with the binding key and passed to every `_run` until the key changes, and
    `_ensure_open()` (raise if the executor was closed). Runs of one executor are serialised by a lock:
    backends keep bound state (IO bindings, execution contexts) that two threads must not interleave.
    """

    name: str
    backend: str
    entry: GraphEntry

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked_key: tuple | None = None
        self._checked: Any = None
        self.checks = 0                     # how many times a feed was checked (tests, diagnostics)

    def run(self, feed: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> Feed:
        """Inputs by contract name -> every output by name (the `outputs` targets themselves when given)."""
        targets = dict(outputs or {})
        with self._lock:
            self._ensure_open()
            key = binding_key(feed, targets)
            if key != self._checked_key:
                self._checked_key = None            # a failed check must not leave the old key valid
                self._checked = self._check(feed, targets)
                self._checked_key = key
                self.checks += 1
            return self._run(feed, targets, self._checked)

    def _check(self, feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> Any:
        sizes = check_feed(self.entry, feed)
        check_outputs(self.entry, outputs, sizes)
        return sizes

    def _ensure_open(self) -> None:
        """Raise BackendError when the executor can no longer run (default: always open)."""

    def _run(self, feed: Mapping[str, Any], outputs: dict[str, Any], checked: Any) -> Feed:
        raise NotImplementedError
