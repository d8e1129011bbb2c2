"""Inputs for any graph at any point of its contract ranges, from one default-size table.

Why one place (STYLE.md practice 4): the same generator picks the sample the exporter traces with, the
shapes `export.verify` checks (smallest allowed, typical, long; batch 1 and > 1) and, later, engine
profile `opt` shapes and benchmark inputs. Axis sizes come from the contract's ranges by axis name;
the values come from the graph's own feed rule (`WrapperSpec.feed`), which knows what a *valid* input
is (masks, lengths, ids in range). A contract axis without a range, an axis missing from the size
table, a graph without a WrapperSpec, or a feed rule that returns the wrong names, dtypes or shapes
raises a `ContractError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

from runtime.contracts import GraphContract, ModelDims
from runtime.errors import ContractError

from .wrappers.base import Feed, WrapperSpec

Point = Literal["min", "opt", "max", "trace"] | Mapping[str, int]


@dataclass(frozen=True)
class AxisDefault:
    """Sizes a dynamic axis takes where the contract range alone does not decide."""

    trace: int      # the export sample (>= 2: torch.export specializes sizes 0 and 1)
    cpu_max: int    # the 'max' point on CPU when the range max is unaffordable (full-size weights)


#: The one default-size table. `cpu_max` values keep a full-size CPU parity run to seconds per case:
#: e.g. a 1500-token teacher-forced GPT pass or a 4500-frame DiT step with CFG is minutes on 2 cores.
DEFAULT_SIZES: dict[str, AxisDefault] = {
    "batch": AxisDefault(trace=2, cpu_max=4),
    "feat_len": AxisDefault(trace=16, cpu_max=1024),
    "fbank_len": AxisDefault(trace=240, cpu_max=1500),
    "text_len": AxisDefault(trace=8, cpu_max=200),
    "code_len": AxisDefault(trace=16, cpu_max=400),
    "seq_len": AxisDefault(trace=16, cpu_max=600),
    "mel_len": AxisDefault(trace=27, cpu_max=1200),
    "cache_len": AxisDefault(trace=48, cpu_max=1024),
}


def axis_sizes(contract: GraphContract, point: Point, batch: int | None = None,
               spec: WrapperSpec | None = None) -> dict[str, int]:
    """Size of every free axis of `contract` at `point`.

    'min' / 'opt' / 'max': the range values ('max' capped at the table's `cpu_max`); 'trace': the
    wrapper's `export_sizes`, else the table's `trace`, within the range; a mapping: those sizes (each
    must lie in its range), unnamed axes at 'opt'. `batch` overrides the batch axis.
    """
    sizes: dict[str, int] = {}
    for axis in contract.axes():
        rng = contract.ranges.get(axis)
        if rng is None:
            raise ContractError(f"graph '{contract.name}': axis '{axis}' has no range in its contract")
        default = DEFAULT_SIZES.get(axis)
        if default is None:
            raise ContractError(f"graph '{contract.name}': axis '{axis}' is not in export/dummy.py DEFAULT_SIZES")
        if isinstance(point, Mapping):
            size = int(point.get(axis, rng.opt))
        elif point == "trace":
            wanted = (spec.export_sizes if spec is not None else {}).get(axis, default.trace)
            size = min(max(int(wanted), rng.min), rng.max)
        elif point == "max":
            size = max(rng.min, min(rng.max, default.cpu_max))
        elif point in ("min", "opt"):
            size = getattr(rng, point)
        else:
            raise ValueError(f"unknown point {point!r}")
        sizes[axis] = size
    if batch is not None and "batch" in sizes:
        sizes["batch"] = int(batch)
    for axis, size in sizes.items():
        rng = contract.ranges[axis]
        if not rng.min <= size <= rng.max:
            raise ContractError(f"graph '{contract.name}': {axis} = {size} is outside its range "
                                f"[{rng.min}, {rng.max}]")
    return sizes


def feed_for(contract: GraphContract, spec: WrapperSpec | None, dims: ModelDims, point: Point,
             batch: int | None = None, rng: np.random.Generator | int = 0) -> Feed:
    """Valid inputs of `contract` at `point` (see `axis_sizes`), made by the graph's feed rule and checked
    against the contract (names, dtypes, shapes)."""
    if spec is None:
        raise ContractError(f"graph '{contract.name}' has no WrapperSpec (export/wrappers); cannot make inputs")
    sizes = axis_sizes(contract, point, batch, spec)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    feed = spec.feed(contract, dims, sizes, generator)
    problems = feed_problems(contract, dims, sizes, feed)
    if problems:
        raise ContractError(f"graph '{contract.name}': its feed rule at {sizes} broke the contract: "
                            + "; ".join(problems))
    return feed


def feed_problems(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                  feed: Mapping[str, np.ndarray]) -> list[str]:
    """Every way `feed` differs from the contract's inputs at `sizes` (one message each)."""
    problems = []
    names = set(contract.input_names)
    extra, missing = sorted(set(feed) - names), [n for n in contract.input_names if n not in feed]
    if extra:
        problems.append(f"unexpected inputs {extra}")
    if missing:
        problems.append(f"missing inputs {missing}")
    for spec in contract.inputs:
        if spec.name not in feed:
            continue
        value = np.asarray(feed[spec.name])
        want = spec.concrete(dims, sizes)
        if value.dtype != np.dtype(spec.dtype):
            problems.append(f"{spec.name}: dtype {value.dtype}, expected {spec.dtype}")
        if tuple(value.shape) != want:
            problems.append(f"{spec.name}: shape {tuple(value.shape)}, expected {want}")
    return problems


def describe(sizes: Mapping[str, int]) -> str:
    """'batch=2 feat_len=16' — a shape label for logs and tables."""
    return " ".join(f"{k}={v}" for k, v in sizes.items())
