"""The playback arithmetic the CLI and the streaming benchmark report (runtime/streaming/playback.py)."""

from __future__ import annotations

import pytest

from runtime.streaming.playback import PlaybackClock


def test_arrivals_buffers_and_underruns() -> None:
    clock = PlaybackClock(sample_rate=100)
    first = clock.add(1.0, 50)                  # plays 1.0 .. 1.5
    assert first.index == 0 and first.buffered_s == 0 and not first.underrun
    ok = clock.add(1.2, 100)                    # 0.3 s still to play; plays 1.5 .. 2.5
    assert ok.buffered_s == pytest.approx(0.3) and not ok.underrun
    late = clock.add(3.0, 100)                  # ran dry at 2.5: a 0.5 s gap; plays 3.0 .. 4.0
    assert late.underrun and late.buffered_s == pytest.approx(-0.5)
    tight = clock.add(4.0, 10)                  # exactly on time
    assert not tight.underrun and tight.buffered_s == pytest.approx(0.0)
    assert clock.first_audio_s == 1.0
    assert [a.index for a in clock.underruns] == [2]
    assert clock.stall_s == pytest.approx(0.5)
    assert clock.gaps() == pytest.approx([0.2, 1.8, 1.0])


def test_an_empty_chunk_is_not_audio() -> None:
    clock = PlaybackClock(sample_rate=100)
    assert clock.add(0.5, 0) is None            # a silent segment's empty chunk
    assert clock.first_audio_s is None
    clock.add(2.0, 100)
    assert clock.first_audio_s == 2.0 and not clock.underruns
