"""ONNX -> TensorRT plans (DESIGN.md §5). This issue provides only the seam `export.build` calls:

- `available() -> (bool, reason)`: whether TensorRT and an NVIDIA GPU are usable here. It never
  raises and imports nothing heavy at module level (tensorrt is imported lazily, STYLE.md practice 8),
  so `engines` imports everywhere.
- `build_all(manifest, out, precision)`: one plan per graph of the manifest. The builder itself is a
  later issue; until then it raises NotImplementedError and `export.build` reports engines as skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.manifest import Manifest


def available() -> tuple[bool, str]:
    """(True, description) when TensorRT imports and a CUDA GPU is visible, else (False, reason)."""
    try:
        return _probe()
    except Exception as err:  # noqa: BLE001 — a probe reports, it never crashes the caller
        return False, f"the TensorRT/GPU probe failed: {type(err).__name__}: {err}"


def _probe() -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed"
    try:
        import tensorrt as trt
    except Exception as err:  # noqa: BLE001 — a broken install (missing libnvinfer) raises anything
        return False, f"tensorrt cannot be imported ({type(err).__name__}: {err})"
    count, why = _gpu_count()
    if count == 0:
        return False, why
    return True, f"TensorRT {getattr(trt, '__version__', '?')}, {count} CUDA device(s)"


def _gpu_count() -> tuple[int, str]:
    """Number of CUDA devices via cuda-python (13: `cuda.bindings.runtime`; older: `cuda.cudart`).

    cudaGetDeviceCount returns an error code instead of raising when there is no GPU (DESIGN.md §3).
    """
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return 0, "cuda-python is not installed (needed to find a GPU)"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        return 0, f"no CUDA GPU ({getattr(err, 'name', err)})"
    if count == 0:
        return 0, "no CUDA GPU"
    return int(count), ""


def build_all(manifest: "Manifest", out: str | Path, precision: str) -> list[Path]:
    """Build one TensorRT plan per graph of `manifest` under `out/engines/` (the engines issue)."""
    raise NotImplementedError("the TensorRT engine builder is not written yet (engines issue)")
