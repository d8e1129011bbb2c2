"""The INT8 seam: how a calibrator reaches the builder. Only the hook's type lives here; the calibrator
itself (data, cache, batches) is calibration/int8.py's, and `python -m calibration int8`
(calibration/int8_build.py) is what passes it to `engines.build_all` — engines never import calibration.

`CalibratorFactory(graph, entry, profile) -> calibrator or None` is called once per graph by
engines/builder.py when `precision == "int8"`:
- `graph`, `entry`: the graph's name and manifest entry (its inputs and ranges);
- `profile`: the plan's first optimization profile (runtime.trt.engine_plan.Profile); the builder sets
  that profile as the calibration profile (`config.set_calibration_profile`), where TensorRT replaces
  min and max by opt, so the calibrator must feed batches at the profile's opt shapes;
- returns a TensorRT calibrator object (e.g. a `trt.IInt8EntropyCalibrator2` subclass that called
  `trt.IInt8EntropyCalibrator2.__init__(self)`), or None when calibration showed INT8 does not hold
  for this graph: the graph's int8 plan is then built as fp16 (with the precision policy's fp32
  islands), and its record says so (`notes["int8"] = false`).

Without a factory an int8 build is refused up front with INT8_NEEDS_CALIBRATION.

Deprecation (TENSORRT_API.md §3): implicit INT8 calibration — `config.int8_calibrator`,
`set_calibration_profile`, the `IInt8*Calibrator` classes — is deprecated since TensorRT 10.1
("Superseded by explicit quantization"), and `BuilderFlag.INT8` since 10.12 (strong typing); TensorRT 11
removes the path. The replacement is explicit quantization: an ONNX graph with QuantizeLinear /
DequantizeLinear nodes (NVIDIA TensorRT Model Optimizer, `python -m modelopt.onnx.quantization`, or
QAT) built as a STRONGLY_TYPED network without precision flags. This hook serves TensorRT 10.x builds
only; the explicit route will need its own graph files, not a calibrator.
Docs: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/deprecated.html ,
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from runtime.errors import InputError

if TYPE_CHECKING:
    from runtime.manifest import GraphEntry
    from runtime.trt.engine_plan import Profile

INT8_NEEDS_CALIBRATION = ("INT8 needs calibration data: no calibrator was given; build fp16 instead, or build "
                          "INT8 plans with python -m calibration int8 --engines OUT --calib CALIB (it passes "
                          "the CalibratorFactory)")


class CalibratorFactory(Protocol):
    def __call__(self, graph: str, entry: "GraphEntry", profile: "Profile") -> Any | None:
        """A TensorRT INT8 calibrator for `graph` at `profile`, or None to build this graph without INT8."""


def require_calibrator(precision: str, factory: CalibratorFactory | None) -> None:
    """Refuse an int8 build without a calibrator, before any work is done."""
    if precision == "int8" and factory is None:
        raise InputError(INT8_NEEDS_CALIBRATION)
