"""The GPU probe on the machines it must explain (runtime/trt/gpu.py): cudaErrorInsufficientDriver (35) is
"driver too old for the CUDA N wheels", with the driver found, the driver those wheels need and the build to
install instead, both from the probe and from any checked CUDA call; `gpu_visible` finds a GPU without CUDA.

The cudart here is tests/trt/fakes.py's FakeCudart with the calls a driverless or old-driver machine answers
differently: cudaGetDeviceCount fails with 35, cudaDriverGetVersion / cudaRuntimeGetVersion return CUDA's
integers (1000 * major + 10 * minor), as the real cuda.bindings.runtime does.
"""

from __future__ import annotations

import os
import stat

import pytest

from runtime.errors import BackendError
from runtime.trt import cuda, gpu
from tests.trt.fakes import FakeCudart

R535 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
R575_OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  575.57.08  Release Build  (dvs-builder@U16)\n"
R470 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\n"
R580 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:58 UTC 2025\n"


class OldDriverCudart(FakeCudart):
    """A machine whose driver cannot run the wheel's CUDA runtime: every device call returns 35."""

    def __init__(self, driver_cuda: int, wheel_cuda: int | None) -> None:
        super().__init__()
        self.driver_cuda, self.wheel_cuda = driver_cuda, wheel_cuda

    def cudaGetDeviceCount(self):
        return self.cudaError_t.cudaErrorInsufficientDriver, 0

    def cudaMalloc(self, n):
        return self.cudaError_t.cudaErrorInsufficientDriver, 0

    def cudaDriverGetVersion(self):
        return self.OK, self.driver_cuda

    def cudaRuntimeGetVersion(self):
        if self.wheel_cuda is None:                      # a query that fails: the package version is used
            return self.cudaError_t.cudaErrorInvalidValue, 0
        return self.OK, self.wheel_cuda


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """-> install(driver_cuda, wheel_cuda, proc_text): a fake cudart and /proc/driver/nvidia/version."""

    def install(driver_cuda: int, wheel_cuda: int | None, proc_text: str | None) -> OldDriverCudart:
        rt = OldDriverCudart(driver_cuda, wheel_cuda)
        monkeypatch.setattr(gpu, "cudart", lambda: rt)
        monkeypatch.setattr(cuda, "cudart", lambda: rt)
        proc = tmp_path / "nvidia_version"
        if proc_text is not None:
            proc.write_text(proc_text)
        monkeypatch.setattr(gpu, "DRIVER_VERSION_FILE", proc)
        return rt

    return install


def test_an_r535_driver_under_the_cuda13_wheels_names_driver_need_and_fix(machine) -> None:
    machine(12020, 13000, R535)
    probe = gpu.cuda_devices()
    assert not probe.ok
    assert probe.detail.startswith("driver too old for the CUDA 13 wheels: driver 535.104.05 (CUDA 12.2), "
                                   f"needs ≥ {gpu.MIN_DRIVER[13]}; install the CUDA 12 build")
    assert probe.detail.endswith(gpu.CUDA_BUILDS[12]) and "no CUDA GPU" not in probe.detail


@pytest.mark.parametrize("driver_cuda, wheel_cuda, proc, expected", [
    # the R575 open kernel module (CUDA 12.9): the CUDA 12 build runs there
    (12090, 13040, R575_OPEN, ["driver 575.57.08 (CUDA 12.9)", "CUDA 13 wheels", "install the CUDA 12 build",
                               "tensorrt-cu12>=10.12,<12", "cuda-python>=12,<13"]),
    # no /proc file: the driver is described by the CUDA version it supports
    (12020, 13000, None, ["a driver for CUDA 12.2", "install the CUDA 12 build"]),
    # too old for every build: update the driver, with the minimum of each
    (11040, 13000, R470, ["driver 470.256.02 (CUDA 11.4)", f"needs ≥ {gpu.MIN_DRIVER[13]}",
                          f"update the NVIDIA driver (≥ {gpu.MIN_DRIVER[12]} runs the CUDA 12 build"]),
    (11040, 12080, R470, ["too old for the CUDA 12 wheels", f"needs ≥ {gpu.MIN_DRIVER[12]}", "update the NVIDIA"]),
    # the runtime query fails: the wheel's CUDA major comes from the installed package
    (12020, None, R535, ["driver 535.104.05"]),
    # no driver at all: cudaDriverGetVersion reports 0
    (0, 13000, None, ["no NVIDIA driver is loaded", "NVIDIA GPU", "--backend ort-cpu"]),
    # a driver new enough for the wheels and still 35: the loaded libcuda is not the driver's
    (13000, 13000, R580, ["although driver 580.65.06 (CUDA 13.0) supports the CUDA 13 wheels", "LD_LIBRARY_PATH"]),
])
def test_error_35_is_explained(machine, driver_cuda, wheel_cuda, proc, expected) -> None:
    machine(driver_cuda, wheel_cuda, proc)
    detail = gpu.cuda_devices().detail
    for part in expected:
        assert part in detail, (part, detail)
    if driver_cuda and driver_cuda < 13000:
        assert "driver too old" in detail


def test_a_failing_runtime_query_falls_back_to_the_package_version(machine) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("cuda-bindings").split(".")[0])
    except PackageNotFoundError:
        pytest.skip("cuda-bindings is not installed")
    rt = machine(11040, None, R470)
    assert gpu.driver_facts(rt).wheel_cuda == major * 1000
    assert f"CUDA {major} wheels" in gpu.cuda_devices().detail


def test_a_checked_cuda_call_gets_the_same_explanation(machine) -> None:
    machine(12020, 13000, R535)
    with pytest.raises(BackendError) as err:
        cuda.DeviceBuffer(16, "a test")
    message = str(err.value)
    assert message.startswith("cudaMalloc(16 bytes for a test) failed: cudaErrorInsufficientDriver (CUDA driver "
                              "version is insufficient for CUDA runtime version); driver too old for the CUDA 13 "
                              "wheels: driver 535.104.05 (CUDA 12.2)")
    assert gpu.CUDA_BUILDS[12] in message and err.value.__context__ is None


def test_an_explanation_never_raises() -> None:
    """A cudart without the version queries (older bindings, broken installs) still gives a message."""
    message = gpu.insufficient_driver(FakeCudart())        # no cudaDriverGetVersion / cudaRuntimeGetVersion
    assert "missing or too old" in message and "update the NVIDIA driver" in message


def test_the_builds_pin_a_supported_tensorrt_for_every_cuda_major() -> None:
    assert set(gpu.CUDA_BUILDS) == set(gpu.MIN_DRIVER)
    low, high = ".".join(map(str, gpu.TENSORRT_MIN)), gpu.TENSORRT_MAX_MAJOR + 1
    for major, command in gpu.CUDA_BUILDS.items():
        assert f"'tensorrt-cu{major}>={low},<{high}'" in command
        assert f"'cuda-python>={major},<{major + 1}'" in command
        assert command in gpu.install_hint() and f"CUDA {major} (driver ≥ {gpu.MIN_DRIVER[major]})" in gpu.install_hint()


@pytest.mark.parametrize("version", ["10.12.0.36", "10.13.3.9", "10.16.1.11", "11.0.0.114", "11.4.0.106"])
def test_tensorrt_10_12_to_11_is_accepted(version) -> None:
    assert gpu.unsupported_tensorrt(version) == ""


@pytest.mark.parametrize("version, words", [
    ("10.11.0.33", ["TensorRT 10.11.0.33 is too old", "needs TensorRT ≥ 10.12", "strongly typed"]),
    ("10.7.0.23", ["too old", "≥ 10.12"]),
    ("8.6.1", ["too old", "≥ 10.12"]),
    ("12.0.0.1", ["TensorRT 12.0.0.1 is a major version this toolkit does not know", "10.12 to 11.x"]),
    ("", ["(unknown version)", "cannot read"]),
    ("nightly", ["TensorRT nightly", "cannot read"]),
])
def test_other_tensorrt_versions_are_refused_with_what_to_install(version, words) -> None:
    message = gpu.unsupported_tensorrt(version)
    assert all(w in message for w in words), message
    assert gpu.CUDA_BUILDS[12] in message and gpu.CUDA_BUILDS[13] in message


def test_tensorrt_release_reads_major_and_minor() -> None:
    assert gpu.tensorrt_release("10.16.1.11") == (10, 16) and gpu.tensorrt_release("11.4.0.106") == (11, 4)
    assert gpu.tensorrt_release("11") is None and gpu.tensorrt_release("") is None


def test_the_driver_version_is_read_from_proc(tmp_path) -> None:
    path = tmp_path / "version"
    for text, version in ((R535, "535.104.05"), (R575_OPEN, "575.57.08"), ("garbage", "")):
        path.write_text(text)
        assert gpu.nvidia_driver_version(path) == version
    assert gpu.nvidia_driver_version(tmp_path / "absent") == ""


def test_gpu_visible_names_its_evidence(tmp_path) -> None:
    node = tmp_path / "nvidia0"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    assert gpu.gpu_visible(node, path=str(bin_dir)) is None
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    assert gpu.gpu_visible(node, path=str(bin_dir)) == "nvidia-smi on PATH"
    node.touch()
    assert gpu.gpu_visible(node, path=str(bin_dir)) == f"{node} exists"
    assert gpu.gpu_visible(node, path=os.devnull) == f"{node} exists"
