"""Shared pytest fixtures: where the golden fixtures live, the tiny demo checkpoint, its export, what the
graph feed rules need, and (on a GPU machine only) TensorRT engines built from that export."""

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


@pytest.fixture(scope="session")
def graph_kit(tiny_ckpt):
    """(dims, contracts at the tiny checkpoint's sizes, wrappers): what export.dummy.feed_for needs."""
    from export.dims import checkpoint_contracts, model_dims
    from export.layout import CheckpointLayout
    from export.wrappers import all_wrappers

    layout = CheckpointLayout.open(tiny_ckpt)
    dims = model_dims(layout)
    return dims, checkpoint_contracts(dims, layout.config), all_wrappers()


TRT_PRECISIONS = ("fp32", "fp16")


@pytest.fixture(scope="session")
def trt_engines(tiny_export, tmp_path_factory):
    """A copy of the tiny export with fp32 and fp16 TensorRT plans for every graph, built once per session
    (GPU machines only: the tests that ask for it skip elsewhere) -> (directory, {precision: [plan paths]})."""
    import shutil

    import engines
    from runtime.manifest import read_manifest

    out = Path(shutil.copytree(tiny_export[0], tmp_path_factory.mktemp("trt") / "out"))
    manifest = read_manifest(out, check_hashes=True)
    return out, {p: engines.build_all(manifest, out, p).plans for p in TRT_PRECISIONS}


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
