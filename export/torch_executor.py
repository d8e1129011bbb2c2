"""The eager executor: each graph's export wrapper (eager PyTorch) behind the runtime's executor interface.

Why: parity tests must compare backends under ONE orchestration. With these executors the runtime's
Synthesizer runs the same host code (front-ends, decode loop, Euler loop) over eager PyTorch that it runs
over ONNX Runtime or TensorRT, so a difference between the two runs is a difference between the graphs.
(The independent reference for the orchestration itself is the eager pipeline, export/pipeline.py.)
Feeds are checked against the manifest's signatures exactly as the other executors check them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from runtime.executors.base import Feed, check_feed, check_outputs
from runtime.manifest import GraphEntry, Manifest

from .eager import EagerModels


class TorchExecutor:
    """One export wrapper run eagerly on CPU (float32, inference mode)."""

    backend = "torch"

    def __init__(self, entry: GraphEntry, module: nn.Module) -> None:
        self.name, self.entry, self.module = entry.name, entry, module.eval()
        self._inputs = [t.name for t in entry.inputs]
        self._outputs = [t.name for t in entry.outputs]

    def run(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None) -> Feed:
        sizes = check_feed(self.entry, feed)
        with torch.inference_mode():
            result = self.module(*(torch.from_numpy(feed[n]) for n in self._inputs))
        out = {name: t.contiguous().numpy() for name, t in zip(self._outputs, result)}   # the caller owns them
        if outputs:
            check_outputs(self.entry, outputs, sizes)
            for name, buf in outputs.items():
                np.copyto(buf, out[name])
                out[name] = buf
        return out


def torch_executors(models: EagerModels, manifest: Manifest) -> dict[str, TorchExecutor]:
    """One TorchExecutor per graph of `manifest`, built from the loaded eager models."""
    from .wrappers import all_wrappers

    wrappers = all_wrappers(manifest.version)
    return {name: TorchExecutor(entry, wrappers[name].build(models)) for name, entry in manifest.graphs.items()}
