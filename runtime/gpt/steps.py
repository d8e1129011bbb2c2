"""The seam between the GPT decode loop and whatever computes the GPT: eager PyTorch now, ONNX Runtime
and TensorRT engines later.

The loop (runtime/gpt/generate.py) only ever calls `prefill` and `decode` with feeds in the project's one
currency, `dict[str, np.ndarray]` keyed by the `gpt_prefill` / `gpt_decode` contract names of
DESIGN.md §3, and reads their outputs by name:

    prefill  {<condition>, emovec (B,D) f32, text_ids (B,L) i64}
             -> {logits (B,V) f32, kv (layers,2,B,heads,P,head_dim) f32}
             2.0: condition = spk_latent (B,32,D) f32, P = L + 37;
             2.5: condition = style (B,192) f32 + lang_id (B,) i64, P = L + 6
    decode   {mel_ids (B,1) i64, mel_pos (B,1) i64, kv_cache.<i> (2,B,heads,S,head_dim) for every layer i,
              kv_mask (B,S) f32 (1 = attend to that cache row)}
             -> {logits (B,V) f32, kv_new (layers,2,B,heads,1,head_dim) f32}

`text_ids` have ids 0 and 1 removed by the caller (upstream's prefill drops them); the graphs add
the start/stop text tokens. `mel_pos` is the explicit mel position of the fed token: the k-th
generated code is fed at position k + 1 (UPSTREAM.md §3.1.6). The decode step attends to the cache
rows where `kv_mask` is 1, plus the fed token itself; it returns only the new K/V rows, which the loop
writes into the cache that `new_cache` gave it.

Every member is required and declared, none discovered: the loop calls `new_cache` unconditionally (a
host KVCache for executors that return host arrays, a device cache for TensorRT), and whoever owns the
steps calls `close` (runtime/backend.py:Backend.close). tests/gpt/test_steps_protocol.py checks that
every implementation in the repository (library classes, wrappers and test fakes) declares them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class GptGeometry:
    """Sizes the loop needs to allocate its KV cache and interpret tokens."""

    layers: int
    heads: int
    head_dim: int
    vocab_size: int          # number_mel_codes (logits width)
    start_mel_token: int
    stop_mel_token: int
    max_mel_tokens: int      # upstream's max_generate_length default is 1500, capped by this


@runtime_checkable
class KVCacheLike(Protocol):
    """What the decode loop needs of a KV cache (runtime/gpt/kv_cache.py:KVCache on the host; a device cache
    for the TensorRT executor): decode feeds that stay valid until `version` changes, one write of a
    step's `kv_new` at the next row, and an in-place beam reorder."""

    version: int
    length: int

    def feeds(self) -> dict: ...

    def append(self, kv_new: object) -> None: ...

    def reorder(self, beam_indices: np.ndarray) -> None: ...


@runtime_checkable
class GptSteps(Protocol):
    """Something that runs the two GPT graphs, and owns the KV cache the decode loop writes.

    `new_cache(kv, beams, max_rows, buckets)` is called once per generation with the prefill's `kv`
    output: it returns the loop's cache holding those rows for every beam, sized from `buckets` up to
    `max_rows` rows. Host implementations return runtime/gpt/kv_cache.py:KVCache; executors that keep
    K/V on a device return a cache whose `feeds()` hold device views (runtime/trt/gpt_steps.py).

    `new_batch_cache(max_rows, buckets)` is called once by the scheduler (runtime/scheduler/): the cache of
    a decode batch shared by many requests, up to `max_rows` rows (runtime/gpt/batch_cache.py:BatchKVCache
    on the host; on TensorRT a device cache with the same interface, runtime/trt/kv_batch_device.py, whose
    `max_rows` may be lower: the decode profiles' row bound), or None where the steps cannot share one (the
    scheduler then decodes one generation at a time with `new_cache`).

    `close()` frees what the steps themselves hold (device buffers, and the executors they opened);
    executors handed to the steps by their caller stay the caller's to close. It may be called twice.
    Wrappers (benchmarks' FixedLengthSteps, calibration's ForcedSteps) delegate both to what they wrap.
    """

    geometry: GptGeometry

    def prefill(self, feed: Feed) -> Feed: ...

    def decode(self, feed: Feed) -> Feed: ...

    def new_cache(self, kv: Any, beams: int, max_rows: int, buckets: Sequence[int]) -> KVCacheLike: ...

    def new_batch_cache(self, max_rows: int, buckets: Sequence[int]) -> Any: ...

    def close(self) -> None: ...
