"""Every call of the IndexTTS-2.5 golden fixtures (computed by the original 2.5 code) through the eager
modules and the runtime's front-end: none unsupported, all within the fixtures' tolerances."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_rows_pass, run_fixture_calls

FIXTURES = ["gpt25", "semantic_decoder", "text25", "mel_length25", "pipeline25"]


def test_every_fixture_directory_is_covered(fixtures25_root: Path) -> None:
    present = sorted(p.name for p in fixtures25_root.iterdir() if (p / "manifest.json").is_file())
    assert present == sorted(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture25(fixtures25_root: Path, name: str) -> None:
    assert_rows_pass(run_fixture_calls(fixtures25_root, name))
