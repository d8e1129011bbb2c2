"""Shared pytest fixtures: where the golden fixtures live, and the GPU marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = Path(os.environ.get("INDEXTTS_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not (SHARED_FIXTURES / "README.md").is_file():
        pytest.fail(f"golden fixtures not found at {SHARED_FIXTURES} (set INDEXTTS_FIXTURES)")
    return SHARED_FIXTURES


def run_fixture_calls(fixtures_root: Path, name: str) -> list:
    """Run one fixture directory through the generic runner; return its rows."""
    from export.fixtures.kinds import all_handlers
    from export.fixtures.runner import run_fixture

    return list(run_fixture(fixtures_root / name, all_handlers()))


def assert_rows_pass(rows: list) -> None:
    assert rows, "no rows: the fixture ran no call"
    bad = [r for r in rows if r.status != "pass"]
    assert not bad, "\n".join(f"{r.fixture}/{r.call}/{r.output}: {r.status} max_abs={r.max_abs} {r.detail}"
                              for r in bad)
