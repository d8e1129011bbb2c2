"""The full-size demo checkpoint (the real config's sizes): written, loaded by the real loaders, every
module run once. Slow (about a minute and 3 GB of disk): `python -m pytest -m slow`."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.demo import write_demo
from export.smoke import main as smoke_main


@pytest.mark.slow
def test_full_demo_checkpoint_runs_every_module(tmp_path: Path) -> None:
    ckpt = write_demo(tmp_path / "full", "full", seed=0)
    out = tmp_path / "out.wav"
    assert smoke_main(["--checkpoints", str(ckpt), "--speaker", str(ckpt / "examples/speaker.wav"),
                       "--out", str(out), "--codes", "50", "--steps", "25"]) == 0
    assert out.stat().st_size > 44
