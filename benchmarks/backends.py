"""The backends a benchmark compares, each as a runtime Synthesizer over one export directory, and the two
wrappers that make their timings comparable.

- `torch`: the export wrappers run eagerly (export/torch_executor.py) under the runtime's own orchestration,
  so "torch" and "ort-cpu" differ only in what runs the graphs (the eager PyTorch model vs its ONNX graph).
- `ort-cpu`, `ort-cuda`, `trt`: the runtime's executors.

`FixedLengthSteps` hides the GPT's stop token so that every backend generates exactly the same number of
codes: with random demo weights the stop token is rarely drawn, and with real weights the stop position
could differ between backends; a fixed length makes "GPT decode" the same amount of work everywhere.
`Recorder` keeps copies of the feeds one synthesis sends to each graph, so every backend's stages are
timed on identical inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.executors.base import Executor, Feed
from runtime.executors.recording import RecordingExecutor

log = logging.getLogger(__name__)

BENCH_BACKENDS = ("torch", "ort-cpu", "ort-cuda", "trt")
DECODE_CALL = 8          # which decode call's feed is kept (mid-generation: the cache holds prompt + 8 rows)


def decode_call(gpt_tokens: int) -> int:
    """The decode call whose feed is kept: DECODE_CALL, or the last one a shorter generation makes
    (N codes take N - 1 decode calls)."""
    return max(0, min(DECODE_CALL, gpt_tokens - 2))


class FixedLengthSteps:
    """GptSteps whose logits never favour the stop token, so generation runs to max_mel_tokens."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.geometry = inner.geometry
        self._stop = inner.geometry.stop_mel_token

    def prefill(self, feed: Feed) -> Feed:
        return self._mask(self._inner.prefill(feed))

    def decode(self, feed: Feed) -> Feed:
        return self._mask(self._inner.decode(feed))

    def __getattr__(self, name: str) -> Any:       # new_cache / close of device-cache steps pass through
        return getattr(self._inner, name)

    def _mask(self, out: Feed) -> Feed:
        out["logits"][..., self._stop] = -np.inf
        return out


class Recorder(RecordingExecutor):
    """Keeps copies of calls 0 and 1 of every graph; of gpt_decode only call `decode_call` (its KV cache
    is large). `kept`: call index -> feed."""

    def __init__(self, inner: Executor, decode_call: int = DECODE_CALL) -> None:
        self.kept: dict[int, Feed] = {}
        decode = inner.name == "gpt_decode"
        super().__init__(inner, (lambda i: i == decode_call) if decode else (lambda i: i < 2), self.kept.__setitem__)


@dataclass
class OpenedBackend:
    name: str
    synth: Any                      # runtime.synthesizer.Synthesizer
    load_s: float
    rss_mib_after_load: float | None


def open_backend(name: str, export_dir: Path, checkpoints: Path | None, threads: int | None,
                 record: bool = False, record_decode_call: int = DECODE_CALL) -> OpenedBackend:
    """A Synthesizer on `name` (torch needs the checkpoint directory), every graph loaded now."""
    from runtime.executors import GraphSet, OrtOptions
    from runtime.manifest import read_manifest
    from runtime.synthesizer import Synthesizer

    from .measure import rss_mib

    t0 = time.perf_counter()
    manifest = read_manifest(export_dir)
    if name == "torch":
        if checkpoints is None:
            raise ValueError("the torch backend needs --checkpoints (the eager models are loaded from it)")
        import torch

        from export.eager import EagerModels
        from export.torch_executor import torch_executors

        if threads:
            torch.set_num_threads(threads)
        executors: Mapping[str, Executor] = torch_executors(EagerModels.load(checkpoints), manifest)
    elif name in ("ort-cpu", "ort-cuda"):
        graph_set = GraphSet(manifest, export_dir, name, OrtOptions(intra_op_threads=threads))
        graph_set.open_all()
        executors = graph_set
    elif name == "trt":
        executors = {}
    else:
        raise ValueError(f"unknown backend {name!r}: one of {', '.join(BENCH_BACKENDS)}")
    if record:
        executors = {g: Recorder(ex, record_decode_call) for g, ex in executors.items()}
    if name == "trt":
        synth = Synthesizer(export_dir, "trt")
    else:
        synth = Synthesizer(export_dir, executors=executors)
    synth.gpt_steps = FixedLengthSteps(synth.gpt_steps)
    return OpenedBackend(name, synth, time.perf_counter() - t0, rss_mib())


def recorded_feeds(backend: OpenedBackend) -> dict[str, dict[int, Feed]]:
    """graph -> {call index: feed} kept by the Recorders of a backend opened with record=True."""
    return {g: dict(ex.kept) for g, ex in backend.synth.graphs.items() if isinstance(ex, Recorder)}
