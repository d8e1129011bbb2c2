"""The full-size demo checkpoint (the real config's sizes): written, loaded by the real loaders, every
module run, one short sentence synthesized end to end. Slow (a few minutes, ~7 GB of disk and ~10 GB of
memory): `python -m pytest -m slow`."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.demo import write_demo
from export.smoke import main as smoke_main
from export.synthesize import main as synthesize_main


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo(tmp_path_factory.mktemp("full") / "ckpt", "full", seed=0)


@pytest.mark.slow
def test_full_demo_every_module_around_the_gpt(full_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "smoke.wav"
    assert smoke_main(["--checkpoints", str(full_ckpt), "--speaker", str(full_ckpt / "examples/speaker.wav"),
                       "--out", str(out), "--codes", "50", "--steps", "25"]) == 0
    assert out.stat().st_size > 44


@pytest.mark.slow
def test_full_demo_synthesizes_a_short_sentence(full_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "sentence.wav"
    assert synthesize_main(["--checkpoints", str(full_ckpt), "--speaker", str(full_ckpt / "examples/speaker.wav"),
                            "--text", "The morning train was late again.", "--max-mel-tokens", "30",
                            "--seed", "0", "--out", str(out)]) == 0
    assert out.stat().st_size > 44
