"""ONNX -> TensorRT plans (DESIGN.md §5). This issue provides only the seam `export.build` calls:

- `available() -> (bool, reason)`: whether TensorRT and an NVIDIA GPU are usable here. It never
  raises and imports nothing heavy at module level (tensorrt is imported lazily, STYLE.md practice 8),
  so `engines` imports everywhere.
- `build_all(manifest, out, precision)`: one plan per graph of the manifest. The builder itself is a
  later issue; until then it raises NotImplementedError and `export.build` reports engines as skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.manifest import Manifest


def available() -> tuple[bool, str]:
    """(True, description) when TensorRT imports and a CUDA GPU is visible, else (False, reason).

    The probe itself is runtime.gpu's, shared with the runtime's backend choice."""
    from runtime.gpu import tensorrt

    probe = tensorrt()
    return probe.ok, probe.detail


def build_all(manifest: "Manifest", out: str | Path, precision: str) -> list[Path]:
    """Build one TensorRT plan per graph of `manifest` under `out/engines/` (the engines issue)."""
    raise NotImplementedError("the TensorRT engine builder is not written yet (engines issue)")
