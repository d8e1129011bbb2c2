"""The GPT step seam (runtime/gpt/steps.py) over TensorRT executors, with the KV cache kept on the GPU.

What differs from runtime/gpt/graph_steps.py:GraphGptSteps (host cache, any backend):
- `prefill` writes its `kv` output into a device buffer this object owns (grown when a longer prompt
  needs more, reused otherwise) and returns it as a DeviceArray; `logits` come back to the host;
- `new_cache` (the optional GptSteps hook the decode loop calls with that `kv`) builds a DeviceKVCache
  (runtime/trt/kv_device.py) on the decode executor's stream, sized in the buckets the loop asks for
  (each must have a profile in the decode plan; see `cache_buckets`), and frees the previous request's
  cache first;
- `decode` runs with outputs {"logits": a host (B, V) array, "kv_new": a DeviceArray}, both allocated
  once per beam count (or decode batch row count); the cache appends `kv_new` on the device. Per step only
  mel_ids / mel_pos (and, for a shared batch, kv_mask) go up and the logits come down;
- `new_batch_cache` builds the scheduler's shared decode cache on the device
  (runtime/trt/kv_batch_device.py), its rows clamped to what the decode profiles admit at every bucket it
  may use (runtime.trt.engine_plan.decode_rows_bound).
Decode CUDA graphs: `open_trt_gpt_steps` turns them on for the decode executor (its shapes are static
per bucket and beam or row count; its addresses are stable for a whole request, or, for a shared batch,
until its cache is reallocated: the executor keys graphs by profile, shapes and addresses, so each
(bucket, rows) of an allocation gets its own graph and a reallocation retires the old ones).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.errors import ContractError
from runtime.executors.base import check_feed, output_shapes
from runtime.gpt.steps import GptGeometry
from runtime.manifest import Manifest
from runtime.trt.cuda import DeviceArray, DeviceBuffer, Stream
from runtime.trt.engine_plan import decode_buckets, decode_rows_bound
from runtime.trt.executor import TrtExecutor
from runtime.trt.kv_batch_device import DeviceBatchKVCache
from runtime.trt.kv_device import DeviceKVCache

log = logging.getLogger(__name__)


class TrtGptSteps:
    """`prefill` / `decode` / `new_cache` / `new_batch_cache` (GptSteps protocol) on TensorRT executors of the
    two GPT graphs.

    `buckets`: KV capacities to use (default: every bucket of the decode plan); `owned`: objects with a
    close() that close() also closes, in order (open_trt_gpt_steps: the executors, then their stream)."""

    def __init__(self, prefill: TrtExecutor, decode: TrtExecutor, geometry: GptGeometry,
                 buckets: Sequence[int] | None = None, owned: Sequence[Any] = ()) -> None:
        self._prefill, self._decode, self.geometry = prefill, decode, geometry
        self.stream: Stream = decode.stream
        plan_buckets = decode_buckets(decode.entry)
        self.buckets = tuple(sorted(buckets)) if buckets else plan_buckets
        unknown = [b for b in self.buckets if b not in plan_buckets]
        if unknown:
            raise ContractError(f"KV buckets {unknown} have no profile in the decode engine (it has {plan_buckets})")
        self._owned = tuple(owned)
        self._logits: dict[int, np.ndarray] = {}
        self._kv_new: dict[int, DeviceBuffer] = {}
        self._prefill_kv: DeviceBuffer | None = None
        self._cache: DeviceKVCache | None = None
        self._batch_cache: DeviceBatchKVCache | None = None

    # -- GptSteps -----------------------------------------------------------------------------------

    def prefill(self, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        """-> {"logits": (B, V) host array, "kv": DeviceArray (layers, 2, B, heads, P, head_dim), valid until the
        next prefill}."""
        entry = self._prefill.entry
        shape = output_shapes(entry, check_feed(entry, feed))["kv"]
        assert shape is not None, "gpt_prefill's kv shape follows from text_ids"
        nbytes = int(np.prod(shape)) * 4
        if self._prefill_kv is None or self._prefill_kv.nbytes < nbytes:
            if self._prefill_kv is not None:
                self._prefill_kv.close()         # the executors synchronise before returning: nothing reads it
            self._prefill_kv = DeviceBuffer(nbytes, "the prefill's kv output")
        kv = self._prefill_kv.array(shape, np.float32)
        return self._prefill.run(feed, outputs={"kv": kv})

    def new_cache(self, kv: DeviceArray | np.ndarray, beams: int, max_rows: int,
                  buckets: Sequence[int] | None = None) -> DeviceKVCache:
        """The decode loop's cache, on the device, holding the prefill rows for every beam, sized in the
        loop's `buckets` (cache_buckets: each needs a decode profile; None = every bucket these steps offer)."""
        self.release_cache()
        sizes = cache_buckets(buckets, self.buckets)
        self._cache = DeviceKVCache.from_prefill(kv, beams, max_rows, sizes, stream=self.stream)
        self.stream.sync()      # the copies read the prefill buffer, which the next prefill may overwrite
        return self._cache

    def decode(self, feed: dict[str, Any]) -> dict[str, Any]:
        beams = int(feed["mel_ids"].shape[0])
        logits = self._logits.get(beams)
        if logits is None:
            logits = self._logits[beams] = np.empty((beams, self.geometry.vocab_size), np.float32)
        g = self.geometry
        shape = (g.layers, 2, beams, g.heads, 1, g.head_dim)
        buf = self._kv_new.get(beams)
        if buf is None:
            buf = self._kv_new[beams] = DeviceBuffer(int(np.prod(shape)) * 4, f"kv_new for {beams} beam(s)")
        return self._decode.run(feed, outputs={"logits": logits, "kv_new": buf.array(shape, np.float32)})

    def new_batch_cache(self, max_rows: int, buckets: Sequence[int] | None) -> DeviceBatchKVCache:
        """The scheduler's shared decode cache on the device (runtime/trt/kv_batch_device.py), on the decode
        executor's stream, sized in `buckets` (cache_buckets: each needs a decode profile, and the larger
        offered ones are added), with at most `max_rows` rows, clamped to the rows the decode profiles admit
        at every one of those buckets (engine_plan.decode_rows_bound: the batch's rows all move to the bucket
        its longest row needs). The bound in force is the cache's `max_rows`. One batch cache at a time: a
        second call frees the first (close() frees it too)."""
        self.release_batch_cache()
        sizes = cache_buckets(buckets, self.buckets)
        bound = decode_rows_bound(self._decode.entry, sizes)
        rows = min(int(max_rows), bound)
        if rows < max_rows:
            log.info("gpt_decode: the decode batch takes %d rows, not %d: the engine's profiles admit %d rows at "
                     "every KV bucket in use %s", rows, max_rows, bound, list(sizes))
        g = self.geometry
        self._batch_cache = DeviceBatchKVCache(g.layers, g.heads, g.head_dim, rows, sizes,
                                               idle_token=g.start_mel_token, stream=self.stream)
        return self._batch_cache

    # -- lifetime -----------------------------------------------------------------------------------

    def release_cache(self) -> None:
        """Free the last request's device cache (the next new_cache does it anyway)."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def release_batch_cache(self) -> None:
        """Free the shared decode cache (the next new_batch_cache does it anyway)."""
        if self._batch_cache is not None:
            self._batch_cache.close()
            self._batch_cache = None

    def close(self) -> None:
        self.release_cache()
        self.release_batch_cache()
        for buf in (*self._kv_new.values(), *([self._prefill_kv] if self._prefill_kv else [])):
            buf.close()
        self._kv_new.clear()
        self._prefill_kv = None
        for obj in self._owned:
            obj.close()
        self._owned = ()


def cache_buckets(requested: Sequence[int] | None, offered: Sequence[int]) -> tuple[int, ...]:
    """The KV capacities a request's device cache may take: the `requested` ones (the decode loop's
    cache_buckets), each of which must be `offered` (have a profile in the decode plan), plus the offered
    ones above the largest requested. Why the latter: past its largest bucket the host cache grows to the
    request's own maximum (runtime.gpt.kv_cache.bucket_for), a size the engine has no profile for; the
    device cache takes the next profile's size instead, so a request the host loop can run still runs.
    None or empty -> every offered bucket."""
    offered = tuple(sorted(set(offered)))
    if not requested:
        return offered
    wanted = tuple(sorted({int(b) for b in requested}))
    missing = [b for b in wanted if b not in offered]
    if missing:
        raise ContractError(f"KV cache buckets {missing} have no optimization profile among the gpt_decode "
                            f"engine's buckets in use here {list(offered)}; ask for buckets among those "
                            "(runtime.trt.engine_plan.decode_buckets lists the plan's), or re-export and rebuild "
                            "with a cache_len range that includes them")
    return wanted + tuple(b for b in offered if b > wanted[-1])


def open_trt_gpt_steps(manifest: Manifest, root: str | Path, precision: str | None = None,
                       cuda_graphs: bool = True) -> TrtGptSteps:
    """Both GPT executors on one shared stream (decode with CUDA graphs) and the steps over them; close()
    frees everything."""
    from runtime.gpt.graph_steps import geometry_of

    precision = precision or manifest.precision
    stream = Stream()
    prefill = decode = None
    try:
        prefill = TrtExecutor(manifest.graph("gpt_prefill"), root, precision, stream=stream)
        decode = TrtExecutor(manifest.graph("gpt_decode"), root, precision, stream=stream,
                             cuda_graphs=cuda_graphs)
    except BaseException:
        if prefill is not None:
            prefill.close()
        stream.close()
        raise
    return TrtGptSteps(prefill, decode, geometry_of(manifest), owned=(prefill, decode, stream))
