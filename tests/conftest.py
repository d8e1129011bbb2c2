"""Shared pytest fixtures: where the golden fixtures live, the tiny demo checkpoint and its export."""

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


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny demo checkpoint (seed 0), written once per session; tests must not modify it."""
    from export.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("tiny_ckpt") / "ckpt", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory):
    """Every registered graph of the tiny demo exported once per session (a couple of minutes on 2 cores):
    -> (export directory, BuildReport). Tests must not modify it (copy it first)."""
    from export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("export") / "out"
    report = build(BuildOptions(tiny_ckpt, out, "fp16"))
    assert not report.failed, report.failed
    return out, report


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
