"""Vocoder windows of equal length from different requests share one bigvgan call and each chunk is the
chunk alone; windows of different lengths never share a call."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backend import open_backend
from runtime.manifest import read_manifest
from runtime.scheduler.workers import vocode_windows
from runtime.streaming.vocoder import VocoderChunking, VocoderPlanner, run_window


def test_equal_windows_of_different_requests_in_one_call_are_each_alone(tiny_export) -> None:
    root = tiny_export[0]
    manifest = read_manifest(root)
    backend = open_backend(manifest, root, "ort-cpu")
    try:
        bigvgan = backend.graphs["bigvgan"]
        planner = VocoderPlanner.from_manifest(manifest, VocoderChunking(8, 32))
        rng = np.random.default_rng(0)
        mels = [rng.standard_normal((1, 80, n)).astype(np.float32) * 0.5 - 4 for n in (120, 97, 150)]
        plans = [planner.plan(m.shape[2]) for m in mels]
        # the second window of every plan: the same length (8 frames + context), different places
        items = [(m, p[1]) for m, p in zip(mels, plans)]
        assert len({w.window_frames for _, w in items}) == 1
        together = vocode_windows(bigvgan, items)
        for (mel, window), got in zip(items, together):
            alone = run_window(bigvgan, mel, window)[0]
            np.testing.assert_allclose(got, alone, rtol=0, atol=2e-6)
        with pytest.raises(ValueError, match="same length"):
            vocode_windows(bigvgan, [items[0], (mels[0], plans[0][-1])])
    finally:
        backend.close()
