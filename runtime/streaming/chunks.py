"""What a stream yields (AudioChunk) and how it is cut (StreamSettings).

Why a chunk carries its segment, offset and ready time: a player needs the order and position of the
samples, a server needs to know when a segment ends, and the CLI and the benchmarks judge a stream by
when each chunk became ready against the audio delivered before it (runtime/streaming/playback.py).

The stream is the request's audio in order: each segment's speech in vocoder chunks, and the
`interval_silence_ms` gap between two segments as its own chunk, emitted as soon as the segment before
it ends (so a player has it while the next segment is computed). Concatenating every chunk's `pcm` gives
exactly what `Synthesizer.synthesize` returns for the same request, seed and settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.streaming.vocoder import VocoderChunking

if TYPE_CHECKING:
    from runtime.request import SegmentResult

SPEECH, SILENCE = "speech", "silence"
DEFAULT_FIRST_CHUNK_FRAMES = 32       # mel frames: 32 x 256 / 22050 = 0.37 s of audio
DEFAULT_MAX_CHUNK_FRAMES = 256        # 2.97 s: later chunks grow to this (less context recomputed)


@dataclass(frozen=True)
class StreamSettings:
    """How a request's audio is cut and scheduled.

    `vocoder`: the chunk sizes (runtime/streaming/vocoder.py: a segment's first chunk `first_frames` mel
    frames, each later one twice the previous up to `max_frames`: small first for an early start, larger
    later so the context the vocoder recomputes around each chunk costs less); None: one vocoder call per
    segment (the offline form). `pipeline`: the next segment's GPT runs in a worker thread while this
    segment is in the Euler loop and the vocoder (False: everything in the caller's thread, in order).
    """

    vocoder: VocoderChunking | None = VocoderChunking(DEFAULT_FIRST_CHUNK_FRAMES, DEFAULT_MAX_CHUNK_FRAMES)
    pipeline: bool = True

    @classmethod
    def chunks(cls, first_frames: int, max_frames: int, pipeline: bool = True) -> "StreamSettings":
        """Vocoder chunks of `first_frames` growing to `max_frames` (checked: InputError if invalid)."""
        return cls(VocoderChunking(first_frames, max_frames), pipeline)

    @classmethod
    def whole_segments(cls, pipeline: bool = True) -> "StreamSettings":
        """One vocoder call per segment (the offline form)."""
        return cls(None, pipeline)


@dataclass(frozen=True)
class AudioChunk:
    """A piece of the request's audio, in order.

    `pcm` int16 at the export's sample rate; `segment` the segment it belongs to (a silence chunk: the
    segment it follows); `offset` its first sample's position in the request's audio; `ready_s` when it was
    ready, in seconds since the request started; `index` its number in the stream. The last speech chunk of
    each segment carries the segment's `result` (codes, mel, per-stage times, the segment's whole pcm); the
    first carries `mel_ready_s`, when the segment's mel was ready (what stood between that and the chunk
    is its vocoder work: the streaming benchmark reports both).
    """

    pcm: np.ndarray
    segment: int
    segments: int
    offset: int
    ready_s: float
    index: int
    kind: str = SPEECH
    last_in_segment: bool = False        # the segment's last speech chunk (never set on a silence chunk)
    result: "SegmentResult | None" = None
    mel_ready_s: float | None = None     # on a segment's first speech chunk: when its Euler solve ended

    @property
    def samples(self) -> int:
        return int(self.pcm.size)
