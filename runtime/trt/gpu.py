"""Is there an NVIDIA GPU, and is TensorRT usable? A probe that never raises.

DESIGN.md §3 (export facts): cuda-python 13 imports as `cuda.bindings.runtime` (older releases as
`cuda.cudart`), and `cudaGetDeviceCount` returns an error code instead of raising when there is no GPU.
Both the engine builder (`engines.available`) and the runtime's backend choice (`--backend auto`,
`python -m runtime inspect`) ask here, so they always agree. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

#: The TensorRT major version the builder and the executor are written against. TensorRT 11 removes what the
#: fp16-with-fp32-islands build relies on (weakly typed networks, per-layer precision, precision flags), so
#: another major version is refused up front instead of failing inside a build.
TENSORRT_MAJOR = 10
TENSORRT_PIN = "tensorrt>=10,<11"


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


def unsupported_tensorrt(version: str) -> str:
    """Why this TensorRT version cannot be used ("" when it can)."""
    major = str(version).split(".", 1)[0]
    if major.isdigit() and int(major) == TENSORRT_MAJOR:
        return ""
    return (f"TensorRT {version or '(unknown version)'} is installed; the engine builder and executor are written "
            f"for TensorRT {TENSORRT_MAJOR} (pip install '{TENSORRT_PIN}')")
