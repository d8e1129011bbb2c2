"""The eager executor of the two GPT step graphs: runtime.gpt.steps.GptSteps over a UnifiedVoice.

upstream: the KV-cached GPT2InferenceModel calls of indextts/gpt/model_v2.py:inference_speech,
expressed as the `gpt_prefill` / `gpt_decode` contracts of DESIGN.md §3 (UPSTREAM.md §3.1.6).

The decode loop (runtime/gpt/generate.py) is torch-free and speaks numpy feeds; this adapter lets it drive
the eager PyTorch model exactly as it will drive ONNX Runtime or TensorRT engines later. Inputs are
wrapped with `torch.from_numpy` (no copy; the loop's preallocated cache slices are read in place) and
run under `torch.inference_mode`; outputs come back as numpy arrays sharing the result tensors' memory.
The KV cache is the runtime's host KVCache (the outputs are host arrays), and `close` has nothing to free:
the model belongs to the EagerModels that loaded it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from runtime.contracts import kv_cache_name
from runtime.errors import ContractError
from runtime.gpt.batch_cache import BatchKVCache
from runtime.gpt.kv_cache import KVCache
from runtime.gpt.steps import Feed, GptGeometry

from .models.unified_voice import VERSION_20, UnifiedVoice


def geometry_of(model: UnifiedVoice) -> GptGeometry:
    cfg = model.cfg
    return GptGeometry(layers=cfg.layers, heads=cfg.heads, head_dim=cfg.model_dim // cfg.heads,
                       vocab_size=cfg.number_mel_codes, start_mel_token=cfg.start_mel_token,
                       stop_mel_token=cfg.stop_mel_token, max_mel_tokens=cfg.max_mel_tokens)


def _tensor(feed: Feed, name: str, dtype: np.dtype) -> torch.Tensor:
    """Wrap one feed entry without copying; a wrong dtype or a missing name is a ContractError."""
    if name not in feed:
        raise ContractError(f"GPT step feed: input '{name}' is missing (got {sorted(feed)})")
    value = feed[name]
    if not isinstance(value, np.ndarray) or value.dtype != dtype:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise ContractError(f"GPT step feed: '{name}' must be a numpy {np.dtype(dtype)} array, got {got}")
    return torch.from_numpy(value)


class EagerGptSteps:
    """`prefill` / `decode` / `new_cache` / `close` on numpy feeds (GptSteps protocol) backed by the eager
    UnifiedVoice."""

    def __init__(self, model: UnifiedVoice) -> None:
        self.model = model.eval()
        self.geometry = geometry_of(model)

    def prefill(self, feed: Feed) -> Feed:
        """2.0 {spk_latent (B,32,D) f32, emovec (B,D) f32, text_ids (B,L) i64} -> {logits (B,V) f32,
        kv (layers,2,B,H,L+37,hd) f32}; 2.5 {style (B,192) f32, lang_id (B,) i64, emovec, text_ids} -> kv of
        L+6 positions."""
        if self.model.version == VERSION_20:
            speaker, lang_id = _tensor(feed, "spk_latent", np.float32), None
        else:
            speaker, lang_id = _tensor(feed, "style", np.float32), _tensor(feed, "lang_id", np.int64)
        emovec = _tensor(feed, "emovec", np.float32)
        text_ids = _tensor(feed, "text_ids", np.int64)
        with torch.inference_mode():
            logits, kv = self.model.prefill(speaker, emovec, text_ids, lang_id)
        return {"logits": logits.numpy(), "kv": kv.numpy()}

    def decode(self, feed: Feed) -> Feed:
        """{mel_ids (B,1) i64, mel_pos (B,1) i64, kv_cache.<i> (2,B,H,S,hd) f32, kv_mask (B,S) f32}
        -> {logits (B,V) f32, kv_new (layers,2,B,H,1,hd) f32}."""
        mel_ids = _tensor(feed, "mel_ids", np.int64)
        mel_pos = _tensor(feed, "mel_pos", np.int64)
        cache = [_tensor(feed, kv_cache_name(i), np.float32) for i in range(self.geometry.layers)]
        kv_mask = _tensor(feed, "kv_mask", np.float32)
        with torch.inference_mode():
            logits, kv_new = self.model.decode(mel_ids, mel_pos, cache, kv_mask)
        return {"logits": logits.numpy(), "kv_new": kv_new.numpy()}

    def new_cache(self, kv: np.ndarray, beams: int, max_rows: int, buckets: Sequence[int]) -> KVCache:
        """The runtime's host cache: decode reads its slices in place through `torch.from_numpy`."""
        return KVCache.from_prefill(kv, beams, max_rows, buckets)

    def new_batch_cache(self, max_rows: int, buckets: Sequence[int]) -> BatchKVCache:
        """The runtime's host cache of the scheduler's shared decode batch."""
        g = self.geometry
        return BatchKVCache(g.layers, g.heads, g.head_dim, max_rows, buckets=buckets, idle_token=g.start_mel_token)

    def close(self) -> None:
        """Nothing to free: the model is the EagerModels' (a no-op, so the protocol holds)."""
