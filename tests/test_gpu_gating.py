"""The gate of the GPU tests and the per-graph plan cache (tests/conftest.py), decided here on the CPU with the
probe and the visibility check replaced:
- probe ok -> the test runs;
- an NVIDIA GPU visible (/dev/nvidia0 or nvidia-smi) but the probe fails -> the test FAILS with the probe's reason
  (a broken GPU setup must not pass as a green, all-skipped run);
- no GPU visible -> the test is skipped with the probe's reason;
- the `gpu` marker is what triggers the gate (a pytest_runtest_setup hook, before any fixture), and every GPU test
  module carries it instead of a module-level skipif (which would skip where the gate must fail);
- a plan that fails to build fails only the tests that ask for it, each time with its build error, and is not
  built again.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import tests.conftest as gate
from runtime.trt.gpu import Probe

WORKS = Probe(True, "TensorRT 10.8.0, 1 CUDA device(s)")
OLD_DRIVER = Probe(False, "no CUDA GPU (cudaErrorInsufficientDriver)")
NO_TRT = Probe(False, "tensorrt is not installed")
GPU_MODULES = ("tests.test_engines_gpu", "tests.trt.test_gpu", "tests.test_gpu_e2e", "tests.test_int8_gpu")


def _set(monkeypatch, probe: Probe, visible: bool) -> None:
    monkeypatch.setattr(gate, "gpu_probe", lambda: probe)
    monkeypatch.setattr(gate, "gpu_visible", lambda: visible)


def outcome(call) -> tuple[str, str]:
    """What `call()` does to the test calling it: ("run", ""), ("fail", message) or ("skip", message). Caught
    here, so that a wrong skip cannot pass as this test's own skip (or a wrong fail as its failure)."""
    try:
        call()
    except pytest.fail.Exception as err:
        return "fail", str(err)
    except pytest.skip.Exception as err:
        return "skip", str(err)
    return "run", ""


def test_this_module_patches_the_conftest_pytest_loaded() -> None:
    assert sys.modules["tests.conftest"] is gate and hasattr(gate, "pytest_runtest_setup")


@pytest.mark.parametrize("visible", [True, False])
def test_a_working_probe_runs_the_test(monkeypatch, visible) -> None:
    _set(monkeypatch, WORKS, visible)
    assert gate.gpu_gate(WORKS, visible) == ("run", WORKS.detail)
    assert outcome(gate.require_gpu) == ("run", "")      # neither skips nor fails
    assert gate.require_gpu() == WORKS.detail


@pytest.mark.parametrize("probe", [OLD_DRIVER, NO_TRT])
def test_a_visible_gpu_whose_probe_fails_fails_the_test_with_the_reason(monkeypatch, probe) -> None:
    _set(monkeypatch, probe, True)
    assert gate.gpu_gate(probe, True)[0] == "fail"
    action, message = outcome(gate.require_gpu)
    assert action == "fail" and probe.detail in message and "-m 'not gpu'" in message


@pytest.mark.parametrize("probe", [OLD_DRIVER, NO_TRT])
def test_no_visible_gpu_skips_the_test_with_the_probes_reason(monkeypatch, probe) -> None:
    _set(monkeypatch, probe, False)
    assert gate.gpu_gate(probe, False)[0] == "skip"
    action, message = outcome(gate.require_gpu)
    assert action == "skip" and probe.detail in message


class _Item:
    def __init__(self, *marks: str) -> None:
        self.marks = marks

    def get_closest_marker(self, name: str):
        return object() if name in self.marks else None


def test_the_setup_hook_gates_gpu_marked_tests_only(monkeypatch) -> None:
    def hook(*marks: str) -> str:
        return outcome(lambda: gate.pytest_runtest_setup(_Item(*marks)))[0]

    _set(monkeypatch, OLD_DRIVER, True)
    assert hook() == hook("slow") == "run"             # unmarked: untouched
    assert hook("gpu") == "fail"
    _set(monkeypatch, OLD_DRIVER, False)
    assert hook() == "run" and hook("gpu") == "skip"
    _set(monkeypatch, WORKS, True)
    assert hook("gpu") == "run"


@pytest.mark.parametrize("node, smi, visible", [(False, None, False), (True, None, True),
                                                 (False, "/usr/bin/nvidia-smi", True)])
def test_visibility_is_the_device_node_or_nvidia_smi(monkeypatch, tmp_path, node, smi, visible) -> None:
    from runtime.trt import gpu

    device = tmp_path / "nvidia0"
    if node:
        device.touch()
    monkeypatch.setattr(gpu, "DEVICE_NODE", device)
    monkeypatch.setattr(gpu.shutil, "which", lambda name, path=None: smi if name == "nvidia-smi" else None)
    assert gate.gpu_visible() is visible


@pytest.mark.parametrize("module", GPU_MODULES)
def test_every_gpu_test_module_is_gated_by_the_marker(module) -> None:
    mod = importlib.import_module(module)
    marks = mod.pytestmark if isinstance(mod.pytestmark, list) else [mod.pytestmark]
    names = [m.name for m in marks]
    assert "gpu" in names, f"{module}: not marked gpu"
    assert "skipif" not in names, f"{module}: a module-level skipif would skip where the gate must fail"


def test_a_failing_plan_fails_only_the_tests_that_ask_for_it(tmp_path) -> None:
    calls = []

    def build(graph: str, precision: str) -> Path:
        calls.append((graph, precision))
        if graph == "bigvgan" and precision == "fp16":
            raise RuntimeError("bigvgan: Myelin ran out of tactics")
        return tmp_path / f"{graph}.{precision}.plan"

    plans = gate.TrtEngines(tmp_path, build)
    assert plans.plan("dit_step", "fp16") == tmp_path / "dit_step.fp16.plan"
    assert plans.plan("bigvgan", "fp32") == tmp_path / "bigvgan.fp32.plan"
    for _ in range(2):                                   # the same error again, without another build
        action, message = outcome(lambda: plans.plan("bigvgan", "fp16"))
        assert action == "fail" and "bigvgan: RuntimeError: bigvgan: Myelin ran out of tactics" in message
    assert plans.plan("dit_step", "fp16") == tmp_path / "dit_step.fp16.plan"
    action, message = outcome(lambda: plans.require(["campplus", "bigvgan", "dit_step"], "fp16"))
    assert action == "fail" and "bigvgan" in message and "campplus" not in message
    assert plans.plan("campplus", "fp16") == tmp_path / "campplus.fp16.plan"     # built by require, kept
    assert calls == [("dit_step", "fp16"), ("bigvgan", "fp32"), ("bigvgan", "fp16"), ("campplus", "fp16")]
    assert plans.builds == 4 and plans.failure("bigvgan", "fp16").startswith("RuntimeError")


SESSION_CONFTEST = '''
import pytest
import tests.conftest as gate
from runtime.trt.gpu import Probe

gate.gpu_probe = lambda: Probe({ok}, "{detail}")
gate.gpu_visible = lambda: {visible}
pytest_runtest_setup = gate.pytest_runtest_setup


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU")


@pytest.fixture(scope="session")
def expensive():
    raise RuntimeError("the expensive fixture ran")
'''

SESSION_TESTS = '''
import pytest


@pytest.mark.gpu
def test_on_the_gpu(expensive):
    pass


def test_on_the_cpu():
    pass
'''


@pytest.mark.parametrize("ok, visible, outcome", [
    (False, True, {"errors": 1, "passed": 1}),        # visible, probe fails: the gpu test fails (at setup)
    (False, False, {"skipped": 1, "passed": 1}),      # nothing visible: skipped
    (True, True, {"errors": 1, "passed": 1}),         # probe ok: runs (its fixture raises: proof it ran)
])
def test_a_pytest_session_gates_marked_tests_before_their_fixtures(pytester, monkeypatch, ok, visible, outcome):
    detail = "cudaErrorInsufficientDriver: driver too old" if not ok else "TensorRT 10.8.0, 1 CUDA device(s)"
    monkeypatch.setenv("PYTHONPATH", str(gate.REPO))
    pytester.makeconftest(SESSION_CONFTEST.format(ok=ok, detail=detail, visible=visible))
    pytester.makepyfile(test_session=SESSION_TESTS)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(**outcome)
    text = result.stdout.str()
    assert ("the expensive fixture ran" in text) == ok       # the gate acts before any fixture
    if not ok:
        assert detail in text
