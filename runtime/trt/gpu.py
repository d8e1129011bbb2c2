"""Is there an NVIDIA GPU, and is TensorRT usable? A probe that never raises.

DESIGN.md §3 (export facts): cuda-python 13 imports as `cuda.bindings.runtime` (older releases as
`cuda.cudart`), and `cudaGetDeviceCount` returns an error code instead of raising when there is no GPU.
Both the engine builder (`engines.available`) and the runtime's backend choice (`--backend auto`,
`python -m runtime inspect`) ask here, so they always agree. Nothing heavy is imported at module level.

Why the driver check: the `tensorrt` metapackage and `cuda-python` 13.x are CUDA 13 builds, which need a
driver >= R580. On the R535-R575 drivers many GPU machines run, every CUDA call returns
cudaErrorInsufficientDriver (35); reported as "no CUDA GPU" that would make every GPU test skip and
`--backend auto` fall back to ONNX Runtime without a word. So error 35 is reported as what it is: the
driver found (cudaDriverGetVersion, /proc/driver/nvidia/version), the CUDA major the cuda-python wheel
targets (cudaRuntimeGetVersion), the driver that major needs, and the build to install instead.
`gpu_visible` says whether the machine has an NVIDIA GPU at all, without CUDA, so GPU tests can fail
(rather than skip) where a GPU is visible but the probe fails.

Which TensorRT (`unsupported_tensorrt`): 10.12 up to 11.x. The builder makes strongly typed networks only
(the precision is in the ONNX graph): TensorRT 11 removed every weak-typing API ("TensorRT 11.x removes all
weak typing APIs", https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x.html),
and 10.12 is the release that deprecated them in favour of strong typing (NvInfer.h of v10.12: BuilderFlag::kFP16
"Deprecated in TensorRT 10.12. Superseded by strong typing."). Older 10.x is refused with the minimum and the
pip command; 12.x and later are refused as unknown (a major release removes APIs).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The TensorRT releases the builder and the executor are written for: 10.12 (the first where strong typing
#: supersedes the deprecated weak typing) through 11.x (strong typing only). Anything else is refused up front
#: with what to install, instead of failing inside a build.
TENSORRT_MIN = (10, 12)
TENSORRT_MAX_MAJOR = 11
TENSORRT_PIN = "tensorrt>=10.12,<12"       # the metapackage: the CUDA 13 build since 10.13.3

#: The oldest Linux driver that runs wheels built for each CUDA major (CUDA minor version compatibility:
#: NVIDIA's "CUDA Compatibility" guide gives CUDA 12.x >= 525 and CUDA 13.x >= 580; the exact versions are
#: those of the CUDA Toolkit release notes' minor-version-compatibility table).
MIN_DRIVER: dict[int, str] = {12: "525.60.13", 13: "580.65.06"}
#: How to install TensorRT and cuda-python for one CUDA major (the `gpu-cu12` / `gpu-cu13` extras of
#: pyproject.toml hold the same pins plus the matching onnxruntime-gpu). The bare `tensorrt` metapackage is the
#: CUDA 13 build, so the CUDA major is named explicitly. A fresh environment, because the CUDA 12 and 13
#: TensorRT wheels install the same `tensorrt` module.
CUDA_BUILDS: dict[int, str] = {
    12: "pip install 'cuda-python>=12,<13' 'tensorrt-cu12>=10.12,<12'",
    13: "pip install 'cuda-python>=13,<14' 'tensorrt-cu13>=10.12,<12'",
}
INSUFFICIENT_DRIVER = 35        # cudaErrorInsufficientDriver
#: where the kernel driver states its version (Linux), and the device node of the first GPU
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
DEVICE_NODE = Path("/dev/nvidia0")


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str            # what was found, or why not


def cudart():
    """The cuda-python runtime module, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found]
        return runtime
    except ImportError:
        try:
            from cuda import cudart as legacy  # type: ignore[import-not-found,no-redef]
            return legacy
        except ImportError:
            return None


def cuda_devices() -> Probe:
    """How many CUDA devices cuda-python sees (never raises)."""
    try:
        rt = cudart()
        if rt is None:
            return Probe(False, "cuda-python is not installed (needed to find a GPU)")
        err, count = rt.cudaGetDeviceCount()
        if int(err) == INSUFFICIENT_DRIVER:
            return Probe(False, insufficient_driver(rt))
        if int(err) != 0:
            return Probe(False, f"no CUDA GPU ({getattr(err, 'name', err)})")
        if count == 0:
            return Probe(False, "no CUDA GPU")
        return Probe(True, f"{int(count)} CUDA device(s)")
    except Exception as err:  # noqa: BLE001 — a probe reports, it never crashes the caller
        return Probe(False, f"the CUDA probe failed: {type(err).__name__}: {err}")


def tensorrt() -> Probe:
    """TensorRT importable and a GPU present (never raises)."""
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return Probe(False, "tensorrt is not installed")
        try:
            import tensorrt as trt  # type: ignore[import-not-found]
        except Exception as err:  # noqa: BLE001 — a broken install (missing libnvinfer) raises anything
            return Probe(False, f"tensorrt cannot be imported ({type(err).__name__}: {err})")
        unsupported = unsupported_tensorrt(getattr(trt, "__version__", ""))
        if unsupported:
            return Probe(False, unsupported)
        gpu = cuda_devices()
        if not gpu.ok:
            return gpu
        return Probe(True, f"TensorRT {getattr(trt, '__version__', '?')}, {gpu.detail}")
    except Exception as err:  # noqa: BLE001
        return Probe(False, f"the TensorRT/GPU probe failed: {type(err).__name__}: {err}")


def gpu_info(device: int = 0):
    """The GpuInfo (name, compute capability) of CUDA device `device`, or None without a usable GPU.

    cudaGetDeviceProperties returns (cudaError_t, cudaDeviceProp); `prop.name` is bytes (char[256]).
    """
    from runtime.trt.engine_plan import GpuInfo

    try:
        rt = cudart()
        if rt is None:
            return None
        err, prop = rt.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return None
        name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
        return GpuInfo(name.strip(), f"{int(prop.major)}.{int(prop.minor)}")
    except Exception:  # noqa: BLE001 — a probe reports, it never crashes the caller
        return None


def tensorrt_version() -> str | None:
    """The installed TensorRT's version string, or None (never raises)."""
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return None
        import tensorrt as trt  # type: ignore[import-not-found]

        return str(trt.__version__)
    except Exception:  # noqa: BLE001
        return None


def tensorrt_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a TensorRT version string ("10.16.1.11" -> (10, 16)), None when it is not one."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def install_hint() -> str:
    """The pip commands of a supported TensorRT, one per CUDA major, with the driver each needs."""
    return "; ".join(f"CUDA {major} (driver ≥ {MIN_DRIVER[major]}): {CUDA_BUILDS[major]}"
                     for major in sorted(CUDA_BUILDS, reverse=True))


def unsupported_tensorrt(version: str) -> str:
    """Why this TensorRT version cannot be used ("" when it can: 10.12 <= version < 12)."""
    release = tensorrt_release(version)
    shown = version or "(unknown version)"
    minimum = ".".join(map(str, TENSORRT_MIN))
    if release is None:
        return (f"TensorRT {shown} is installed, a version this toolkit cannot read; it supports TensorRT {minimum} "
                f"to {TENSORRT_MAX_MAJOR}.x: {install_hint()}")
    if release < TENSORRT_MIN:
        return (f"TensorRT {shown} is too old: the engine builder needs TensorRT ≥ {minimum} (strongly typed "
                f"networks; the weakly typed build is deprecated since 10.12 and gone in 11); upgrade: {install_hint()}")
    if release[0] > TENSORRT_MAX_MAJOR:
        return (f"TensorRT {shown} is a major version this toolkit does not know (it is written for TensorRT "
                f"{minimum} to {TENSORRT_MAX_MAJOR}.x; a new major version removes APIs); install a supported one: "
                f"{install_hint()}")
    return ""


# ---------------------------------------------------------------------------------------------------
# cudaErrorInsufficientDriver, explained


@dataclass(frozen=True)
class DriverFacts:
    """What error 35 is about. CUDA versions are CUDA's integers (1000 * major + 10 * minor, 12020 = 12.2)."""

    driver: str            # the kernel driver's version ("535.104.05"), "" when unknown
    driver_cuda: int       # newest CUDA the driver supports (cudaDriverGetVersion): 0 = no driver, -1 = unknown
    wheel_cuda: int        # CUDA the cuda-python wheel targets (cudaRuntimeGetVersion), 0 when unknown


def driver_facts(rt: Any) -> DriverFacts:
    """The driver and wheel versions, each read in the way that cannot raise."""
    return DriverFacts(nvidia_driver_version(), _cuda_call(rt, "cudaDriverGetVersion", -1),
                       _cuda_call(rt, "cudaRuntimeGetVersion", 0) or _wheel_cuda())


def insufficient_driver(rt: Any = None) -> str:
    """The message for cudaErrorInsufficientDriver: which driver, which wheels, what they need, what to install."""
    try:
        facts = driver_facts(rt if rt is not None else cudart())
    except Exception:  # noqa: BLE001 — explaining an error must not raise another one
        facts = DriverFacts("", -1, 0)
    return explain_insufficient_driver(facts)


def explain_insufficient_driver(facts: DriverFacts) -> str:
    """The error-35 message from the facts (pure: the tests hold each case)."""
    wheel = facts.wheel_cuda // 1000
    if facts.driver_cuda == 0:
        return ("no NVIDIA driver is loaded (cudaDriverGetVersion reports none): is there an NVIDIA GPU with its "
                "driver on this machine? (use --backend ort-cpu without one)")
    need = f"needs ≥ {MIN_DRIVER[wheel]}" if wheel in MIN_DRIVER else "needs a newer driver"
    wheels = f"the CUDA {wheel} wheels" if wheel else "the cuda-python wheel (CUDA version unknown)"
    oldest, newest = min(MIN_DRIVER), max(MIN_DRIVER)
    update = (f"update the NVIDIA driver (≥ {MIN_DRIVER[oldest]} runs the CUDA {oldest} build: "
              f"{CUDA_BUILDS[oldest]}; ≥ {MIN_DRIVER[newest]} the CUDA {newest} build)")
    if facts.driver_cuda < 0:
        return f"the NVIDIA driver is missing or too old for {wheels} ({need}); {update}"
    head = f"driver too old for {wheels}: {_describe_driver(facts)}, {need}"
    if wheel and facts.driver_cuda >= wheel * 1000:
        return (f"cudaErrorInsufficientDriver although {_describe_driver(facts)} supports {wheels}: the libcuda "
                "loaded is not the kernel driver's (check LD_LIBRARY_PATH and the container's driver mounts)")
    usable = [m for m in sorted(CUDA_BUILDS) if m * 1000 <= facts.driver_cuda and (not wheel or m < wheel)]
    if usable:
        return f"{head}; install the CUDA {usable[-1]} build (in a fresh environment): {CUDA_BUILDS[usable[-1]]}"
    return f"{head}; {update}"


def nvidia_driver_version(path: Path | None = None) -> str:
    """The kernel driver's version from /proc/driver/nvidia/version ("" when absent or unreadable)."""
    try:
        text = (path or DRIVER_VERSION_FILE).read_text(errors="replace")
    except OSError:
        return ""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else ""


def gpu_visible(device_node: Path | None = None, path: str | None = None) -> str | None:
    """The evidence that this machine has an NVIDIA GPU, found without CUDA ("/dev/nvidia0 exists" or
    "nvidia-smi on PATH"), or None. `path`: the search path for nvidia-smi (default: $PATH)."""
    node = device_node or DEVICE_NODE
    if node.exists():
        return f"{node} exists"
    if shutil.which("nvidia-smi", path=path):
        return "nvidia-smi on PATH"
    return None


def _describe_driver(facts: DriverFacts) -> str:
    cuda = _cuda_text(facts.driver_cuda)
    if facts.driver:
        return f"driver {facts.driver}" + (f" (CUDA {cuda})" if cuda else "")
    return f"a driver for CUDA {cuda}" if cuda else "driver version unknown"


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}" if version > 0 else ""


def _cuda_call(rt: Any, name: str, fallback: int) -> int:
    """An int-returning cudart query ((err, value)); `fallback` when it is missing or fails."""
    try:
        err, value = getattr(rt, name)()
        return int(value) if int(err) == 0 else fallback
    except Exception:  # noqa: BLE001
        return fallback


def _wheel_cuda() -> int:
    """The CUDA major of the installed cuda-bindings / cuda-python package (their major is CUDA's), as 1000 * major."""
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            major = importlib.metadata.version(dist).split(".", 1)[0]
        except importlib.metadata.PackageNotFoundError:
            continue
        if major.isdigit():
            return int(major) * 1000
    return 0
