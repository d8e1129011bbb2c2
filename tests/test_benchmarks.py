"""benchmarks/: the measuring helpers, the fixed-length GPT wrapper, feed recording, the roofline's byte count,
the report, and one small end-to-end run of `python -m benchmarks.stages` on the tiny demo export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import measure as measure_mod
from benchmarks.backends import DECODE_CALL, FixedLengthSteps, Recorder
from benchmarks.measure import Stats, measure
from benchmarks.report import markdown, ratio
from benchmarks.roofline import Roofline, decode_weight_bytes, kv_bytes


def test_measure_repeats_fast_work_for_its_time_floor() -> None:
    calls = []
    out = measure(lambda: calls.append(1), repeats=2, warmup=1, min_seconds=0.05, warmup_seconds=0.01, max_runs=7)
    assert out.n == 7 and len(calls) == 14            # both floors hit the run cap on a no-op


def test_interleaved_measuring_alternates_and_counts() -> None:
    from benchmarks.measure import measure_interleaved

    order = []
    out = measure_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]       # warm-up, then alternating rounds
    assert out["a"].n == out["b"].n == 3


def test_stats_and_measure_count_runs() -> None:
    s = Stats.of([0.003, 0.001, 0.002])
    assert (s.median_ms, s.min_ms, s.max_ms, s.n) == pytest.approx((2.0, 1.0, 3.0, 3))
    calls = []
    out = measure(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and out.n == 4 and out.min_ms <= out.median_ms <= out.max_ms
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)
    with pytest.raises(ValueError):
        Stats.of([])


def test_peak_tracker_sees_an_allocation() -> None:
    """The peak is at least every resident size seen while the block lived. (Comparing the peak with the
    size at the start instead is flaky in a long test process: the kernel may reclaim other cold pages of
    the process meanwhile — this machine runs DAMON reclaim — so the start size overstates the baseline.)"""
    import mmap

    size = 64 << 20
    with measure_mod.PeakTracker() as t:
        before = measure_mod.rss_mib()
        # fresh anonymous pages, whatever the process's allocator keeps around from earlier tests (in a full
        # run a 64 MiB numpy array was seen to reuse resident memory: +1.6 MiB)
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):  # touch every page
            block[offset] = 1
        during = measure_mod.rss_mib()
        block.close()
    r = t.result
    assert r.peak_mib is not None and r.start_mib is not None
    assert during - before >= 60                     # the resident size counts the touched block
    if not r.since_start_of_process:                # the peak was reset: it must include the block
        # (within 1 MiB: the kernel updates VmHWM from batched per-CPU RSS counters, seen lagging VmRSS by
        # a few dozen pages; the block alone is 64 MiB)
        assert r.peak_mib >= during - 1.0


class _Steps:
    class geometry:
        stop_mel_token = 3

    def __init__(self) -> None:
        self.cache_calls: list[tuple] = []
        self.closed = 0

    def prefill(self, feed):
        return {"logits": np.zeros((1, 5), np.float32)}

    def decode(self, feed):
        logits = np.zeros((2, 5), np.float32)
        logits[:, 3] = 100.0                        # the stop token would win
        return {"logits": logits}

    def new_cache(self, kv, beams, max_rows, buckets):
        self.cache_calls.append((kv, beams, max_rows, tuple(buckets)))
        return "device cache"

    def new_batch_cache(self, max_rows, buckets):
        return None

    def close(self) -> None:
        self.closed += 1


def test_fixed_length_steps_hide_the_stop_token_and_pass_the_rest_through() -> None:
    inner = _Steps()
    steps = FixedLengthSteps(inner)
    out = steps.decode({})
    assert np.isneginf(out["logits"][:, 3]).all() and np.argmax(out["logits"], axis=1).tolist() == [0, 0]
    assert np.isneginf(steps.prefill({})["logits"][0, 3])
    assert steps.new_cache("kv", 3, 40, (8, 16)) == "device cache" and steps.geometry.stop_mel_token == 3
    assert inner.cache_calls == [("kv", 3, 40, (8, 16))]
    steps.close()
    assert inner.closed == 1


def test_fixed_length_generation_runs_to_the_cap(tiny_export) -> None:
    from runtime.executors.ort import OrtExecutor
    from runtime.gpt.generate import GenerationConfig, generate
    from runtime.gpt.graph_steps import GraphGptSteps, geometry_of
    from runtime.manifest import read_manifest

    root = tiny_export[0]
    m = read_manifest(root)
    inner = GraphGptSteps(OrtExecutor(m.graph("gpt_prefill"), root, "ort-cpu"),
                          OrtExecutor(m.graph("gpt_decode"), root, "ort-cpu"), geometry_of(m))
    # a stop-token-favouring bias on the inner steps: without the wrapper generation would stop at once
    stop = inner.geometry.stop_mel_token

    class Biased:
        geometry = inner.geometry

        def prefill(self, feed):
            out = inner.prefill(feed)
            out["logits"][..., stop] = 1e4
            return out

        def decode(self, feed):
            out = inner.decode(feed)
            out["logits"][..., stop] = 1e4
            return out

        def new_cache(self, kv, beams, max_rows, buckets):
            return inner.new_cache(kv, beams, max_rows, buckets)

        def new_batch_cache(self, max_rows, buckets):
            return None

        def close(self) -> None:
            inner.close()

    rng = np.random.default_rng(0)
    spk = {"spk_latent": rng.standard_normal((1, 32, m.dims.model_dim)).astype(np.float32)}
    emo = rng.standard_normal((1, m.dims.model_dim)).astype(np.float32)
    text = rng.integers(2, m.dims.text_vocab, 12)
    cfg = GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=9)
    assert generate(Biased(), spk, emo, text, cfg).codes.size == 1          # stops at once
    got = generate(FixedLengthSteps(Biased()), spk, emo, text, cfg)
    assert got.codes.size == 9 and stop not in got.codes.tolist() and not got.stopped


def test_recorder_keeps_copies_of_the_chosen_calls() -> None:
    class Inner:
        name, backend, entry = "gpt_decode", "fake", None

        def run(self, feed, outputs=None):
            return {"y": feed["x"] * 2}

    rec = Recorder(Inner())
    x = np.zeros(3, np.float32)
    for i in range(DECODE_CALL + 3):
        x[:] = i
        assert rec.run({"x": x})["y"][0] == 2 * i
    assert list(rec.kept) == [DECODE_CALL] and rec.kept[DECODE_CALL]["x"][0] == DECODE_CALL
    Inner.name = "bigvgan"
    rec = Recorder(Inner())
    for i in range(4):
        rec.run({"x": np.full(2, i, np.float32)})
    assert sorted(rec.kept) == [0, 1] and rec.kept[1]["x"][0] == 1


def test_roofline_counts_streamed_weights_not_gathered_tables(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((64, 32), np.float32), "w")             # MatMul: streamed
    table = numpy_helper.from_array(np.zeros((1000, 64), np.float32), "table")   # Gather only: one row
    shared = numpy_helper.from_array(np.zeros((64,), np.float16), "b")           # Add: streamed (fp16)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Add", ["e", "b"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              initializer=[w, table, shared])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert decode_weight_bytes(path) == (64 * 32 * 4 + 64 * 2, 1000 * 64 * 4)
    feed = {"kv_cache.0": np.zeros((2, 1, 2, 8, 4), np.float32), "mel_ids": np.zeros((1, 1), np.int64)}
    assert kv_bytes(feed) == 2 * 2 * 8 * 4 * 4
    roof = Roofline.of(path, feed, bandwidth_gbs=1.0)                            # 1 GB/s = 1e6 bytes/ms
    assert roof.weights_ms == pytest.approx((64 * 32 * 4 + 128) / 1e6)
    assert roof.weights_and_kv_ms == pytest.approx((64 * 32 * 4 + 128 + 512) / 1e6)


def test_stages_cli_on_the_tiny_export(tiny_ckpt, tiny_export, tmp_path, capsys) -> None:
    from benchmarks import stages

    texts = tmp_path / "texts.txt"
    texts.write_text("Hello world.\n\nA second, slightly longer text to read aloud.\n", encoding="utf-8")
    out = tmp_path / "results"
    code = stages.main(["--engines", str(tiny_export[0]), "--checkpoints", str(tiny_ckpt), "--backends",
                        "torch,ort-cpu", "--texts", str(texts), "--repeats", "1", "--gpt-tokens", "6",
                        "--threads", "2", "--stage-seconds", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["backends"]) == ["torch", "ort-cpu"]
    for name, backend in results["backends"].items():
        stages_seen = backend["stages"]
        assert {"GPT prefill", "GPT decode step (graph)", "BigVGAN", "Euler solve (25 DiT steps)",
                "GPT decode per token (in loop)", "front-ends (host, shared code)"} <= set(stages_seen), name
        assert all(s["n"] == 1 and s["median_ms"] > 0 for k, s in stages_seen.items()
                   if k != "GPT decode per token (in loop)"), name
        assert [e["text_chars"] for e in backend["e2e"]] == [12, 45]
        for e in backend["e2e"]:
            # 6 codes -> 10 mel frames -> 2560 samples at 22.05 kHz, per segment
            assert e["audio_s"] == pytest.approx(e["segments"] * 2560 / 22050)
            assert e["rtf"] == pytest.approx(e["wall"]["median_ms"] / 1e3 / e["audio_s"])
            assert e["first_audio"]["median_ms"] <= e["wall"]["median_ms"]
    assert results["settings"]["gpt_tokens"] == 6 and results["roofline"]["weights"] > 0
    md = (out / "results.md").read_text()
    assert "| stage | torch | ort-cpu | ort-cpu / torch |" in md and "roofline, weights" in md
    r = ratio(results, "ort-cpu", "BigVGAN")
    assert r == pytest.approx(results["backends"]["ort-cpu"]["stages"]["BigVGAN"]["median_ms"]
                              / results["backends"]["torch"]["stages"]["BigVGAN"]["median_ms"])
    assert f"{r:.2f}×" in markdown(results)
    assert (out / "results.png").stat().st_size > 1000


def test_stages_cli_refuses_bad_arguments(tiny_ckpt, tiny_export, tmp_path, capsys) -> None:
    from benchmarks import stages

    base = ["--engines", str(tiny_export[0]), "--out", str(tmp_path / "r")]
    cases = [
        (["--backends", "torch"], "the torch backend needs --checkpoints"),
        (["--backends", "ort-cpu,cuda-magic", "--checkpoints", str(tiny_ckpt)], "choose from torch, ort-cpu"),
        (["--backends", "ort-cpu", "--checkpoints", str(tiny_ckpt), "--texts", str(tmp_path / "none.txt")],
         "none.txt: file not found"),
        (["--backends", "ort-cpu", "--speaker", str(tmp_path / "absent.wav")], "absent.wav: file not found"),
    ]
    for extra, message in cases:
        assert stages.main(base + extra) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert stages.main(["--engines", str(tmp_path), "--backends", "ort-cpu", "--checkpoints", str(tiny_ckpt)]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_percentiles_are_nearest_rank() -> None:
    from benchmarks.measure import Percentiles

    p = Percentiles.of([3.0, 1.0, 2.0])
    assert (p.p50, p.p95, p.n, p.p95_is_max) == (2.0, 3.0, 3, True)          # p95 of n=3 = max
    twenty = Percentiles.of([float(i) for i in range(1, 21)])
    assert (twenty.p50, twenty.p95, twenty.p95_is_max) == (10.5, 19.0, False)  # rank ceil(0.95 * 20) = 19
    assert Percentiles.of([float(i) for i in range(1, 101)]).p95 == 95.0
    with pytest.raises(ValueError):
        Percentiles.of([])


def _stream_records(ttfa: list[float], first: list[float], euler: list[float]) -> list[dict]:
    """Synthetic runs of one backend on one one-segment text (two chunks, one gap each)."""
    records = []
    for i, (t, f, e) in enumerate(zip(ttfa, first, euler)):
        base = {"backend": "b", "text": 0, "repeat": i}
        records.append({**base, "mode": "offline", "first_segment_s": f, "wall_s": f, "segments": 1,
                        "audio_s": 1.0})
        records.append({**base, "mode": "streamed", "ttfa_s": t, "wall_s": t + 0.5, "segments": 1, "chunks": 2,
                        "audio_s": 1.0, "euler_end_s": e, "first_chunk_after_euler_s": [t - e],
                        "segment_vocoder_s": [0.1], "speech_gaps_s": [0.1 * (i + 1)], "underruns": i % 2,
                        "stall_s": 0.05 * (i % 2), "ttfa_over_offline_first": t / f})
    return records


def test_stream_summary_pairs_rounds_and_states_the_criterion() -> None:
    from benchmarks.stream_report import markdown, summarize

    records = _stream_records(ttfa=[0.5, 0.7, 0.6], first=[1.0, 1.0, 2.0], euler=[0.4, 0.5, 0.5])
    texts = [{"index": 0, "chars": 10, "text": "Hello you.", "segments": {"offline": 1, "streamed": 1},
              "intended_segments": 1}]
    chunk = {"b": {"segment_frames": 13, "window": "w", "chunk_samples": 3328, "chunk_audio_s": 0.15,
                   "stats_ms": {"median_ms": 125.0, "min_ms": 100.0, "max_ms": 150.0, "n": 10}}}
    summary = summarize(records, texts, ["b"], chunk, 1.2)
    s = summary["b"]["texts"][0]
    assert (s["ttfa_s"]["p50"], s["ttfa_s"]["p95"], s["ttfa_s"]["n"]) == (0.6, 0.7, 3)
    assert s["ttfa_over_offline_first"]["p50"] == pytest.approx(0.5)        # per round: 0.5, 0.7, 0.3
    assert s["speech_gap_max_s"] == pytest.approx(0.3) and s["underruns"]["p50"] == 0
    crit = summary["b"]["criterion"]                                         # differences 0.1, 0.2, 0.1
    assert crit["difference_s"] == pytest.approx(0.1) and crit["chunks"] == pytest.approx(0.8) and crit["met"]
    results = {"settings": {"repeats": 3, "gpt_tokens": 8, "euler_steps": 25, "threads": 2, "criterion_chunks": 1.2,
                            "quick_streaming_tokens": {"offline": 0, "streamed": 120},
                            "stream": {"first_chunk_frames": 4, "max_chunk_frames": 8, "pipeline": True}},
               "texts": texts, "vocoder_chunk": chunk, "summary": summary,
               "machine": {"cpu": "c", "logical_cpus": 2, "memory_gib": 1, "os": "o", "python": "3", "versions": {},
                           "gpu": "none"}}
    md = markdown(results)
    assert "p50 (p95 of n=3 = max)" in md
    assert "| b | #1, 10 chars (1 → 1) | 1.00 s | 1.00 s (2.00 s) | 600 ms (700 ms) | 0.50 (0.70) |" in md
    assert "0.80 chunks (met: ≤ 1.2)" in md


def test_stream_cli_on_the_tiny_export(tiny_ckpt, tiny_export, tmp_path, capsys) -> None:
    from benchmarks import stream

    texts = tmp_path / "texts.txt"
    # one segment in both modes; one segment offline, two with quick_streaming_tokens 120 (62 tokens of the
    # tiny demo's tokenizer: > 60, the cap quick streaming puts on the first 120 tokens' segments)
    two = ("The train was late, and the rain kept falling. Please read slowly, then pause for a moment. One more "
           "sentence ends the text, and then we stop.")
    texts.write_text(f"Hello world.\n{two}\n", encoding="utf-8")
    out = tmp_path / "results"
    code = stream.main(["--engines", str(tiny_export[0]), "--checkpoints", str(tiny_ckpt), "--backends", "ort-cpu",
                        "--texts", str(texts), "--repeats", "1", "--gpt-tokens", "8", "--threads", "2",
                        "--chunk-frames", "8", "--max-chunk-frames", "32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    assert {"machine", "settings", "texts", "vocoder_chunk", "summary", "runs"} <= set(results)
    assert results["settings"]["stream"] == {"first_chunk_frames": 8, "max_chunk_frames": 32, "pipeline": True}
    assert [t["segments"] for t in results["texts"]] == [{"offline": 1, "streamed": 1}, {"offline": 1, "streamed": 2}]
    assert len(results["runs"]) == 4                                 # 2 texts x 2 modes x 1 repeat
    segment = 3328 / 22050                                           # 8 codes -> 13 mel frames -> 3328 samples
    for r in results["runs"]:
        want = segment * r["segments"] + 0.2 * (r["segments"] - 1)   # 200 ms of silence between segments
        assert r["audio_s"] == pytest.approx(want, abs=1e-4), r
        if r["mode"] == "streamed":
            ready = [a["ready_s"] for a in r["arrivals"]]
            assert r["ttfa_s"] == ready[0] > 0 and ready == sorted(ready) and r["wall_s"] >= ready[-1]
            assert r["ttfa_s"] >= r["euler_end_s"] > 0 and r["ttfa_over_offline_first"] > 0
            assert all(d > 0 for d in r["first_chunk_after_euler_s"]) and len(r["first_chunk_after_euler_s"]) == \
                r["segments"]
            assert r["chunks"] >= 2 * r["segments"] - 1 and r["underruns"] == sum(a["buffered_s"] < 0
                                                                                  for a in r["arrivals"])
        else:
            assert 0 < r["first_segment_s"] <= r["wall_s"]
    chunk = results["vocoder_chunk"]["ort-cpu"]
    assert chunk["segment_frames"] == 13 and 0 < chunk["chunk_samples"] <= 3328 and chunk["stats_ms"]["median_ms"] > 0
    crit = results["summary"]["ort-cpu"]["criterion"]
    assert crit["text"] == 0 and crit["first_audio_s"] >= crit["euler_end_s"] and crit["chunks"] > 0
    md = (out / "results.md").read_text()
    assert "| backend | text (segments offline → streamed) | audio | offline first segment | TTFA p50 (p95) |" in md
    assert "| ort-cpu | #1, 12 chars (1 → 1) |" in md and f"| ort-cpu | #2, {len(two)} chars (1 → 2) |" in md
    assert "- ort-cpu (text #1, p50 of n=1): Euler end" in md
    assert f"| ort-cpu | #2, {len(two)} chars (1 → 2) |" in printed and "wrote " in printed


def test_stream_cli_refuses_bad_arguments(tiny_ckpt, tiny_export, tmp_path, capsys) -> None:
    from benchmarks import stream

    base = ["--engines", str(tiny_export[0]), "--checkpoints", str(tiny_ckpt), "--out", str(tmp_path / "r")]
    cases = [
        (["--backends", "ort-cpu,cuda-magic"], "choose from torch, ort-cpu"),
        (["--backends", "ort-cpu", "--repeats", "0"], "--repeats must be >= 1"),
        (["--backends", "ort-cpu", "--gpt-tokens", "1"], "--gpt-tokens >= 2"),
        (["--backends", "ort-cpu", "--chunk-frames", "0"], "--chunk-frames must be > 0"),
        (["--backends", "ort-cpu", "--chunk-frames", "64", "--max-chunk-frames", "32"], "max_frames 32 < first_frames 64"),
        (["--backends", "ort-cpu", "--threads", "0"], "--threads must be >= 1"),
        (["--backends", "ort-cpu", "--texts", str(tmp_path / "none.txt")], "none.txt: file not found"),
        (["--backends", "ort-cpu", "--speaker", str(tmp_path / "absent.wav")], "absent.wav: file not found"),
    ]
    for extra, message in cases:
        assert stream.main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and "Traceback" not in err, err
    assert stream.main(["--engines", str(tmp_path), "--backends", "torch"]) == 1
    assert "the torch backend needs --checkpoints" in capsys.readouterr().err
    assert stream.main(["--engines", str(tmp_path / "absent"), "--backends", "ort-cpu"]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_concurrency_cli_on_the_tiny_export(tiny_ckpt, tiny_export, tmp_path, capsys) -> None:
    from benchmarks import concurrency

    out = tmp_path / "results"
    code = concurrency.main(["--engines", str(tiny_export[0]), "--checkpoints", str(tiny_ckpt), "--levels", "1,2",
                             "--beams", "1,2", "--gpt-tokens", "6", "--e2e-tokens", "4", "--gpt-rounds", "2", "--rounds", "1",
                             "--euler-steps", "2",
                             "--threads", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "results.json").read_text())
    gpt = {(r["beams"], r["level"]): r for r in results["gpt_phase"]}
    assert set(gpt) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for (beams, level), r in gpt.items():
        assert r["tokens"] == level * 6 and r["rows"] == beams * level
        assert r["steady_steps"] >= 1 and r["step_over_call"] >= 1.0      # a step includes its graph call
        assert 1 <= r["prefill_calls"] <= level and 1 <= r["latent_calls"] <= level   # one text: shared calls
        assert len(r["rounds"]) == 2 and min(r["rounds"]) <= r["tokens_per_s"] <= max(r["rounds"])
    assert results["settings"]["e2e_tokens"] == "4"
    assert [r["level"] for r in results["end_to_end"]] == [1, 2]
    assert all(r["requests"] == r["level"] for r in results["end_to_end"])
    assert set(results["decode_ceiling_s"]) >= {"1", "2", "4"}
    assert "| 2 | 2 | 4 |" in (out / "results.md").read_text()


def test_concurrency_cli_refuses_bad_settings_before_loading(tiny_export, tiny_ckpt, tmp_path, capsys) -> None:
    from benchmarks import concurrency

    speaker = str(tiny_ckpt / "examples" / "speaker.wav")
    assert concurrency.main(["--engines", str(tiny_export[0]), "--levels", "1,0", "--speaker", speaker]) == 1
    assert "--levels: integers >= 1" in capsys.readouterr().err
    assert concurrency.main(["--engines", str(tiny_export[0]), "--speaker", str(tmp_path / "none.wav")]) == 1
    assert "speaker reference not found" in capsys.readouterr().err


def test_memory_cli_loads_each_backend_in_its_own_process(tiny_ckpt, tiny_export, tmp_path, capsys) -> None:
    """Two backends, two child processes: each row says what its load added (more than nothing: the models),
    the torch row from the checkpoint; the table and the JSON are written."""
    from benchmarks.memory import main

    assert main(["--engines", str(tiny_export[0]), "--checkpoints", str(tiny_ckpt), "--backends", "torch,ort-cpu",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["torch", "ort-cpu"]
    for r in rows:
        assert "error" not in r and r["added_gib"]["VmRSS"] > 0 and r["peak_gib"] >= r["after_gib"]["VmRSS"] - 1e-6
        assert r["before_gib"]["VmRSS"] > 0                 # the baseline was read after the imports
    assert "| torch |" in (tmp_path / "memory.md").read_text()


def test_memory_cli_refuses_bad_arguments(tiny_export, tmp_path, capsys) -> None:
    from benchmarks.memory import main

    assert main(["--engines", str(tiny_export[0]), "--backends", "tpu"]) == 1
    assert "--backends: ['tpu']" in capsys.readouterr().err
    assert main(["--engines", str(tiny_export[0]), "--backends", "torch"]) == 1
    assert "torch backend needs --checkpoints" in capsys.readouterr().err
    assert main(["--engines", str(tmp_path), "--backends", "ort-cpu"]) == 1
    assert "no manifest.json" in capsys.readouterr().err
