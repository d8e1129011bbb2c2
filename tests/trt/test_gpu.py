"""The TensorRT runtime pieces on a real GPU (DESIGN.md §4): the GPU probe, the device KV cache against the host
KVCache, CUDA-graph replay against plain execution (dit_step per length, gpt_decode per bucket inside the decode
loop), and GPU-side timing. The other tests in tests/trt/ run the same logic through fakes on the CPU; these run
it on the hardware, where copies, captures and replays are real.

Skipped (with the probe's reason) without TensorRT, cuda-python and an NVIDIA GPU; written to run unchanged on
a machine with them. Replay must equal plain execution bit for bit: a CUDA graph replays the very kernels the
capture recorded, on the same addresses, so any difference is a bookkeeping bug (a stale address or shape).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from runtime.trt import gpu

PROBE = gpu.tensorrt()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not PROBE.ok, reason=f"needs TensorRT and an NVIDIA GPU: {PROBE.detail}")]


@pytest.fixture(scope="module")
def engines_dir(trt_engines):
    return trt_engines[0]


@pytest.fixture(scope="module")
def manifest(engines_dir):
    from runtime.manifest import read_manifest

    return read_manifest(engines_dir)


def _feed(graph_kit, graph: str, sizes, seed: int) -> dict:
    from export.dummy import feed_for

    dims, contracts, wrappers = graph_kit
    return {k: np.ascontiguousarray(v) for k, v in feed_for(contracts[graph], wrappers[graph], dims, sizes,
                                                            rng=seed).items()}


def test_the_gpu_probe_names_the_device() -> None:
    info = gpu.gpu_info(0)
    assert info is not None and info.name.strip()
    assert re.fullmatch(r"\d+\.\d+", info.compute_capability), info
    assert gpu.tensorrt_version() and gpu.tensorrt_version().startswith("10.")


@pytest.mark.parametrize("batch", [1, 3])
def test_the_device_kv_cache_mirrors_the_host_cache(batch) -> None:
    from runtime.gpt.kv_cache import KVCache
    from runtime.trt import cuda
    from runtime.trt.kv_device import DeviceKVCache

    rng = np.random.default_rng(batch)
    layers, heads, head_dim, buckets, max_rows = 2, 3, 8, (16, 32, 64), 64
    kv = rng.standard_normal((layers, 2, 1, heads, 11, head_dim)).astype(np.float32)
    stream = cuda.Stream()
    device = DeviceKVCache.from_prefill(kv, batch, max_rows, buckets, stream=stream)
    host = KVCache.from_prefill(kv, batch, max_rows, buckets)
    shape = (layers, 2, batch, heads, 1, head_dim)
    staging = cuda.DeviceBuffer(int(np.prod(shape)) * 4, "kv_new")
    try:
        while host.length < max_rows:
            kv_new = rng.standard_normal(shape).astype(np.float32)
            cuda.memcpy_htod_async(staging.ptr, kv_new.ctypes.data, kv_new.nbytes, stream)
            device.append(staging.array(shape))          # device source: ordered on the stream, no sync
            host.append(kv_new)
            if batch > 1 and rng.random() < 0.5:
                indices = rng.integers(0, batch, batch)
                device.reorder(indices)
                host.reorder(indices)
            stream.sync()                                   # kv_new is overwritten next: wait for the copy
            cache, mask = device.download()
            assert (device.length, device.capacity) == (host.length, host.capacity)
            np.testing.assert_array_equal(cache, host.buffer)
            np.testing.assert_array_equal(mask, host.mask)
    finally:
        device.close()
        staging.close()
        stream.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dit_step_graph_replay_equals_plain_execution(engines_dir, manifest, graph_kit, precision) -> None:
    from runtime.trt.executor import TrtExecutor

    entry = manifest.graph("dit_step")
    with TrtExecutor(entry, engines_dir, precision) as plain, \
            TrtExecutor(entry, engines_dir, precision, cuda_graphs=True) as graphed:
        for mel_len in (37, 64):                                    # a new length: a new key, warm-up again
            modes = []
            for seed in range(4):                                   # new values at the same shapes and addresses
                feed = _feed(graph_kit, "dit_step", {"batch": 2, "mel_len": mel_len}, seed)
                want = plain.run(feed)
                got = graphed.run(feed)
                modes.append(graphed.last_mode)
                for name, value in want.items():
                    np.testing.assert_array_equal(got[name], value, err_msg=f"{name} len {mel_len} run {seed}")
                assert graphed.last_gpu_ms is not None and graphed.last_gpu_ms > 0
            assert modes == ["plain", "capture", "replay", "replay"], modes
        stats = graphed.graph_stats
        assert stats.failed_captures == 0 and stats.captures == 2 and stats.replays == 4


@pytest.mark.parametrize("config", [
    {"do_sample": False, "num_beams": 1, "max_mel_tokens": 60},
    {"do_sample": True, "num_beams": 3, "max_mel_tokens": 60},
])
def test_decode_loop_replaying_graphs_equals_plain_decode(engines_dir, manifest, config) -> None:
    from runtime.gpt.generate import GenerationConfig, generate
    from runtime.trt.gpt_steps import open_trt_gpt_steps

    rng = np.random.default_rng(0)
    d = manifest.dims.model_dim
    spk = rng.standard_normal((1, 32, d)).astype(np.float32)
    emo = rng.standard_normal((1, d)).astype(np.float32)
    text = rng.integers(2, manifest.dims.text_vocab, 30).astype(np.int64)
    gen = GenerationConfig(**config)
    steps = {}
    try:
        steps["plain"] = open_trt_gpt_steps(manifest, engines_dir, "fp32", cuda_graphs=False)
        steps["graphs"] = open_trt_gpt_steps(manifest, engines_dir, "fp32", cuda_graphs=True)
        want = generate(steps["plain"], spk, emo, text, gen, seed=5, record=True)
        got = generate(steps["graphs"], spk, emo, text, gen, seed=5, record=True)
        np.testing.assert_array_equal(got.codes, want.codes)
        np.testing.assert_array_equal(np.stack(got.trace.logits), np.stack(want.trace.logits))
        stats = steps["graphs"]._decode.graph_stats
        decode_steps = len(got.trace.logits) - 1
        assert decode_steps > 3 and stats.failed_captures == 0
        assert stats.replays >= decode_steps - 2, stats
    finally:
        for s in steps.values():
            s.close()
