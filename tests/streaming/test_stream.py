"""Streaming on the tiny demo export: the stream is the offline audio, its chunks are well formed, and it
behaves under failure, early close and concurrent use.

The offline reference is `synthesize()` with one vocoder call per segment (the form the runtime parity
tests hold equal to the eager pipeline); the stream runs the vocoder in chunks with receptive-field context
and the next segment's GPT ahead in a worker thread. Faithfulness: identical codes, mel bit-identical
(same graphs, same inputs, same order), waveform within 1 LSB (the chunked vocoder's float rounding).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import InputError, StreamError
from runtime.gpt.generate import GenerationConfig
from runtime.request import DecoderSettings, SynthesisRequest
from runtime.streaming.chunks import SILENCE, SPEECH, StreamSettings
from runtime.synthesizer import Synthesizer
from tests.test_runtime_parity import CASES, SEED, _request

DECODER = DecoderSettings(steps=4)
PCM_LSB = 1
CHUNKED = StreamSettings.chunks(8, 32)
MULTI = {"text": "The train was late. 今天天气很好。Please read slowly, then pause. One more sentence to end.",
         "max_text_tokens_per_segment": 8}


@pytest.fixture(scope="module")
def synth(tiny_export) -> Synthesizer:
    tts = Synthesizer(tiny_export[0], "ort-cpu", emo_text_max_new_tokens=8)
    yield tts
    tts.close()


def _chunks(tts: Synthesizer, request: SynthesisRequest, generation: GenerationConfig, seed: int,
            settings: StreamSettings = CHUNKED) -> list:
    return list(tts.stream(request, generation, DECODER, seed=seed, settings=settings))


def assert_stream_is_offline(chunks: list, whole, what: str) -> None:
    results = [c.result for c in chunks if c.result is not None]
    assert len(results) == len(whole.segments), what
    for a, b in zip(whole.segments, results):
        where = f"{what}, segment {a.index}"
        np.testing.assert_array_equal(b.codes, a.codes, err_msg=f"{where}: codes")
        np.testing.assert_array_equal(b.mel, a.mel, err_msg=f"{where}: mel")
        assert b.pcm.shape == a.pcm.shape, where
        assert np.abs(b.pcm.astype(np.int32) - a.pcm).max(initial=0) <= PCM_LSB, f"{where}: waveform"
    pcm = np.concatenate([c.pcm for c in chunks])
    assert pcm.shape == whole.pcm.shape, what
    assert np.abs(pcm.astype(np.int32) - whole.pcm).max(initial=0) <= PCM_LSB, what


@pytest.mark.parametrize("case", list(CASES))
def test_the_stream_is_the_offline_audio(case, synth, tiny_ckpt) -> None:
    kw, generation, seed = (*CASES[case], SEED)[:3]
    request = _request(tiny_ckpt, kw)
    whole = synth.synthesize(request, generation, DECODER, seed=seed)
    chunks = _chunks(synth, request, generation, seed)
    assert_stream_is_offline(chunks, whole, case)
    for seg in whole.segments:                        # every segment in the chunks its length asks for
        mine = [c for c in chunks if c.kind == SPEECH and c.segment == seg.index and c.samples]
        assert len(mine) == len(synth.vocoder_windows(seg.mel.shape[-1], CHUNKED)), f"{case}, segment {seg.index}"


def test_chunks_are_in_order_and_contiguous(synth, tiny_ckpt) -> None:
    request = _request(tiny_ckpt, MULTI)
    chunks = _chunks(synth, request, GenerationConfig(max_mel_tokens=30), 3)
    count = chunks[0].segments
    assert count >= 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    offset = 0
    for c in chunks:
        assert c.offset == offset and c.pcm.dtype == np.int16
        offset += c.samples
    ready = [c.ready_s for c in chunks]
    assert ready == sorted(ready) and ready[0] > 0
    silences = [c for c in chunks if c.kind == SILENCE]
    assert len(silences) == count - 1
    assert all(c.samples == int(22050 * 0.2) and not c.pcm.any() for c in silences)
    for seg in range(count):
        mine = [c for c in chunks if c.segment == seg and c.kind == SPEECH]
        assert mine[-1].last_in_segment and mine[-1].result is not None
        assert all(c.result is None for c in mine[:-1])
        np.testing.assert_array_equal(np.concatenate([c.pcm for c in mine]), mine[-1].result.pcm)
    assert chunks[-1].kind == SPEECH


def test_chunks_grow_from_the_first_size(synth, tiny_ckpt) -> None:
    request = _request(tiny_ckpt, {"text": "The quick brown fox jumps over the lazy dog."})
    generation = GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=60)
    chunks = _chunks(synth, request, generation, 1, StreamSettings.chunks(4, 16))
    frames = [c.samples // 256 for c in chunks if c.kind == SPEECH]
    assert frames[:4] == [4, 8, 16, 16] and max(frames) == 16, frames
    assert sum(frames) == chunks[-1].result.mel.shape[-1]


def test_pipelining_changes_nothing(synth, tiny_ckpt) -> None:
    request = _request(tiny_ckpt, MULTI)
    generation = GenerationConfig(do_sample=True, num_beams=1, max_mel_tokens=20)
    ahead = _chunks(synth, request, generation, 9, StreamSettings.chunks(8, 32, pipeline=True))
    inline = _chunks(synth, request, generation, 9, StreamSettings.chunks(8, 32, pipeline=False))
    assert len(ahead) == len(inline)
    for a, b in zip(ahead, inline):
        np.testing.assert_array_equal(a.pcm, b.pcm)


def test_synthesize_is_the_concatenated_stream(synth, tiny_ckpt) -> None:
    request = _request(tiny_ckpt, MULTI)
    generation = GenerationConfig(max_mel_tokens=20)
    whole = synth.synthesize(request, generation, DECODER, seed=4, settings=CHUNKED)
    chunks = _chunks(synth, request, generation, 4)
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), whole.pcm)


def test_quick_streaming_tokens_is_honoured_by_stream_and_synthesize(synth, tiny_ckpt) -> None:
    text = "The train was late. Please read slowly, then pause. The quick brown fox jumps over the lazy dog."
    plain = _request(tiny_ckpt, {"text": text, "max_text_tokens_per_segment": 40})
    quick = _request(tiny_ckpt, {"text": text, "max_text_tokens_per_segment": 40, "quick_streaming_tokens": 80})
    assert len(synth.segments(quick)) > len(synth.segments(plain))
    generation = GenerationConfig(max_mel_tokens=10)
    whole = synth.synthesize(quick, generation, DECODER, seed=2)
    assert len(whole.segments) == len(synth.segments(quick))
    assert_stream_is_offline(_chunks(synth, quick, generation, 2), whole, "quick streaming")


def test_bad_settings_are_refused_before_any_work(synth, tiny_ckpt) -> None:
    with pytest.raises(InputError, match="first_frames must be a positive number of mel frames, got 0"):
        StreamSettings.chunks(0, 32)
    with pytest.raises(InputError, match="max_frames 32 < first_frames 64"):
        StreamSettings.chunks(64, 32)
    with pytest.raises(InputError, match="quick_streaming_tokens must be >= 0"):
        SynthesisRequest(text="x", speaker=Path("x.wav"), quick_streaming_tokens=-1)
    missing = SynthesisRequest(text="Hello.", speaker=tiny_ckpt / "no-such-speaker.wav")
    limit = synth.manifest.graph("bigvgan").ranges["mel_len"].max
    with pytest.raises(InputError, match="mel_len"):      # the chunk check comes before the speaker is read
        synth.stream(missing, settings=StreamSettings.chunks(limit, limit))


class _FailingExecutor:
    """Wraps an executor; its `fail_at`-th run (0-based) raises, then it runs normally again."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.entry = inner.entry

    def run(self, feed, outputs=None):
        n = self.calls
        self.calls += 1
        if n == self.fail_at:
            raise RuntimeError(f"injected failure at run {n}")
        return self.inner.run(feed, outputs)


def test_a_failure_mid_stream_names_the_chunk_and_the_synthesizer_keeps_serving(synth, tiny_ckpt,
                                                                                monkeypatch) -> None:
    request = _request(tiny_ckpt, MULTI)
    generation = GenerationConfig(max_mel_tokens=20)
    want = _chunks(synth, request, generation, 6)
    real = synth.graphs["bigvgan"]
    failing = _FailingExecutor(real, fail_at=3)
    monkeypatch.setattr(synth.scheduler.vocoder, "bigvgan", failing)      # the vocoder worker runs it
    got = []
    with pytest.raises(StreamError) as info:
        for chunk in synth.stream(request, generation, DECODER, seed=6, settings=CHUNKED):
            got.append(chunk)
    err = info.value
    assert err.chunks == len(got) > 0 and "injected failure at run 3" in str(err)
    assert f"after {len(got)} chunk(s)" in str(err) and isinstance(err.__cause__, RuntimeError)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a.pcm, b.pcm)
    again = _chunks(synth, request, generation, 6)                  # the same synthesizer, next request
    assert len(again) == len(want)
    for a, b in zip(want, again):
        np.testing.assert_array_equal(a.pcm, b.pcm)


def test_a_gpt_failure_in_the_worker_reaches_the_caller(synth, tiny_ckpt, monkeypatch) -> None:
    real = Synthesizer.codes_stage

    def failing(self, prep, index, generation):
        if index == 2:
            raise InputError("injected GPT failure")
        return real(self, prep, index, generation)

    monkeypatch.setattr(Synthesizer, "codes_stage", failing)
    request = _request(tiny_ckpt, MULTI)
    got = []
    with pytest.raises(StreamError, match=r"segment 3/\d+ after \d+ chunk\(s\).*injected GPT failure"):
        for chunk in synth.stream(request, GenerationConfig(max_mel_tokens=10), DECODER, seed=1, settings=CHUNKED):
            got.append(chunk)
    assert {c.segment for c in got} == {0, 1}


def test_closing_a_stream_early_stops_its_worker(synth, tiny_ckpt) -> None:
    request = _request(tiny_ckpt, MULTI)
    generation = GenerationConfig(max_mel_tokens=20)
    stream = synth.stream(request, generation, DECODER, seed=8, settings=CHUNKED)
    first = next(stream)
    assert first.index == 0
    stream.close()                                   # a client that went away
    for _ in range(100):
        if not any(t.name == "gpt-ahead" and t.is_alive() for t in threading.enumerate()):
            break
        threading.Event().wait(0.1)
    assert not any(t.name == "gpt-ahead" and t.is_alive() for t in threading.enumerate())
    whole = synth.synthesize(request, generation, DECODER, seed=8)     # still serving, nothing left locked
    assert len(whole.segments) >= 3


def test_concurrent_streams_each_get_their_own_audio(synth, tiny_ckpt) -> None:
    requests = [(_request(tiny_ckpt, MULTI), 11), (_request(tiny_ckpt, {"text": "Hello world. This is a test!"}), 12)]
    generation = GenerationConfig(do_sample=True, num_beams=1, max_mel_tokens=20)
    alone = [synth.synthesize(r, generation, DECODER, seed=s) for r, s in requests]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = _chunks(synth, requests[i][0], generation, requests[i][1])
        except BaseException as err:          # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i, whole in enumerate(alone):
        assert_stream_is_offline(results[i], whole, f"request {i} under concurrency")
