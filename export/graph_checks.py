"""The checks every exported graph passes before `export.build` records it, and its ONNX metadata.

Why each check: `onnx.checker` and strict shape inference catch a malformed graph before TensorRT does
(with worse messages); polygraphy's lint runs the graph node by node under ONNX Runtime on VALID inputs
(the wrapper's feed rule) and names a faulty node; the I/O check holds the file to its contract (names
in order, dtypes, ranks, static sizes, and no dynamic axis silently specialized to the trace size). Key
facts are mirrored into the ONNX `metadata_props` so a lone .onnx file still says what it is
(STYLE.md practice 6). Paths, not protos, are passed to onnx wherever a graph may exceed 2 GB.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from runtime.contracts import DERIVED_AXES, DYNAMIC_AXES, GraphContract, ModelDims, TensorSpec
from runtime.errors import ContractError

log = logging.getLogger(__name__)

LINT_TIMEOUT_S = 3600


def external_data_files(path: str | Path) -> list[str]:
    """Names (relative to the model's folder) of the external data files `path` refers to."""
    model = onnx.load(str(path), load_external_data=False)
    names: set[str] = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(names)


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _tensors(sub)


def stamp_metadata(path: str | Path, facts: Mapping[str, str]) -> None:
    """Set `facts` as metadata_props of the model at `path` and give its nodes readable names (external
    data stays where it is)."""
    model = onnx.load(str(path), load_external_data=False)
    readable_node_names(model)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: str(v) for k, v in facts.items()})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def readable_node_names(model: onnx.ModelProto) -> int:
    """Rename each node `<module path>/<torch op>/<ONNX op>` from the dynamo exporter's name-scope
    metadata, e.g. `bigvgan.resblocks.0.activations.2.act/sin_8/Sin` or
    `regulator.model.1/group_norm/ReduceMean`; -> how many nodes were renamed.

    Why: TensorRT names its layers after the ONNX nodes, and the precision policy (which layers stay fp32
    in an fp16 engine, chosen per module by the calibration analysis) matches layer names by module path.
    The exporter's own names (`node_sin_8`) say nothing about where a node comes from. Nodes without the
    metadata keep their names; names stay unique.
    """
    taken = {n.name for n in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
        if not scopes:
            continue
        try:
            parts = [str(s) for s in ast.literal_eval(scopes)]
        except (ValueError, SyntaxError):
            continue
        module = next((s for s in reversed(parts[:-1]) if s), "")
        if not module or not parts[-1]:
            continue
        name = f"{module}/{parts[-1]}/{node.op_type}"
        if name == node.name:
            continue
        base, k = name, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.discard(node.name)
        taken.add(name)
        node.name = name
        renamed += 1
    return renamed


def check_model(path: str | Path, contract: GraphContract, dims: ModelDims) -> None:
    """onnx.checker, strict shape inference and the I/O check; raises ContractError naming every problem."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise ContractError(f"{path}: onnx.checker: {err}") from err
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".infer-") as tmp:
        inferred_path = Path(tmp) / path.name
        _infer_shapes(path, inferred_path)
        inferred = onnx.load(str(inferred_path), load_external_data=False)
    problems = io_problems(inferred, contract, dims)
    if problems:
        raise ContractError(f"{path}: the graph's I/O differ from contract '{contract.name}': " + "; ".join(problems))


def _infer_shapes(path: Path, target: Path) -> None:
    """Strict shape inference from file to file (it also fails, as ONNX Runtime would, on a shape-carrying
    constant stored as external data)."""
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(target), check_type=True, strict_mode=True,
                                               data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
        raise ContractError(f"{path}: shape inference: {err}") from err


def io_problems(model: onnx.ModelProto, contract: GraphContract, dims: ModelDims) -> list[str]:
    """Every difference between the model's graph inputs/outputs and the contract (one message each)."""
    problems: list[str] = []
    for kind, values, specs in (("inputs", model.graph.input, contract.inputs),
                                ("outputs", model.graph.output, contract.outputs)):
        got = [v.name for v in values]
        want = [s.name for s in specs]
        if got != want:
            problems.append(f"{kind} are {got}, the contract has {want}")
        by_name = {v.name: v for v in values}
        for spec in specs:
            if spec.name in by_name:
                problems += _tensor_problems(by_name[spec.name], spec, contract, dims)
    return problems


def _tensor_problems(value: onnx.ValueInfoProto, spec: TensorSpec, contract: GraphContract,
                     dims: ModelDims) -> list[str]:
    t = value.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name if t.elem_type else "undefined"
    problems = []
    if dtype != spec.dtype:
        problems.append(f"{spec.name}: dtype {dtype}, contract {spec.dtype}")
    if not t.HasField("shape"):
        return problems + [f"{spec.name}: no shape (rank unknown), contract rank {len(spec.shape)}"]
    onnx_dims = list(t.shape.dim)
    if len(onnx_dims) != len(spec.shape):
        return problems + [f"{spec.name}: rank {len(onnx_dims)}, contract rank {len(spec.shape)} {spec.shape}"]
    for axis, (d, want) in enumerate(zip(onnx_dims, spec.shape)):
        fixed = d.dim_value if d.HasField("dim_value") else None
        if isinstance(want, str) and (want in DYNAMIC_AXES or want in DERIVED_AXES):
            free = DERIVED_AXES[want][0] if want in DERIVED_AXES else want
            rng = contract.ranges.get(free)
            if fixed is not None and (rng is None or rng.min != rng.max):
                problems.append(f"{spec.name}: axis {axis} ({want}) is fixed to {fixed} in the graph; the "
                                "contract has it dynamic (specialized during export?)")
        else:
            size = want if isinstance(want, int) else dims.resolve(want)
            if fixed is not None and fixed != size:
                problems.append(f"{spec.name}: axis {axis} is {fixed}, contract {want} = {size}")
    return problems


# ---------------------------------------------------------------------------------------------------
# polygraphy lint


def lint_unavailable_reason() -> str | None:
    for module, why in (("polygraphy", "polygraphy is not installed"),
                        ("onnx_graphsurgeon", "onnx-graphsurgeon (needed by polygraphy's lint) is not installed"),
                        ("onnxruntime", "onnxruntime (needed by polygraphy's lint) is not installed")):
        if importlib.util.find_spec(module) is None:
            return why
    return None


def lint(path: str | Path, feed: Mapping[str, np.ndarray], timeout: float = LINT_TIMEOUT_S) -> str:
    """`polygraphy check lint` on `path` with `feed` as its input data.

    -> "passed", "passed (N warnings)", or "unavailable: <why>" (lint missing or unable to run: said,
    not fatal). Lint errors raise ContractError with the faulty nodes' messages.
    """
    why = lint_unavailable_reason()
    if why is not None:
        return f"unavailable: {why}"
    from polygraphy.json import save_json

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="lint-") as tmp:
        inputs, report_path = Path(tmp) / "inputs.json", Path(tmp) / "report.json"
        save_json([{k: np.ascontiguousarray(v) for k, v in feed.items()}], str(inputs))
        cmd = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
               "check", "lint", str(path), "--load-inputs", str(inputs), "-o", str(report_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"unavailable: lint did not finish within {timeout:.0f} s"
        if not report_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return f"unavailable: lint did not run ({' | '.join(tail)})"
        report = json.loads(report_path.read_text())
    entries = report.get("lint_entries", [])
    errors = [e for e in entries if e.get("level") == "error"]
    if errors:
        lines = [f"{e.get('source', '?')}: {e.get('message', '').strip()} (nodes {e.get('nodes', [])})"
                 for e in errors[:10]]
        raise ContractError(f"{path}: polygraphy lint found {len(errors)} error(s): " + "; ".join(lines))
    warnings = len(entries) - len(errors)
    return f"passed ({warnings} warnings)" if warnings else "passed"
