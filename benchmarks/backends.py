"""The backends a benchmark compares, each as a runtime Synthesizer over one export directory, and the two
wrappers that make their timings comparable.

- `torch`: the export wrappers run eagerly (export/torch_executor.py) under the runtime's own orchestration,
  so "torch" and "ort-cpu" differ only in what runs the graphs (the eager PyTorch model vs its ONNX graph).
- `ort-cpu`, `ov-cpu`, `cpu-auto` (the export's CPU plan), `ort-cuda`, `trt`: the runtime's executors.

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
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.executors.base import Executor, Feed
from runtime.executors.recording import RecordingExecutor
from runtime.gpt.steps import GptSteps, KVCacheLike

log = logging.getLogger(__name__)

BENCH_BACKENDS = ("torch", "ort-cpu", "ov-cpu", "cpu-auto", "ort-cuda", "trt")
DECODE_CALL = 8          # which decode call's feed is kept (mid-generation: the cache holds prompt + 8 rows)


def decode_call(gpt_tokens: int) -> int:
    """The decode call whose feed is kept: DECODE_CALL, or the last one a shorter generation makes
    (N codes take N - 1 decode calls)."""
    return max(0, min(DECODE_CALL, gpt_tokens - 2))


class FixedLengthSteps:
    """GptSteps whose logits never favour the stop token, so generation runs to max_mel_tokens. The cache
    and the lifetime are the wrapped steps' (`new_cache` and `close` delegate)."""

    def __init__(self, inner: GptSteps) -> None:
        self._inner = inner
        self.geometry = inner.geometry
        self._stop = inner.geometry.stop_mel_token

    def prefill(self, feed: Feed) -> Feed:
        return self._mask(self._inner.prefill(feed))

    def decode(self, feed: Feed) -> Feed:
        return self._mask(self._inner.decode(feed))

    def new_cache(self, kv: Any, beams: int, max_rows: int, buckets: Sequence[int]) -> KVCacheLike:
        return self._inner.new_cache(kv, beams, max_rows, buckets)

    def new_batch_cache(self, max_rows: int, buckets: Sequence[int]) -> Any:
        return self._inner.new_batch_cache(max_rows, buckets)     # the stop mask is per row: batches keep it

    def close(self) -> None:
        self._inner.close()

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
    """A Synthesizer on `name` (torch needs the checkpoint directory), every graph loaded now.

    `record`: wrap the graph executors in Recorders (not on trt, whose GPT steps run on the device: its
    graphs are timed on the feeds another backend recorded)."""
    from runtime.backend import Backend
    from runtime.backend import open_backend as open_runtime_backend
    from runtime.executors import GraphSet, OrtOptions
    from runtime.manifest import read_manifest
    from runtime.synthesizer import Synthesizer

    from .measure import rss_mib, trim_heap

    if name not in BENCH_BACKENDS:
        raise ValueError(f"unknown backend {name!r}: one of {', '.join(BENCH_BACKENDS)}")
    t0 = time.perf_counter()
    manifest = read_manifest(export_dir)
    options = OrtOptions(intra_op_threads=threads)

    def recorded(executors: Mapping[str, Executor]) -> Mapping[str, Executor]:
        return {g: Recorder(ex, record_decode_call) for g, ex in executors.items()} if record else executors

    if name == "torch":
        backend = Backend.from_executors(manifest, recorded(_torch_executors(manifest, checkpoints, threads)))
    elif record and name != "trt":
        graph_set = GraphSet(manifest, export_dir, name, options)
        graph_set.open_all()
        backend = Backend.from_executors(manifest, recorded(graph_set), owned=(graph_set,), name=name)
    else:
        backend = open_runtime_backend(manifest, export_dir, name, ort_options=options)
    synth = Synthesizer(export_dir, backend)
    synth.gpt_steps = FixedLengthSteps(synth.gpt_steps)
    load_s = time.perf_counter() - t0
    trim_heap()                         # what the backend holds, not the load's freed temporaries
    return OpenedBackend(name, synth, load_s, rss_mib())


def _torch_executors(manifest: Any, checkpoints: Path | None, threads: int | None) -> Mapping[str, Executor]:
    if checkpoints is None:
        raise ValueError("the torch backend needs --checkpoints (the eager models are loaded from it)")
    import torch

    from export.eager import EagerModels
    from export.torch_executor import torch_executors

    if threads:
        torch.set_num_threads(threads)
    return torch_executors(EagerModels.load(checkpoints), manifest)


def recorded_feeds(backend: OpenedBackend) -> dict[str, dict[int, Feed]]:
    """graph -> {call index: feed} kept by the Recorders of a backend opened with record=True."""
    return {g: dict(ex.kept) for g, ex in backend.synth.graphs.items() if isinstance(ex, Recorder)}
