"""The GPT step seam (runtime/gpt/steps.py) over two executors: `gpt_prefill` and `gpt_decode`.

Any backend's executors plug in here, so the decode loop (runtime/gpt/generate.py) drives ONNX Runtime,
TensorRT or the eager torch executor the same way. The decode outputs (`logits` (B, V), `kv_new`) are
written into buffers allocated once per beam count: with the cache views, `mel_ids`, `mel_pos` and
`kv_mask` that the loop keeps in place, a decode step binds nothing new and allocates nothing.

The KV cache lives on the host (runtime/gpt/kv_cache.py:KVCache): these executors take and return numpy
arrays. The two executors belong to whoever opened them (runtime/backend.py: the Backend's graph set, or
the caller that injected them), and they are also in that owner's graph mapping; so `close` drops only
the output buffers allocated here and never closes an executor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from runtime.executors.base import Executor, Feed
from runtime.gpt.batch_cache import BatchKVCache
from runtime.gpt.kv_cache import KVCache
from runtime.gpt.steps import GptGeometry
from runtime.manifest import Manifest


def geometry_of(manifest: Manifest) -> GptGeometry:
    dims, tokens = manifest.dims, manifest.gpt
    return GptGeometry(layers=dims.layers, heads=dims.heads, head_dim=dims.head_dim, vocab_size=dims.vocab,
                       start_mel_token=tokens.start_mel_token, stop_mel_token=tokens.stop_mel_token,
                       max_mel_tokens=tokens.max_mel_tokens)


class GraphGptSteps:
    """`prefill` / `decode` / `new_cache` / `close` (GptSteps protocol) on executors of the two GPT graphs."""

    def __init__(self, prefill: Executor, decode: Executor, geometry: GptGeometry) -> None:
        self._prefill, self._decode, self.geometry = prefill, decode, geometry
        self._outputs: dict[int, Feed] = {}

    def prefill(self, feed: Feed) -> Feed:
        return self._prefill.run(feed)

    def decode(self, feed: Feed) -> Feed:
        beams = feed["mel_ids"].shape[0]
        out = self._outputs.get(beams)
        if out is None:
            g = self.geometry
            out = {"logits": np.empty((beams, g.vocab_size), np.float32),
                   "kv_new": np.empty((g.layers, 2, beams, g.heads, 1, g.head_dim), np.float32)}
            self._outputs[beams] = out
        return self._decode.run(feed, outputs=out)

    def new_cache(self, kv: np.ndarray, beams: int, max_rows: int, buckets: Sequence[int]) -> KVCache:
        """A host cache holding the prefill's rows for every beam (the executors read host arrays)."""
        return KVCache.from_prefill(kv, beams, max_rows, buckets)

    def new_batch_cache(self, max_rows: int, buckets: Sequence[int]) -> BatchKVCache:
        """A host cache for the scheduler's shared decode batch."""
        g = self.geometry
        return BatchKVCache(g.layers, g.heads, g.head_dim, max_rows, buckets=buckets, idle_token=g.start_mel_token)

    def close(self) -> None:
        """Drop the decode output buffers; the executors stay open (their owner closes them)."""
        self._outputs.clear()
