"""`python -m export.verify OUT [--graphs a,b] [--checkpoints CKPT] [--seed N]`

Graph vs eager parity (DESIGN.md §6, gate 2): every graph of OUT's manifest runs under ONNX Runtime
(CPU, fp32) and as its eager wrapper on the same fresh seeded inputs, at the smallest shape its
contract allows, a typical one and a long one (the range max, capped for CPU by export/dummy.py's
table), each at batch 1 and at a batch > 1 where the contract allows. Every output must be within the
contract's tolerance, `|onnx - eager| <= atol + rtol * |eager|` elementwise, with the exact shape the
contract gives for those sizes and no NaN/Inf; integer outputs must be equal. Prints one table row
per (graph, shape, output), then exits non-zero if any row failed — all rows are reported first
(STYLE.md practice 7).

The checkpoint is the one recorded in the manifest (`--checkpoints` overrides it); it must be the
checkpoint the graphs were built from (same config.yaml and file hashes), else a CheckpointError.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runtime.contracts import GraphContract, ModelDims, TensorSpec
from runtime.errors import CheckpointError, ContractError, ToolkitError
from runtime.manifest import Manifest, graph_entry, read_manifest

from .dims import checkpoint_contracts, model_dims
from .dummy import axis_sizes, describe, feed_for
from .wrappers.base import WrapperSpec

log = logging.getLogger("export.verify")

POINTS = ("min", "opt", "max")


@dataclass(frozen=True)
class ParityRow:
    """One output of one graph at one shape. Truthy iff it passed."""

    graph: str
    shape: str
    output: str
    max_abs: float
    max_rel: float               # over elements with |eager| > atol (relative error is meaningless near 0)
    atol: float
    rtol: float
    passed: bool
    needed_atol: float = 0.0     # the atol that would pass at this rtol
    note: str = ""

    def __bool__(self) -> bool:
        return self.passed


def cases(contract: GraphContract) -> list[tuple[str, dict[str, int]]]:
    """(label, axis sizes): min / opt / max, each at batch 1 and at one batch > 1 if allowed."""
    batch = contract.ranges.get("batch")
    batches: list[int | None] = [None]
    if batch is not None:
        batches = sorted({batch.min, min(batch.max, max(2, batch.opt))})
    out: list[tuple[str, dict[str, int]]] = []
    for point in POINTS:
        for b in batches:
            sizes = axis_sizes(contract, point, batch=b)
            if all(sizes != s for _, s in out):
                out.append((f"{point} {describe(sizes)}", sizes))
    return out


def compare(graph: str, label: str, spec: TensorSpec, expected_shape: tuple[int, ...], got: np.ndarray,
            want: np.ndarray, tol: tuple[float, float]) -> ParityRow:
    """One output: ONNX Runtime's `got` against the eager `want`."""
    atol, rtol = tol

    def row(passed: bool, max_abs: float = float("nan"), max_rel: float = float("nan"), needed: float = 0.0,
            note: str = "") -> ParityRow:
        return ParityRow(graph, label, spec.name, max_abs, max_rel, atol, rtol, passed, needed, note)

    shapes = {"onnx": tuple(got.shape), "eager": tuple(want.shape), "contract": expected_shape}
    if len(set(shapes.values())) > 1:
        return row(False, note="shape " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    if got.dtype != np.dtype(spec.dtype) or want.dtype != np.dtype(spec.dtype):
        return row(False, note=f"dtype onnx {got.dtype}, eager {want.dtype}, contract {spec.dtype}")
    if got.size == 0:
        return row(True, 0.0, 0.0)
    if np.issubdtype(got.dtype, np.integer):
        diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
        exact = bool((diff == 0).all())
        return row(exact, float(diff.max()), 0.0, note="" if exact else f"{int((diff != 0).sum())} values differ")
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return row(False, note=f"non-finite values: onnx {int((~np.isfinite(got)).sum())}, "
                               f"eager {int((~np.isfinite(want)).sum())}")
    g, w = got.astype(np.float64), want.astype(np.float64)
    diff, mag = np.abs(g - w), np.abs(w)
    big = mag > atol
    max_rel = float((diff[big] / mag[big]).max()) if big.any() else 0.0
    needed = float(np.maximum(diff - rtol * mag, 0.0).max())
    return row(bool((diff <= atol + rtol * mag).all()), float(diff.max()), max_rel, needed)


class GraphRunner:
    """One graph's ONNX Runtime session and eager wrapper, built once and run on many feeds."""

    def __init__(self, path: Path, contract: GraphContract, spec: WrapperSpec, models) -> None:
        import onnxruntime as ort

        self.contract = contract
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.module = spec.build(models).eval()

    def onnx(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.contract.output_names)
        return dict(zip(names, self.session.run(names, dict(feed))))

    def eager(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.contract.input_names]
        with torch.inference_mode():
            outs = self.module(*args)
        if len(outs) != len(self.contract.outputs):
            raise ContractError(f"graph '{self.contract.name}': the eager wrapper returned {len(outs)} outputs, "
                                f"the contract has {len(self.contract.outputs)}")
        return {n: o.detach().numpy() for n, o in zip(self.contract.output_names, outs)}


def verify_graph(runner: GraphRunner, spec: WrapperSpec, dims: ModelDims, seed: int) -> list[ParityRow]:
    contract = runner.contract
    rows: list[ParityRow] = []
    for i, (label, sizes) in enumerate(cases(contract)):
        rng = np.random.default_rng([seed, zlib.crc32(contract.name.encode()), i])
        feed = feed_for(contract, spec, dims, sizes, rng=rng)
        got, want = runner.onnx(feed), runner.eager(feed)
        for out in contract.outputs:
            rows.append(compare(contract.name, label, out, out.concrete(dims, sizes), got[out.name], want[out.name],
                                contract.tolerance(out.name)))
    return rows


def verify(out: str | Path, graphs: Sequence[str] | None = None, checkpoints: str | Path | None = None,
           seed: int = 0, wrappers: Mapping[str, WrapperSpec] | None = None,
           contracts_for=None) -> list[ParityRow]:
    """Parity rows for `graphs` (default: all) of the export directory `out`."""
    from .build import open_checkpoint

    manifest = read_manifest(out, check_files=True, check_hashes=True)
    names = list(graphs) if graphs else list(manifest.graphs)
    entries = {n: manifest.graph(n) for n in names}
    layout = open_checkpoint(checkpoints or manifest.checkpoint.path)
    _check_same_checkpoint(manifest, layout)
    dims = model_dims(layout)
    if dims != manifest.dims:
        raise CheckpointError(f"{layout.root}: model sizes {dims} differ from the manifest's {manifest.dims}")
    if manifest.version != layout.version:
        raise CheckpointError(f"{layout.root}: an IndexTTS2 {layout.version} checkpoint, but the export is "
                              f"{manifest.version}'s")
    contracts = (contracts_for or partial(checkpoint_contracts, version=layout.version))(dims, layout.config)
    if wrappers is None:
        from .wrappers import all_wrappers

        wrappers = all_wrappers(layout.version)
    _check_signatures(manifest, contracts, wrappers, names, dims)
    from .eager import EagerModels

    models = EagerModels.load(layout.root, with_gpt=True)
    rows: list[ParityRow] = []
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        runner = GraphRunner(entries[name].path(Path(out)), contracts[name], wrappers[name], models)
        graph_rows = verify_graph(runner, wrappers[name], dims, seed)
        rows += graph_rows
        bad = sum(not r for r in graph_rows)
        log.info("[%d/%d] %s: %d rows, %s (%.1f s)", i, len(names), name, len(graph_rows),
                 f"{bad} FAILED" if bad else "all passed", time.perf_counter() - t0)
    return rows


def _check_same_checkpoint(manifest: Manifest, layout) -> None:
    """The graphs must be compared with the eager model they were exported from."""
    from .build import checkpoint_identity

    now = checkpoint_identity(layout, manifest.checkpoint)
    changed = [] if now.config_sha256 == manifest.checkpoint.config_sha256 else ["config.yaml"]
    old = manifest.checkpoint.files
    changed += [rel for rel in sorted(set(old) | set(now.files))
                if rel not in old or rel not in now.files or old[rel].sha256 != now.files[rel].sha256]
    if changed:
        raise CheckpointError(f"{layout.root}: not the checkpoint the graphs were built from "
                              f"({manifest.checkpoint.path}); differing files: {', '.join(changed)}. "
                              "Rebuild with python -m export.build or pass the right --checkpoints")


def _check_signatures(manifest: Manifest, contracts: Mapping[str, GraphContract],
                      wrappers: Mapping[str, WrapperSpec], names: Sequence[str], dims: ModelDims) -> None:
    problems = []
    for name in names:
        if name not in contracts or name not in wrappers:
            problems.append(f"graph '{name}' has no {'contract' if name not in contracts else 'wrapper'}")
            continue
        entry, now = manifest.graphs[name], graph_entry(contracts[name], dims, file="", sha256="", opset=0,
                                                        exporter="", fingerprint="")
        if (entry.inputs, entry.outputs, dict(entry.ranges)) != (now.inputs, now.outputs, dict(now.ranges)):
            problems.append(f"graph '{name}': the manifest's signature or ranges differ from the current contract")
    if problems:
        raise ContractError("; ".join(problems) + "; rebuild with python -m export.build")


# ---------------------------------------------------------------------------------------------------
# Report


def format_table(rows: Sequence[ParityRow]) -> str:
    header = ("graph", "shape", "output", "max abs", "max rel", "atol/rtol", "pass")
    lines = [header]
    for r in rows:
        verdict = "ok" if r.passed else "FAIL" + (f" ({r.note})" if r.note else f" (needs atol {r.needed_atol:.2g})")
        lines.append((r.graph, r.shape, r.output, f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", f"{r.atol:g}/{r.rtol:g}",
                      verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description="ONNX Runtime vs eager parity")
    p.add_argument("out", type=Path, help="export directory (with manifest.json)")
    p.add_argument("--graphs", default=None, help="comma-separated graph names (default: all in the manifest)")
    p.add_argument("--checkpoints", type=Path, default=None, help="checkpoint directory (default: the manifest's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("export.verify").setLevel(logging.INFO)
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    t0 = time.perf_counter()
    try:
        rows = verify(args.out, graphs, args.checkpoints, args.seed)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    failed = [r for r in rows if not r]
    graphs_done = len({r.graph for r in rows})
    print(f"{len(rows) - len(failed)}/{len(rows)} rows passed over {graphs_done} graphs "
          f"in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
