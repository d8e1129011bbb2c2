"""PLACEHOLDER until the chunked vocoder lands (whole segments only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class VocoderWindow:
    start: int
    end: int
    win_start: int
    win_end: int
    hop: int = 256


def vocoder_layout(manifest: Any) -> Any:
    return None


def check_chunking(layout: Any, entry: Any, settings: Any) -> None:
    return None


def plan_windows(layout: Any, frames: int, settings: Any) -> list[VocoderWindow]:
    return [VocoderWindow(0, frames, 0, frames)] if frames else []


def run_window(executor: Any, mel: np.ndarray, window: VocoderWindow) -> np.ndarray:
    part = np.ascontiguousarray(mel[:, :, window.win_start:window.win_end])
    wav = executor.run({"mel": part})["wav"]
    a = (window.start - window.win_start) * window.hop
    return np.array(wav[0, a:a + (window.end - window.start) * window.hop], np.float32)
