"""What each graph's export wrapper declares: how to build it around the eager modules, how to make
valid inputs for it, and how to export it.

A wrapper is a thin `nn.Module` whose `forward` takes the contract's inputs in contract order (torch
tensors) and returns a tuple of the contract's outputs in contract order. Wrappers never re-implement
model code: they call the eager modules of `export/models/` (DESIGN.md §3, STYLE.md practice 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Mapping

import numpy as np
from torch import nn

from runtime.contracts import GraphContract, ModelDims

if TYPE_CHECKING:
    from export.eager import EagerModels

Feed = dict[str, np.ndarray]
# (contract, static sizes, dynamic axis sizes, rng) -> valid inputs of exactly those sizes
FeedRule = Callable[[GraphContract, ModelDims, Mapping[str, int], np.random.Generator], Feed]


@dataclass(frozen=True)
class WrapperSpec:
    build: Callable[["EagerModels"], nn.Module]
    feed: FeedRule
    exporter: Literal["dynamo", "legacy"] = "dynamo"
    # axis sizes used for tracing (must be >= 2 on every dynamic axis: torch.export specializes 0/1)
    export_sizes: Mapping[str, int] = field(default_factory=dict)
    notes: str = ""
    # the module exported to ONNX when it differs from the eager one (a graph rewrite with the same sums,
    # for ONNX Runtime / TensorRT speed); `build` stays the eager reference export.verify compares against
    export_build: Callable[["EagerModels"], nn.Module] | None = None

    def build_for_export(self, models: "EagerModels") -> nn.Module:
        return (self.export_build or self.build)(models)
