"""The shared decode batch on TensorRT (fake engines over the tiny export, fake cudart): TrtGptSteps'
`new_batch_cache` (rows clamped to the decode profiles' bound), and a batch of requests joining, reordering
beams and leaving, decoded through the TrtExecutor with CUDA graphs, step for step equal to the host batch
over ONNX Runtime; every (bucket, rows) allocation gets its own graph, a reallocation retires the old one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime.contracts import KV_BUCKETS, ModelDims, build_contracts
from runtime.gpt.batch_cache import BatchKVCache
from runtime.gpt.generate import prefill_feed
from runtime.gpt.steps import GptGeometry
from runtime.manifest import graph_entry
from runtime.trt import cuda
from runtime.trt.engine_plan import decode_rows_bound
from runtime.trt.gpt_steps import TrtGptSteps
from runtime.trt.kv_batch_device import DeviceBatchKVCache
from tests.trt.fakes import _ort


def _steps(buckets=None) -> TrtGptSteps:
    """Steps over the real model's decode entry (its profiles) with a 1-layer geometry (cheap fake memory)."""
    dims = ModelDims()
    entry = graph_entry(build_contracts(dims)["gpt_decode"], dims, file="gpt_decode.onnx", sha256="0" * 64,
                        opset=18, exporter="dynamo", fingerprint="f")
    decode = SimpleNamespace(entry=entry, stream=cuda.Stream())
    geometry = GptGeometry(layers=1, heads=1, head_dim=2, vocab_size=8, start_mel_token=6, stop_mel_token=7,
                           max_mel_tokens=1500)
    return TrtGptSteps(SimpleNamespace(entry=None), decode, geometry, buckets=buckets, owned=(decode.stream,))


def test_new_batch_cache_is_a_device_batch_within_the_profiles_bound(fake_cuda) -> None:
    steps = _steps()
    cache = steps.new_batch_cache(32, KV_BUCKETS)
    assert isinstance(cache, DeviceBatchKVCache) and cache.max_rows == 16        # the 2688 bucket's 16 rows
    assert cache.buckets == (256, 512, 1024, 2048, 2688) and cache.idle_token == 6
    assert (cache.rows, cache.capacity, cache.used_rows) == (0, 256, 0)
    assert steps.new_batch_cache(6, (512,)).max_rows == 6                        # below the bound: as asked
    assert steps.new_batch_cache(64, None).max_rows == 16
    steps.close()
    assert not fake_cuda.device and not fake_cuda.host                          # close() freed the batch too
    short = _steps(buckets=(256, 512))                 # an engine used only up to 512 positions: 64 rows
    assert short.new_batch_cache(64, None).max_rows == 64 == decode_rows_bound(short._decode.entry, (256, 512))
    short.close()


def _request(manifest, seed: int, text_len: int):
    rng = np.random.default_rng(seed)
    d = manifest.dims.model_dim
    return prefill_feed({"spk_latent": rng.standard_normal((1, 32, d)).astype(np.float32)},
                        rng.standard_normal((1, d)).astype(np.float32),
                        rng.integers(2, manifest.dims.text_vocab, text_len).astype(np.int64))


# (key, beams, text length, joins at step, leaves at step)
PLAN = [("a", 3, 100, 0, 150), ("b", 1, 20, 0, 40), ("c", 2, 60, 5, 90), ("d", 1, 30, 50, 200),
        ("e", 4, 10, 100, 190)]


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_a_shared_decode_batch_on_tensorrt_equals_the_host_batch(fake_engines, manifest, cuda_graphs) -> None:
    from runtime.gpt.graph_steps import GraphGptSteps, geometry_of
    from runtime.trt.executor import TrtExecutor

    root, trt = fake_engines
    geometry = geometry_of(manifest)
    stream = cuda.Stream()
    prefill = TrtExecutor(manifest.graph("gpt_prefill"), root, "fp16", stream=stream, trt=trt)
    decode = TrtExecutor(manifest.graph("gpt_decode"), root, "fp16", stream=stream, cuda_graphs=cuda_graphs, trt=trt)
    steps = TrtGptSteps(prefill, decode, geometry, owned=(prefill, decode, stream))
    device = steps.new_batch_cache(8, KV_BUCKETS)
    host_steps = GraphGptSteps(_ort(root, manifest, "gpt_prefill"), _ort(root, manifest, "gpt_decode"), geometry)
    host = BatchKVCache(geometry.layers, geometry.heads, geometry.head_dim, device.max_rows, buckets=device.buckets,
                        idle_token=geometry.start_mel_token)
    rng = np.random.default_rng(7)
    feeds: dict = {}
    segments: list[tuple] = []                 # (cache pointer, rows, capacity, decode modes) per allocation
    started: dict[str, int] = {}
    for step in range(200):
        for key, beams, text_len, join, leave in PLAN:
            if step == leave and key in started:
                device.leave(key)
                host.leave(key)
            if step == join:
                feed = _request(manifest, ord(key), text_len)
                kv = steps.prefill(feed)["kv"]                        # a DeviceArray, as the scheduler gets it
                want = host_steps.prefill(feed)["kv"]
                prompt = want.shape[4]
                assert device.join(key, kv, beams, prompt + 300) == host.join(key, want, beams, prompt + 300)
                started[key] = prompt
        for key in host.members:
            beams = len(host.member_rows(key))
            parents = rng.integers(0, beams, beams)
            device.reorder(key, parents)
            host.reorder(key, parents)
            tokens = rng.integers(0, geometry.start_mel_token, beams)
            position = int(host.lengths[host.member_rows(key)[0]]) - started[key] + 1
            device.set_tokens(key, tokens, position)
            host.set_tokens(key, tokens, position)
        device.ensure_room()
        host.ensure_room()
        if feeds.get("version") != device.version:
            feeds = {"version": device.version, "feed": device.feeds()}
            segments.append((device.buffer.ptr, device.rows, device.capacity, []))
        out = steps.decode(feeds["feed"])
        want = host_steps.decode(host.feeds())
        np.testing.assert_array_equal(out["logits"], want["logits"], err_msg=f"step {step}")
        segments[-1][3].append(decode.last_mode)
        device.append(out["kv_new"])                                 # the DeviceArray the engine wrote
        host.append(np.asarray(want["kv_new"]))
        if step % 25 == 0:
            cache, mask = device.download()
            np.testing.assert_array_equal(cache, host.buffer)
            np.testing.assert_array_equal(mask, host.mask)
    assert {(rows, capacity) for _, rows, capacity, _ in segments} >= {(4, 256), (6, 256), (8, 256), (8, 512)}
    if cuda_graphs:
        seen = set()
        for ptr, rows, capacity, modes in segments:
            if (ptr, rows, capacity) not in seen and len(modes) >= 3:   # a new binding: warm-up, capture, replays
                assert modes[:3] == ["plain", "capture", "replay"] and set(modes[3:]) <= {"replay"}, modes
            seen.add((ptr, rows, capacity))
        stats = decode.graph_stats
        assert stats.failed_captures == 0 and stats.replays > 150
    steps.close()
    assert not trt.cudart.device and not trt.cudart.host and not trt.cudart.execs


def test_the_scheduler_batch_runs_on_tensorrt_steps_as_on_the_host(fake_engines, manifest) -> None:
    """GptBatch (the scheduler's decode loop) over TrtGptSteps: the device prefill K/V and kv_new go into the
    device batch cache as they are, and every generation's codes equal the host batch's."""
    from runtime.gpt.generate import GenerationConfig
    from runtime.gpt.graph_steps import GraphGptSteps, geometry_of
    from runtime.gpt.sampling import RngDraws
    from runtime.scheduler.gpt_batch import GptBatch
    from runtime.trt.executor import TrtExecutor

    root, trt = fake_engines
    geometry = geometry_of(manifest)
    stream = cuda.Stream()
    prefill = TrtExecutor(manifest.graph("gpt_prefill"), root, "fp16", stream=stream, trt=trt)
    decode = TrtExecutor(manifest.graph("gpt_decode"), root, "fp16", stream=stream, trt=trt)
    device_steps = TrtGptSteps(prefill, decode, geometry, owned=(prefill, decode, stream))
    host_steps = GraphGptSteps(_ort(root, manifest, "gpt_prefill"), _ort(root, manifest, "gpt_decode"), geometry)
    configs = [GenerationConfig(num_beams=3, max_mel_tokens=12), GenerationConfig(num_beams=1, max_mel_tokens=9),
               GenerationConfig(do_sample=False, num_beams=2, max_mel_tokens=10)]
    codes = {}
    for name, steps in (("device", device_steps), ("host", host_steps)):
        batch = GptBatch(steps, steps.new_batch_cache(8, KV_BUCKETS))
        results = {}
        for i, config in enumerate(configs):
            feed = _request(manifest, 20 + i, 15 + 10 * i)
            done = batch.join(i, {"spk_latent": feed["spk_latent"]}, feed["emovec"], feed["text_ids"][0], config, RngDraws(i))
            assert done is None
            results.update(batch.step()[0])
        while batch.active:
            ended, failed = batch.step()
            assert not failed
            results.update(ended)
        assert batch.peak_rows == 6 and batch.cache.used_rows == 0
        codes[name] = {i: r.codes for i, r in results.items()}
    for i in range(len(configs)):
        np.testing.assert_array_equal(codes["device"][i], codes["host"][i], err_msg=f"generation {i}")
    device_steps.close()
