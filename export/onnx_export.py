"""ONNX export of one graph wrapper against its contract, and running an ONNX file with ONNX Runtime.

Export facts for torch 2.13 (DESIGN.md §3): the dynamo exporter with `dynamic_shapes` (not
`dynamic_axes`) and opset >= 18; the output folder must exist; graphs over 2 GB are written with
external data (`<file>.onnx.data`). Dynamic dimensions come from the contract's axis names and ranges;
the sample inputs must not use size 1 on a dynamic axis (torch.export specializes 0/1 sizes).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from runtime.contracts import DERIVED_AXES, DYNAMIC_AXES, OPSET, GraphContract

log = logging.getLogger(__name__)

TWO_GB = 2 * 1024**3


def dynamic_shapes(contract: GraphContract) -> tuple[dict[int, object], ...]:
    """torch.export Dims per input, one shared `Dim` object per axis name (so equal names tie sizes)."""
    from torch.export import Dim

    dims: dict[str, object] = {}
    for name, rng in contract.ranges.items():
        dims[name] = Dim(name, min=rng.min, max=rng.max)
    shapes = []
    for spec in contract.inputs:
        shapes.append({axis: dims[name] for axis, name in spec.dynamic_axes().items()})
    return tuple(shapes)


def export_onnx(module: nn.Module, contract: GraphContract, sample: Sequence[torch.Tensor], path: str | Path,
                opset: int = OPSET, dynamic: Sequence[Mapping[int, object]] | None = None) -> Path:
    """Export `module(*sample)` (inputs in contract order) to `path` with the contract's I/O names.

    `dynamic` overrides the dynamic shapes derived from the contract (per input: axis -> Dim).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module, tuple(sample), dynamo=True, opset_version=opset,
            input_names=list(contract.input_names), output_names=list(contract.output_names),
            dynamic_shapes=tuple(dynamic) if dynamic is not None else dynamic_shapes(contract),
            external_data=False, optimize=True, verbose=False,
        )
    size = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in program.model.graph.initializers.values()
               if t.const_value is not None) if hasattr(program, "model") else 0
    program.save(str(path), external_data=size > TWO_GB)
    log.debug("exported %s to %s", contract.name, path)
    return path


def export_legacy(module, contract: GraphContract, sample: tuple, path: Path, opset: int = OPSET) -> Path:
    """The TorchScript-based exporter, for graphs it exports more correctly (dynamic_axes from the contract)."""
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and (d in DYNAMIC_AXES
                                                                                    or d in DERIVED_AXES)}
            for t in contract.inputs + contract.outputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # chosen on purpose, per graph (WrapperSpec)
        torch.onnx.export(module, sample, str(path), dynamo=False, opset_version=opset,
                          input_names=list(contract.input_names), output_names=list(contract.output_names),
                          dynamic_axes={k: v for k, v in axes.items() if v}, do_constant_folding=True)
    return path


def run_onnx(path: str | Path, feed: Mapping[str, np.ndarray], threads: int = 0) -> dict[str, np.ndarray]:
    """Run an ONNX file on the CPU with ONNX Runtime; outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed))))
