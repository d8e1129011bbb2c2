"""The one way into the tensorrt module: the checked import, the process's TensorRT logger, and enum names.

The engine builder (engines/), the executor (runtime/trt/executor.py) and calibration all go through
these, so a version check, a log line's level and an enum's printed name are decided once. tensorrt is
imported only when `import_tensorrt` is called.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from runtime.errors import BackendError
from runtime.trt.gpu import install_hint, unsupported_tensorrt

trt_log = logging.getLogger("tensorrt")

MAX_KEPT_ERRORS = 20        # the logger keeps the last error messages, quoted in our own errors

_SEVERITY_LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
                    "INFO": logging.DEBUG, "VERBOSE": 5}
_LOGGERS: dict[int, tuple[Any, Any]] = {}


def import_tensorrt() -> Any:
    """The tensorrt module, checked to be a supported version (10.12 to 11.x: runtime.trt.gpu.unsupported_tensorrt);
    BackendError (with what to install) otherwise."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as err:
        raise BackendError(f"tensorrt is not installed (needs an NVIDIA GPU; without one the ONNX graphs run with "
                           f"--backend ort-cuda or ort-cpu): {install_hint()}") from err
    except Exception as err:  # noqa: BLE001 — a broken install (missing libnvinfer) raises anything
        raise BackendError(f"tensorrt cannot be imported ({type(err).__name__}: {err})") from err
    unsupported = unsupported_tensorrt(getattr(trt, "__version__", ""))
    if unsupported:
        raise BackendError(unsupported)
    return trt


def enum_name(value: Any) -> str:
    """'FLOAT' from trt.DataType.FLOAT (pybind11 enums have .name; str() gives 'DataType.FLOAT')."""
    name = getattr(value, "name", None)
    return str(name) if name is not None else str(value).rsplit(".", 1)[-1]


def trt_logger(trt: Any) -> Any:
    """The process's TensorRT logger for this tensorrt module (one per module: TensorRT wants a single
    logger per process), forwarding to `logging` ("tensorrt"); `.errors` keeps the last error messages."""
    cached = _LOGGERS.get(id(trt))
    if cached is not None and cached[0] is trt:
        return cached[1]

    class LoggingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)                 # required for pybind11 trampolines
            self.errors: collections.deque[str] = collections.deque(maxlen=MAX_KEPT_ERRORS)

        def log(self, severity: Any, msg: str) -> None:
            level = _SEVERITY_LEVELS.get(enum_name(severity), logging.WARNING)
            if level >= logging.ERROR:
                self.errors.append(str(msg))
            if trt_log.isEnabledFor(level):
                trt_log.log(level, "TensorRT: %s", msg)

    logger = LoggingLogger()
    _LOGGERS[id(trt)] = (trt, logger)
    return logger
