"""Does a stream keep up with playback? The arithmetic the CLI prints and the streaming benchmark reports.

Model: playback starts when the first chunk is ready and plays the chunks back to back at the sample
rate. A chunk that becomes ready after everything before it has finished playing is an underrun: the
listener hears a gap of (ready time - end of the audio before it), and playback resumes from the chunk's
ready time. Why this model: it is what a client that starts playing at once would hear, and it needs only
each chunk's ready time and length.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChunkArrival:
    index: int
    ready_s: float           # since the request started
    duration_s: float        # audio in the chunk
    buffered_s: float        # audio still to play when it arrived (negative: the gap of an underrun)

    @property
    def underrun(self) -> bool:
        return self.buffered_s < 0


@dataclass
class PlaybackClock:
    """Feed each chunk's ready time and length in stream order; read arrivals, underruns, gaps."""

    sample_rate: int
    arrivals: list[ChunkArrival] = field(default_factory=list)
    _play_end: float | None = None

    def add(self, ready_s: float, samples: int) -> ChunkArrival | None:
        """Record a chunk; an empty one (a silent segment's) is not audio and is not recorded (None)."""
        if samples <= 0:
            return None
        duration = samples / self.sample_rate
        if self._play_end is None:                          # playback starts with the first chunk
            buffered, start = 0.0, ready_s
        else:
            buffered = self._play_end - ready_s
            start = max(self._play_end, ready_s)
        self._play_end = start + duration
        arrival = ChunkArrival(len(self.arrivals), ready_s, duration, buffered)
        self.arrivals.append(arrival)
        return arrival

    @property
    def first_audio_s(self) -> float | None:
        return self.arrivals[0].ready_s if self.arrivals else None

    @property
    def underruns(self) -> list[ChunkArrival]:
        return [a for a in self.arrivals if a.underrun]

    @property
    def stall_s(self) -> float:
        """Total silence heard beyond the audio itself (the sum of underrun gaps)."""
        return -sum(a.buffered_s for a in self.underruns)

    def gaps(self) -> list[float]:
        """Time between consecutive chunks becoming ready."""
        ready = [a.ready_s for a in self.arrivals]
        return [b - a for a, b in zip(ready, ready[1:])]
