"""Shared pytest fixtures: where the golden fixtures live, the tiny demo checkpoint, its export, what the
graph feed rules need, the gate of the `gpu` tests (run / fail / skip), and (on a GPU machine only) TensorRT
plans built from that export, per graph and precision."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# pytester: tests/test_gpu_gating.py runs a small pytest session through the gate below
pytest_plugins = ["pytester"]
SHARED_FIXTURES = Path(os.environ.get("INDEXTTS_FIXTURES", REPO.parent / "shared" / "fixtures"))
SHARED_FIXTURES_25 = Path(os.environ.get("INDEXTTS_FIXTURES_25", REPO.parent / "shared" / "fixtures-2.5"))


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not (SHARED_FIXTURES / "README.md").is_file():
        pytest.fail(f"golden fixtures not found at {SHARED_FIXTURES} (set INDEXTTS_FIXTURES)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def fixtures25_root() -> Path:
    """The IndexTTS-2.5 golden fixtures (computed by the original 2.5 code)."""
    if not (SHARED_FIXTURES_25 / "README.md").is_file():
        pytest.fail(f"IndexTTS-2.5 golden fixtures not found at {SHARED_FIXTURES_25} (set INDEXTTS_FIXTURES_25)")
    return SHARED_FIXTURES_25


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The tiny demo checkpoint (seed 0), written once per session; tests must not modify it.
    INDEXTTS_TINY_DIR=D (local iteration only, never in CI): reuse D/ckpt and D/out made by
    `python -m export.demo --out D/ckpt --size tiny` and `python -m export.build --checkpoints D/ckpt --out D/out
    --precision fp16` from this checkout (tests that check a fresh export's report, such as
    test_build_writes_every_registered_graph, then see every graph reused and fail)."""
    from export.demo import write_demo

    if os.environ.get("INDEXTTS_TINY_DIR"):
        return Path(os.environ["INDEXTTS_TINY_DIR"]) / "ckpt"

    return write_demo(tmp_path_factory.mktemp("tiny_ckpt") / "ckpt", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory):
    """Every registered graph of the tiny demo exported once per session (a couple of minutes on 2 cores):
    -> (export directory, BuildReport). Tests must not modify it (copy it first)."""
    from export.build import BuildOptions, build

    if os.environ.get("INDEXTTS_TINY_DIR"):
        out = Path(os.environ["INDEXTTS_TINY_DIR"]) / "out"
        return out, build(BuildOptions(tiny_ckpt, out, "fp16"))          # every graph reused when unchanged
    out = tmp_path_factory.mktemp("export") / "out"
    report = build(BuildOptions(tiny_ckpt, out, "fp16"))
    assert not report.failed, report.failed
    return out, report


@pytest.fixture(scope="session")
def tiny25_ckpt(tmp_path_factory) -> Path:
    """The tiny IndexTTS-2.5 demo checkpoint (seed 0), written once per session; tests must not modify it."""
    from export.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("ckpt25") / "ckpt", "tiny", 0, version="2.5")


@pytest.fixture(scope="session")
def tiny25_export(tiny25_ckpt, tmp_path_factory):
    """Every graph of the tiny 2.5 demo exported (fp32) once per session -> (export directory, BuildReport)."""
    from export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("export25") / "out"
    report = build(BuildOptions(tiny25_ckpt, out, "fp32"))
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


# ---------------------------------------------------------------------------------------------------
# GPU gating: every test marked `gpu` (pyproject's markers) goes through require_gpu() before its fixtures.


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU at all, whatever the Python packages say: the driver's device
    node or nvidia-smi (runtime.trt.gpu.gpu_visible, which names the evidence)."""
    from runtime.trt import gpu

    return gpu.gpu_visible() is not None


@functools.lru_cache(maxsize=1)
def gpu_probe():
    """TensorRT importable (version 10) and a CUDA device answering through cuda-python (runtime.trt.gpu's
    probe, the one the builder and the runtime ask), once per session."""
    from runtime.trt import gpu

    return gpu.tensorrt()


def gpu_gate(probe, visible: bool) -> tuple[str, str]:
    """The decision for a GPU test -> ("run" | "fail" | "skip", message).

    Probe ok: run. A GPU is visible but the probe fails (no or wrong TensorRT, cuda-python missing, a driver
    too old for the CUDA wheels...): fail, because skipping would hide a broken GPU setup behind a green run.
    No GPU visible: skip with the probe's reason."""
    if probe.ok:
        return "run", probe.detail
    if visible:
        return "fail", (f"an NVIDIA GPU is visible (/dev/nvidia0 or nvidia-smi) but TensorRT/CUDA is not usable: "
                        f"{probe.detail}. Fix the installation (pip install 'indextts2-engines[gpu]'), or deselect "
                        "the GPU tests with -m 'not gpu'")
    return "skip", f"needs TensorRT and an NVIDIA GPU: {probe.detail}"


def require_gpu() -> str:
    """Run, fail or skip the calling test as gpu_gate decides; -> the probe's description when it runs."""
    action, message = gpu_gate(gpu_probe(), gpu_visible())
    if action == "fail":
        pytest.fail(message, pytrace=False)
    if action == "skip":
        pytest.skip(message)
    return message


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Gate `gpu` tests before any of their fixtures run (so no export or engine build is attempted)."""
    if item.get_closest_marker("gpu") is not None:
        require_gpu()


# ---------------------------------------------------------------------------------------------------
# TensorRT plans, built per graph and precision on first request


class TrtEngines:
    """The plans of one export directory, built lazily: `plan(graph, precision)` builds that one plan the
    first time it is asked for (`build(graph, precision) -> plan path`) and caches the path, or the failure.
    A graph whose build failed fails exactly the tests that ask for it, with its build error; the other
    graphs' tests do not notice. `require(graphs, precision)`: several plans, failing once with every
    failed graph's error."""

    def __init__(self, root: Path, build) -> None:
        self.root = Path(root)
        self._build = build
        self._plans: dict[tuple[str, str], Path] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self.builds = 0                     # build calls made (a cached plan or failure is not rebuilt)

    def _get(self, graph: str, precision: str) -> Path | None:
        key = (graph, precision)
        if key not in self._plans and key not in self._failed:
            self.builds += 1
            try:
                self._plans[key] = Path(self._build(graph, precision))
            except Exception as err:  # noqa: BLE001 — recorded for this graph's tests only
                self._failed[key] = f"{type(err).__name__}: {err}"
        return self._plans.get(key)

    def failure(self, graph: str, precision: str) -> str | None:
        return self._failed.get((graph, precision))

    def plan(self, graph: str, precision: str) -> Path:
        return self.require([graph], precision)[0]

    def require(self, graphs, precision: str) -> list[Path]:
        plans = [self._get(g, precision) for g in graphs]
        failed = [f"{g}: {self._failed[(g, precision)]}" for g, p in zip(graphs, plans) if p is None]
        if failed:
            pytest.fail(f"the {precision} TensorRT plan(s) could not be built:\n  " + "\n  ".join(failed),
                        pytrace=False)
        return plans


@pytest.fixture(scope="session")
def trt_engines(tiny_export, tmp_path_factory) -> TrtEngines:
    """A copy of the tiny export whose TensorRT plans (TRT_PRECISIONS) are built per graph on first request
    (GPU machines only; elsewhere require_gpu() skips) -> TrtEngines (root, plan(), require())."""
    require_gpu()
    import engines
    from runtime.manifest import read_manifest

    out = Path(shutil.copytree(tiny_export[0], tmp_path_factory.mktemp("trt") / "out"))
    manifest = read_manifest(out, check_hashes=True)

    def build(graph: str, precision: str) -> Path:       # EngineBuildFailures names the graph and its error
        return engines.build_all(manifest, out, precision, graphs=[graph]).plans[0]

    return TrtEngines(out, build)


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
