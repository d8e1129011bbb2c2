"""The TensorRT runtime pieces on a real GPU (DESIGN.md §4): the GPU probe, the device KV caches against the host
KVCache and BatchKVCache, CUDA-graph replay against plain execution (dit_step per length and gpt_decode per bucket on ONE executor
and context; the decode loop with and without graphs), and GPU-side timing. tests/trt/test_executor.py and
test_cuda_graphs.py run the same logic through fakes on the CPU; these run it on the hardware, where copies,
captures and replays are real.

Gated by the `gpu` marker (tests/conftest.py: require_gpu): skipped with the probe's reason where no NVIDIA GPU
is visible, failed where one is visible but TensorRT/CUDA is not usable; written to run unchanged on a machine
with TensorRT 10, cuda-python and a GPU. Replay must equal plain execution bit for bit: a CUDA graph replays the
very kernels the capture recorded, on the same addresses, so any difference is a bookkeeping bug (a stale
address or shape).

Forcing a plain run on the same context: the executor has no switch for it; its documented rule is that a
context's graphs are dropped whenever its shapes or addresses change (runtime/trt/executor.py, GraphCache.
invalidate), after which the next run at a key is a warm-up, i.e. plain. So `_drop_graphs` runs one feed of
another shape admitted by the SAME optimization profile (another mel length for dit_step, another beam count
in the same KV bucket for gpt_decode), and every run asserts `last_mode`, so the sequence cannot silently
compare replay with replay.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from runtime.trt import gpu

pytestmark = [pytest.mark.gpu]


@pytest.fixture(scope="module")
def engines_dir(trt_engines):
    return trt_engines.root


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
    assert gpu.tensorrt_version() and gpu.unsupported_tensorrt(gpu.tensorrt_version()) == ""


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


@pytest.mark.parametrize("seed", [0, 1])
def test_the_device_batch_cache_agrees_with_the_host_batch(seed) -> None:
    """The shared decode batch's cache (3D copies, 2D memsets: runtime/trt/kv_batch_device.py) on the hardware,
    through tests/trt/test_kv_batch.py's random walk, against the host BatchKVCache."""
    from runtime.gpt.batch_cache import BatchKVCache
    from runtime.trt import cuda
    from runtime.trt.kv_batch_device import DeviceBatchKVCache
    from tests.trt.test_kv_batch import BUCKETS, _apply, _walk

    geometry, max_rows = (2, 3, 8), 12
    stream = cuda.Stream()
    device = DeviceBatchKVCache(*geometry, max_rows, BUCKETS, stream=stream)
    host = BatchKVCache(*geometry, max_rows=max_rows, buckets=BUCKETS)
    try:
        for i, event in enumerate(_walk(seed, *geometry, max_rows)):
            _apply(host, event)
            staging = None
            if event[0] in ("join", "append"):        # K/V from device memory, as the engines write it
                a = event[2] if event[0] == "join" else event[1]
                staging = cuda.DeviceBuffer(a.nbytes, "staged K/V")
                cuda.memcpy_htod_async(staging.ptr, a.ctypes.data, a.nbytes, stream)
                staged = staging.array(a.shape)
                event = (*event[:2], staged, *event[3:]) if event[0] == "join" else ("append", staged)
            _apply(device, event)
            stream.sync()
            if staging is not None:
                staging.close()
            cache, mask = device.download()
            assert (device.rows, device.capacity, device.version) == (host.rows, host.capacity, host.version)
            np.testing.assert_array_equal(cache, host.buffer, err_msg=f"event {i}: {event[0]}")
            np.testing.assert_array_equal(mask, host.mask)
    finally:
        device.close()
        stream.close()


def _checked_run(executor, feed: dict, mode: str) -> dict:
    out = executor.run(feed)
    assert executor.last_mode == mode, f"expected a {mode} run, got {executor.last_mode}"
    assert executor.last_gpu_ms is not None and executor.last_gpu_ms > 0
    return out


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{name}: {what}")


def replay_equals_plain_on_one_context(executor, feed_of, detour: dict, rounds: int = 2) -> None:
    """On one CUDA-graph executor, per round: feed a plain (warm-up), a again (capture + launch), b (replay with
    new values at the same addresses), a (replay); drop the graphs; b plain. Replays and the captured launch
    must equal the plain runs of the same feed bit for bit. `detour`: a feed of another shape in the same
    optimization profile (runs plainly and drops the context's graphs)."""
    def drop_graphs() -> None:
        _checked_run(executor, detour, "plain")

    drop_graphs()                                       # whatever ran before: the next run is a warm-up
    for r in range(rounds):
        a, b = feed_of(2 * r), feed_of(2 * r + 1)
        plain_a = _checked_run(executor, a, "plain")
        captured_a = _checked_run(executor, a, "capture")
        replay_b = _checked_run(executor, b, "replay")
        replay_a = _checked_run(executor, a, "replay")
        drop_graphs()
        plain_b = _checked_run(executor, b, "plain")
        drop_graphs()
        assert any(not np.array_equal(plain_a[n], plain_b[n]) for n in plain_a), "feeds a and b give equal outputs"
        _assert_same(captured_a, plain_a, f"round {r}: the capture's launch vs plain")
        _assert_same(replay_a, plain_a, f"round {r}: replay vs plain (the captured values)")
        _assert_same(replay_b, plain_b, f"round {r}: replay vs plain (new values at the same addresses)")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dit_step_graph_replay_equals_plain_execution(trt_engines, manifest, graph_kit, precision) -> None:
    from runtime.trt.executor import TrtExecutor

    trt_engines.plan("dit_step", precision)
    entry = manifest.graph("dit_step")
    with TrtExecutor(entry, trt_engines.root, precision, cuda_graphs=True) as graphed:
        for mel_len, other in ((37, 64), (64, 37)):                 # one profile: every length, one context
            replay_equals_plain_on_one_context(
                graphed, lambda seed, n=mel_len: _feed(graph_kit, "dit_step", {"batch": 2, "mel_len": n}, seed),
                _feed(graph_kit, "dit_step", {"batch": 2, "mel_len": other}, 99))
        stats = graphed.graph_stats
        assert stats.failed_captures == 0 and stats.captures == 4 and stats.replays == 8, stats


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_decode_step_graph_replay_equals_plain_execution(trt_engines, manifest, graph_kit, precision) -> None:
    """gpt_decode in its first KV bucket (one static-cache_len profile, one context), beams 3, the detour at
    beam count 1 of the same profile."""
    from runtime.trt.engine_plan import decode_buckets
    from runtime.trt.executor import TrtExecutor

    trt_engines.plan("gpt_decode", precision)
    entry = manifest.graph("gpt_decode")
    bucket = decode_buckets(entry)[0]
    with TrtExecutor(entry, trt_engines.root, precision, cuda_graphs=True) as graphed:
        replay_equals_plain_on_one_context(
            graphed, lambda seed: _feed(graph_kit, "gpt_decode", {"batch": 3, "cache_len": bucket}, seed),
            _feed(graph_kit, "gpt_decode", {"batch": 1, "cache_len": bucket}, 99))
        stats = graphed.graph_stats
        assert stats.failed_captures == 0 and stats.captures == 2 and stats.replays == 4, stats


@pytest.mark.parametrize("config", [
    {"do_sample": False, "num_beams": 1, "max_mel_tokens": 60},
    {"do_sample": True, "num_beams": 3, "max_mel_tokens": 60},
])
def test_decode_loop_replaying_graphs_equals_plain_decode(trt_engines, engines_dir, manifest, config) -> None:
    from runtime.gpt.generate import GenerationConfig, generate
    from runtime.trt.gpt_steps import open_trt_gpt_steps

    rng = np.random.default_rng(0)
    d = manifest.dims.model_dim
    spk = rng.standard_normal((1, 32, d)).astype(np.float32)
    emo = rng.standard_normal((1, d)).astype(np.float32)
    text = rng.integers(2, manifest.dims.text_vocab, 30).astype(np.int64)
    gen = GenerationConfig(**config)
    trt_engines.require(["gpt_prefill", "gpt_decode"], "fp32")
    steps = {}
    try:
        steps["plain"] = open_trt_gpt_steps(manifest, engines_dir, "fp32", cuda_graphs=False)
        steps["graphs"] = open_trt_gpt_steps(manifest, engines_dir, "fp32", cuda_graphs=True)
        want = generate(steps["plain"], {"spk_latent": spk}, emo, text, gen, seed=5, record=True)
        got = generate(steps["graphs"], {"spk_latent": spk}, emo, text, gen, seed=5, record=True)
        np.testing.assert_array_equal(got.codes, want.codes)
        np.testing.assert_array_equal(np.stack(got.trace.logits), np.stack(want.trace.logits))
        stats = steps["graphs"]._decode.graph_stats
        decode_steps = len(got.trace.logits) - 1
        assert decode_steps > 3 and stats.failed_captures == 0
        assert stats.replays >= decode_steps - 2, stats
    finally:
        for s in steps.values():
            s.close()
