"""runtime/trt/gpt_steps.py: `new_cache` sizes the device cache in the buckets the decode loop asks for,
each checked against the decode plan's profiles (fake cudart; no engines needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime.contracts import KV_BUCKETS, AxisRange
from runtime.errors import ContractError
from runtime.gpt.steps import GptGeometry
from runtime.trt import cuda
from runtime.trt.engine_plan import decode_buckets
from runtime.trt.gpt_steps import TrtGptSteps, cache_buckets

PLAN = (256, 512, 1024, 2048, 2688)          # decode_buckets of the real contract's cache_len range


def test_cache_buckets_are_the_requested_ones_plus_the_larger_profiles() -> None:
    assert cache_buckets(None, PLAN) == PLAN and cache_buckets((), PLAN) == PLAN
    assert cache_buckets(KV_BUCKETS, PLAN) == PLAN
    assert cache_buckets((1024, 512), PLAN) == (512, 1024, 2048, 2688)
    assert cache_buckets((2688,), PLAN) == (2688,)
    with pytest.raises(ContractError, match=r"KV cache buckets \[300, 4096\] have no optimization profile among "
                                            r"the gpt_decode engine's buckets in use here \[256, 512, 1024, 2048, "
                                            r"2688\]; .*engine_plan\.decode_buckets"):
        cache_buckets((256, 300, 4096), PLAN)


def _steps(buckets=None) -> TrtGptSteps:
    entry = SimpleNamespace(name="gpt_decode", ranges={"cache_len": AxisRange(38, 256, 2688)})
    assert decode_buckets(entry) == PLAN
    decode = SimpleNamespace(entry=entry, stream=cuda.Stream())
    geometry = GptGeometry(layers=1, heads=1, head_dim=2, vocab_size=8, start_mel_token=6, stop_mel_token=7,
                           max_mel_tokens=1500)
    return TrtGptSteps(SimpleNamespace(entry=None), decode, geometry, buckets=buckets, owned=(decode.stream,))


def test_new_cache_honours_the_loops_buckets(fake_cuda) -> None:
    """Point (4): the loop's buckets decide the capacities (before, they were ignored: 256 here)."""
    steps = _steps()
    kv = np.random.default_rng(0).standard_normal((1, 2, 1, 1, 40, 2)).astype(np.float32)
    cache = steps.new_cache(kv, 2, 600, (512, 1024))
    assert cache.buckets == (512, 1024, 2048, 2688) and cache.capacity == 512
    new = np.ones((1, 2, 2, 1, 1, 2), np.float32)
    while cache.length < 513:
        cache.append(new)
    assert cache.capacity == 1024                                   # grew to the next requested bucket
    assert steps.new_cache(kv, 2, 600, None).capacity == 256         # no request: every profile
    assert steps.new_cache(kv, 2, 600, KV_BUCKETS).capacity == 256
    assert steps.new_cache(kv, 2, 600, (1024,)).capacity == 1024
    with pytest.raises(ContractError, match=r"buckets \[300\] have no optimization profile"):
        steps.new_cache(kv, 2, 600, (256, 300))
    steps.close()
    assert not fake_cuda.device and not fake_cuda.host


def test_new_cache_refuses_buckets_the_steps_were_not_opened_with(fake_cuda) -> None:
    steps = _steps(buckets=(256, 2688))
    kv = np.zeros((1, 2, 1, 1, 40, 2), np.float32)
    assert steps.new_cache(kv, 1, 600, None).buckets == (256, 2688)
    with pytest.raises(ContractError, match=r"buckets \[512\] .* in use here \[256, 2688\]"):
        steps.new_cache(kv, 1, 600, (256, 512))
    steps.close()
    with pytest.raises(ContractError, match=r"KV buckets \[300\] have no profile"):
        _steps(buckets=(256, 300))
