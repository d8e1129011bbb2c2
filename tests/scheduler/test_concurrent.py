"""Requests from many threads share graph calls and each gets exactly its audio alone (tiny export, ORT).

Faithfulness as the issue states it: identical codes, mel within the parity tolerance, waveform within
1 LSB, for requests of different text lengths, modes (voice cloning, emotion vector, emotion audio), beam
counts and sampling settings, joining at different times; a request that fails or is cancelled fails alone
and its rows are freed; a full queue is an error the caller sees before any work.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime.errors import QueueFull, StreamError
from runtime.gpt.generate import GenerationConfig
from runtime.request import DecoderSettings
from runtime.scheduler.scheduler import SchedulerConfig
from runtime.streaming.chunks import StreamSettings
from runtime.synthesizer import Synthesizer
from tests.test_runtime_parity import _request, assert_same_audio

DECODER = DecoderSettings(steps=4)
LONG = {"text": "The train was late. 今天天气很好。Please read slowly, then pause.", "max_text_tokens_per_segment": 8}
# (request fields, generation, seed, streamed in chunks)
REQUESTS = [
    ({}, GenerationConfig(max_mel_tokens=40), 7, False),
    ({"emo_vector": (0, 0.4, 0, 0, 0, 0, 0.3, 0), "emo_alpha": 0.8, "text": "Short one."},
     GenerationConfig(do_sample=True, num_beams=1, top_k=10, temperature=1.2, max_mel_tokens=30), 8, True),
    ({**LONG, "emo_audio": "examples/emotion.wav", "emo_alpha": 0.6},
     GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=30), 9, False),
    ({"text": "A longer sentence, to let the beams run for a while."},
     GenerationConfig(do_sample=True, num_beams=3, max_mel_tokens=60), 11, True),
    ({"text": "Beams without sampling, please."},
     GenerationConfig(do_sample=False, num_beams=2, max_mel_tokens=40, repetition_penalty=2.0), 12, False),
]


@pytest.fixture(scope="module")
def synth(tiny_export) -> Synthesizer:
    tts = Synthesizer(tiny_export[0], "ort-cpu")
    yield tts
    tts.close()


def _run(synth, tiny_ckpt, spec):
    kw, generation, seed, streamed = spec
    request = _request(tiny_ckpt, kw)
    settings = StreamSettings.chunks(8, 32) if streamed else None
    return synth.synthesize(request, generation, DECODER, seed=seed, settings=settings)


def _concurrently(fns: dict) -> tuple[dict, dict]:
    results, errors = {}, {}

    def run(key):
        try:
            results[key] = fns[key]()
        except BaseException as err:  # noqa: BLE001 — reported by the test
            errors[key] = err

    threads = [threading.Thread(target=run, args=(k,)) for k in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    return results, errors


def _delayed(fn, delay):
    def run():
        time.sleep(delay)
        return fn()
    return run


class Gates:
    """Joins at different decode steps, and the Euler stage made to overlap, whatever the machine's speed:
    request i starts once the shared decode has made JOIN_AT[i] calls, and the first dit_step call of the
    concurrent phase waits (up to 30 s) until a second solve is submitted."""

    JOIN_AT = (0, 0, 4, 8, 12)

    def __init__(self, synth) -> None:
        self.batch, self.mel = synth.scheduler.gpt.batch, synth.scheduler.mel
        self.calls = 0
        self.started = [threading.Event() for _ in self.JOIN_AT]
        for i, at in enumerate(self.JOIN_AT):
            if at == 0:
                self.started[i].set()
        self.inner_steps, self.inner_dit = self.batch.steps, self.mel.euler.dit_step
        self.dit_waited = False
        gates = self

        class Steps:
            geometry = gates.inner_steps.geometry

            def prefill(self, feed):
                return gates.inner_steps.prefill(feed)

            def decode(self, feed):
                gates.calls += 1
                for i, at in enumerate(gates.JOIN_AT):
                    if gates.calls >= at:
                        gates.started[i].set()
                return gates.inner_steps.decode(feed)

            def new_cache(self, kv, beams, max_rows, buckets):
                return gates.inner_steps.new_cache(kv, beams, max_rows, buckets)

            def new_batch_cache(self, max_rows, buckets):
                return gates.inner_steps.new_batch_cache(max_rows, buckets)

            def close(self):
                gates.inner_steps.close()

        class Dit:
            name, backend = "dit_step", "gate"

            def run(self, feed, outputs=None):
                if not gates.dit_waited:
                    gates.dit_waited = True
                    deadline = time.monotonic() + 30
                    while len(gates.mel._inbox) + len(gates.mel.pending) + len(gates.mel.active) < 2 and \
                            time.monotonic() < deadline:
                        time.sleep(0.01)
                return gates.inner_dit.run(feed, outputs)

        self.steps, self.dit = Steps(), Dit()

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(self.batch, "steps", self.steps)
        monkeypatch.setattr(self.mel.euler, "dit_step", self.dit)

    def wait_turn(self, i: int) -> None:
        self.started[i].wait(60)                   # the decode may end sooner: start anyway then


def assert_concurrent_requests_are_alone(synth, ckpt, monkeypatch, what: str) -> None:
    """REQUESTS alone, then together through the Gates: each equals its run alone, they shared decode steps,
    Euler steps and S_infer calls, and every row is freed (shared by the 2.0 and the 2.5 tests)."""
    alone = [_run(synth, ckpt, spec) for spec in REQUESTS]
    gpt, mel = synth.scheduler.gpt.batch, synth.scheduler.mel.euler
    calls_alone, s_infer_alone = gpt.decode_calls, synth.scheduler.gpt.latent_calls
    assert gpt.peak_rows == 3 and mel.peak_rows == 1            # alone: a request's own beams, one solve
    gates = Gates(synth)
    gates.install(monkeypatch)

    def client(i):
        gates.wait_turn(i)
        return _run(synth, ckpt, REQUESTS[i])

    results, errors = _concurrently({i: (lambda i=i: client(i)) for i in range(len(REQUESTS))})
    assert not errors, errors
    for i, want in enumerate(alone):
        assert_same_audio(want, results[i], f"{what}: request {i} under concurrency")
    assert gpt.peak_rows > 3 and mel.peak_rows > 1              # they really shared graph calls
    assert gpt.decode_calls - calls_alone < calls_alone
    assert synth.scheduler.gpt.latent_calls - s_infer_alone <= s_infer_alone
    assert gpt.cache.used_rows == 0 and not len(mel) and not synth.scheduler.gpt.busy()


def test_concurrent_requests_share_calls_and_each_is_its_audio_alone(synth, tiny_ckpt, monkeypatch) -> None:
    assert_concurrent_requests_are_alone(synth, tiny_ckpt, monkeypatch, "2.0")


def test_a_failing_and_a_cancelled_request_fail_alone(synth, tiny_ckpt, monkeypatch) -> None:
    """One request's decode rows come back NaN, another's client goes away after its first chunk: the
    others finish with their audio alone, and every row is freed."""
    ok = [REQUESTS[0], REQUESTS[3]]
    alone = [_run(synth, tiny_ckpt, spec) for spec in ok]
    batch = synth.scheduler.gpt.batch
    inner = batch.steps
    poisoned_text = "Poison this request's rows."
    shared: list[int] = []

    class Poison:
        geometry = inner.geometry

        def prefill(self, feed):
            return inner.prefill(feed)

        def decode(self, feed):
            out = inner.decode(feed)
            for job in list(batch.active):
                # the poisoned request's generation, once it shares the call with another request's
                if job.generation.max_mel_tokens == 33 and len(batch.active) > 1:
                    out["logits"][batch.cache.member_rows(job)] = np.nan
                    shared.append(len(batch.active))
            return out

        def new_cache(self, kv, beams, max_rows, buckets):
            return inner.new_cache(kv, beams, max_rows, buckets)

        def new_batch_cache(self, max_rows, buckets):
            return inner.new_batch_cache(max_rows, buckets)

        def close(self):
            inner.close()

    monkeypatch.setattr(batch, "steps", Poison())

    def poisoned():
        return synth.synthesize(_request(tiny_ckpt, {"text": poisoned_text}), GenerationConfig(max_mel_tokens=33),
                                DECODER, seed=3)

    def cancelled():
        stream = synth.stream(_request(tiny_ckpt, LONG), GenerationConfig(max_mel_tokens=40), DECODER, seed=4,
                              settings=StreamSettings.chunks(8, 32))
        first = next(stream)
        stream.close()
        return first

    fns = {"ok0": lambda: _run(synth, tiny_ckpt, ok[0]), "poisoned": poisoned, "cancelled": cancelled,
           "ok1": _delayed(lambda: _run(synth, tiny_ckpt, ok[1]), 0.3)}
    results, errors = _concurrently(fns)
    assert set(errors) == {"poisoned"}, errors
    assert isinstance(errors["poisoned"], StreamError) and "non-finite" in str(errors["poisoned"])
    assert shared and not errors["poisoned"].retryable          # it failed inside a shared call
    assert results["cancelled"].samples > 0
    assert_same_audio(alone[0], results["ok0"], "ok0 beside a failing and a cancelled request")
    assert_same_audio(alone[1], results["ok1"], "ok1 beside a failing and a cancelled request")
    deadline = time.monotonic() + 60
    while synth.scheduler.gpt.busy() and time.monotonic() < deadline:      # the cancelled job's drop
        time.sleep(0.05)
    assert batch.cache.used_rows == 0 and not synth.scheduler.gpt.busy()
    assert not synth.scheduler.mel.busy() and synth.scheduler.admission.active == 0


def test_a_full_queue_is_refused_before_any_work(tiny_export, tiny_ckpt) -> None:
    with Synthesizer(tiny_export[0], "ort-cpu",
                     scheduler=SchedulerConfig(max_active_requests=1, max_queued_requests=0)) as tts:
        request = _request(tiny_ckpt, {})
        stream = tts.stream(request, GenerationConfig(max_mel_tokens=20), DECODER, seed=1)
        next(stream)                                                # holds the only slot
        with pytest.raises(QueueFull, match="1 request\\(s\\) in flight and 0 waiting") as err:
            tts.synthesize(request, GenerationConfig(max_mel_tokens=20), DECODER, seed=1)
        assert err.value.retryable
        stream.close()
        assert tts.synthesize(request, GenerationConfig(max_mel_tokens=20), DECODER, seed=1).pcm.size > 0
