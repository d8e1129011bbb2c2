"""The one model instance both front doors drive: the Synthesizer (its scheduler batches every request's
graph work), the voice registry, and the process's bound on requests at once.

The bound (`max_concurrent`) is taken before a request is prepared and given back when its audio has been
delivered (or its stream closed); beyond it a request is refused at once with TooBusy (HTTP 429 with
Retry-After), so the process never holds an unbounded queue. It is kept at or below the scheduler's own
admission (in flight + waiting), so the scheduler's QueueFull is not reached through a front door.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from runtime.errors import InputError
from runtime.executors import OrtOptions
from runtime.frontend.audio import AudioBytes
from runtime.scheduler.scheduler import SchedulerConfig
from runtime.streaming.chunks import AudioChunk, StreamSettings
from runtime.synthesizer import Synthesizer
from serve.config import Limits, ServeConfig
from serve.errors import TooBusy
from serve.params import Speech, SpeechOptions, decode_base64_audio, to_speech
from serve.voices import VoiceRegistry, probe_duration

log = logging.getLogger(__name__)


class Slots:
    """At most `limit` requests at once; `take` refuses (TooBusy) instead of waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_use = 0

    def acquire(self) -> None:
        if not self._sem.acquire(blocking=False):
            raise TooBusy(f"the server is at its limit of {self.limit} requests at once (max_concurrent); "
                          "retry shortly")
        with self._lock:
            self.in_use += 1

    def release(self) -> None:
        with self._lock:
            self.in_use -= 1
        self._sem.release()

    @contextmanager
    def take(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


class AudioStream:
    """A request's audio chunks for a front door: `next_pcm()` from one thread at a time, `cancel()` from any
    (a client gone), `close()` when done (gives the slot back; idempotent)."""

    def __init__(self, chunks, release) -> None:
        self._chunks, self._release = chunks, release
        self._read = threading.Lock()
        self._closed = False

    def next_chunk(self) -> AudioChunk | None:
        with self._read:
            if self._closed:
                return None
            return next(self._chunks, None)

    def cancel(self) -> None:
        self._chunks.cancel()

    def finish(self, completed: bool) -> None:
        """From a front door's event loop, whatever happened (idempotent): a stream not read to its end is
        cancelled, and closed in a thread (a `next_chunk` may still be finishing its step)."""
        if not completed:
            self.cancel()
        threading.Thread(target=self.close, name="stream-close", daemon=True).start()

    def close(self) -> None:
        """Waits for a `next_chunk` in progress (call `cancel` first to make that quick)."""
        with self._read:
            if self._closed:
                return
            self._closed = True
            try:
                self._chunks.close()
            finally:
                self._release()


class TtsService:
    def __init__(self, synth: Synthesizer, voices: VoiceRegistry, limits: Limits,
                 stream_quick_tokens: int = 120) -> None:
        self.synth, self.voices, self.limits = synth, voices, limits
        self.slots = Slots(limits.max_concurrent)
        self.stream_quick_tokens = stream_quick_tokens
        self.sample_rate = synth.sample_rate
        self.ready = True

    @classmethod
    def open(cls, config: ServeConfig) -> "TtsService":
        """Load the model once, register the operator's voices (`--voice`), read back the persisted ones."""
        limits = config.limits
        scheduler = SchedulerConfig(max_active_requests=min(8, limits.max_concurrent),
                                    max_queued_requests=max(0, limits.max_concurrent - 8))
        synth = Synthesizer(config.engines, config.backend, cache_size=config.voice_cache,
                            ort_options=OrtOptions(intra_op_threads=config.threads), scheduler=scheduler)
        try:
            voices = VoiceRegistry(limits, config.voices_dir, prepare=synth.speaker)
            for name, path in config.voices:
                voice = voices.add_file(name, path)
                log.info("voice %r = %s (%s)", name, voice.id, path)
        except BaseException:
            synth.close()
            raise
        return cls(synth, voices, limits, config.stream_quick_tokens)

    def close(self) -> None:
        self.ready = False
        self.synth.close()

    # -- a request ----------------------------------------------------------------------------------
    def speech(self, options: SpeechOptions, text: str, voice: str | None, streamed: bool,
               speaker: AudioBytes | None = None) -> Speech:
        """Resolve the references (voice ids or inline audio) and check everything; nothing is queued.
        `speaker`: the speaker's audio given as bytes by the door (Triton's `reference_audio`)."""
        if speaker is None and options.ref_audio is not None:
            speaker = decode_base64_audio(options.ref_audio, "ref_audio", self.limits)
        if speaker is not None:                      # inline: the registry's checks, here
            probe_duration(speaker, self.limits)
        else:
            speaker = self.voices.audio(self.voices.get(voice or ""))
        emo_audio: AudioBytes | None = None
        if options.emo_audio is not None and options.emo_voice is not None:
            raise InputError("give emo_audio or emo_voice, not both")
        if options.emo_audio is not None:
            emo_audio = decode_base64_audio(options.emo_audio, "emo_audio", self.limits)
            probe_duration(emo_audio, self.limits)
        elif options.emo_voice is not None:
            emo_audio = self.voices.audio(self.voices.get(options.emo_voice))
        return to_speech(options, text, speaker, emo_audio, self.synth.generation_defaults,
                         self.synth.manifest.gpt.max_mel_tokens, streamed, self.stream_quick_tokens)

    def synthesize(self, speech: Speech) -> np.ndarray:
        """The whole audio (int16) of one request."""
        with self.slots.take():
            return self.synth.synthesize(speech.request, speech.generation, seed=speech.seed).pcm

    def stream(self, speech: Speech, settings: StreamSettings | None = None) -> AudioStream:
        """The request's chunks as they are ready (prepared, and bad input refused, before this returns)."""
        self.slots.acquire()
        try:
            chunks = self.synth.stream(speech.request, speech.generation, seed=speech.seed,
                                       settings=settings or StreamSettings())
        except BaseException:
            self.slots.release()
            raise
        return AudioStream(chunks, self.slots.release)
