"""INT8 for TensorRT 10: an entropy calibrator fed by the collected feeds, and its cache file.

The pieces, each testable without a GPU except the last call into TensorRT:

- `fit_feed` / `CalibrationBatches` (the data loader): the collected feeds of one graph, each resized to
  the calibration profile's `opt` shapes. TensorRT calibrates at one shape (engines/calibration_hook.py:
  the plan's first profile, min = max = opt), while the collected feeds have the lengths of real
  requests, so every dynamic axis is cropped or tiled (repeated from its start) to `opt`. That keeps each
  tensor's value distribution — what entropy calibration reads — while losing cross-tensor consistency
  (a mask cropped differently from its sequence), an accepted approximation for activation ranges.
- `CalibrationCache`: our cache file: one JSON header line (graph, ONNX sha256, feed digest, profile,
  TensorRT version, algorithm, the blob's sha256 and size) followed by TensorRT's own cache bytes. A cache
  whose header does not match the current build (another ONNX file, other feeds, another TensorRT major,
  a damaged blob) is ignored with the reason logged, so TensorRT recalibrates instead of trusting it.
- `entropy_calibrator(trt, batches, cache)`: a `trt.IInt8EntropyCalibrator2` subclass
  (`get_batch_size`, `get_batch(names) -> [device pointers]` or `[]` when done, `read_calibration_cache`,
  `write_calibration_cache`; docs: TensorRT 10.7 Python API, infer/Int8/EntropyCalibrator2.html). Device
  buffers come from runtime/trt/cuda.py (cuda-python), one per input, reused and grown as needed.
- `calibrator_factory(calib_dir)`: the engines' `CalibratorFactory` (engines/calibration_hook.py); it
  returns None for graphs the INT8 gate refused (calibration/gate.py), so they are built fp16.

Deprecation: implicit calibration is deprecated since TensorRT 10.1 and removed in 11 (see
engines/calibration_hook.py); this serves TensorRT 10 builds, the version the toolkit pins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from runtime.errors import InputError

from .feeds import Feed, FeedStore

log = logging.getLogger(__name__)

CACHE_FORMAT = "indextts2-int8-calibration"
CACHE_VERSION = 1
ALGORITHM = "entropy2"
INT8_DIR = "int8"


def fit_axis(value: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`value` with `axis` cropped to `size` or tiled (repeated from its start) up to it."""
    have = value.shape[axis]
    if have == size:
        return value
    if have == 0:
        raise InputError(f"cannot fit an empty axis {axis} of shape {value.shape} to {size}")
    return np.take(value, np.arange(size) % have, axis=axis)


def fit_feed(feed: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]],
             dtypes: Mapping[str, str] | None = None) -> Feed:
    """Every input of `feed` at exactly `shapes[name]` (axes cropped or tiled), contiguous, in its dtype."""
    out: Feed = {}
    for name, shape in shapes.items():
        if name not in feed:
            raise InputError(f"calibration feed has no input '{name}' (it has {sorted(feed)})")
        value = np.asarray(feed[name])
        if value.ndim != len(shape):
            raise InputError(f"calibration input '{name}': rank {value.ndim}, the profile says {len(shape)}")
        for axis, size in enumerate(shape):
            value = fit_axis(value, axis, int(size))
        dtype = np.dtype(dtypes[name]) if dtypes and name in dtypes else value.dtype
        out[name] = np.ascontiguousarray(value, dtype=dtype)
    return out


class CalibrationBatches:
    """The collected feeds of `graph`, fitted to the calibration profile (`opt` shapes)."""

    def __init__(self, store: FeedStore, graph: str, opt_shapes: Mapping[str, Sequence[int]],
                 dtypes: Mapping[str, str] | None = None, limit: int | None = None) -> None:
        self.store, self.graph = store, graph
        self.opt_shapes = {k: tuple(int(d) for d in v) for k, v in opt_shapes.items()}
        self.dtypes = dict(dtypes or {})
        self.records = store.records(graph, limit)
        if not self.records:
            raise InputError(f"no collected feeds for graph '{graph}' in {store.root}; run python -m calibration "
                             "collect first")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Feed]:
        for record in self.records:
            yield fit_feed(self.store.load(record), self.opt_shapes, self.dtypes)

    def digest(self) -> str:
        """Identity of the data: the feed files (name, size) and the shapes they are fitted to."""
        h = hashlib.sha256()
        for r in self.records:
            path = self.store.root / r.file
            h.update(f"{r.file}:{path.stat().st_size if path.exists() else -1};".encode())
        h.update(json.dumps(self.opt_shapes, sort_keys=True).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What a calibration cache must match to be reused."""

    graph: str
    onnx_sha256: str
    feeds: str
    profile: str
    tensorrt: str            # major version: a cache from another major is not trusted
    algorithm: str = ALGORITHM


class CalibrationCache:
    """`<calib>/int8/<graph>.cache`: a JSON header line, then TensorRT's cache bytes."""

    def __init__(self, path: str | Path, key: CacheKey) -> None:
        self.path, self.key = Path(path), key

    def read(self) -> bytes | None:
        """TensorRT's bytes if the file exists and matches `key` and its checksum; else None (logged)."""
        if not self.path.is_file():
            return None
        data = self.path.read_bytes()
        head, sep, blob = data.partition(b"\n")
        try:
            header = json.loads(head.decode("utf-8")) if sep else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
            log.warning("%s: not an %s file; recalibrating", self.path, CACHE_FORMAT)
            return None
        if header.get("version") != CACHE_VERSION:
            log.warning("%s: cache format version %s, this toolkit writes %s; recalibrating", self.path,
                        header.get("version"), CACHE_VERSION)
            return None
        differs = [f"{k} {header.get(k)!r} != {v!r}" for k, v in vars(self.key).items() if header.get(k) != v]
        if differs:
            log.info("%s: calibrated for something else (%s); recalibrating", self.path, "; ".join(differs))
            return None
        if header.get("blob_size") != len(blob) or header.get("blob_sha256") != hashlib.sha256(blob).hexdigest():
            log.warning("%s: cache data damaged (size or checksum differs); recalibrating", self.path)
            return None
        return blob

    def write(self, blob: bytes) -> Path:
        """Write atomically: a crash never leaves a half-written cache that a later build would trust."""
        blob = bytes(blob)
        header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **vars(self.key),
                  "blob_size": len(blob), "blob_sha256": hashlib.sha256(blob).hexdigest()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_bytes(json.dumps(header, sort_keys=True).encode("utf-8") + b"\n" + blob)
        os.replace(tmp, self.path)
        return self.path


def parse_trt_cache(blob: bytes) -> tuple[str, dict[str, float]]:
    """(first line, {tensor: scale}) of TensorRT's text calibration cache, for the report.

    The layout (a `TRT-<version>-EntropyCalibration2` line, then `<tensor>: <float32 bits as hex>` lines) is
    what TensorRT writes in practice, not a documented format; anything else gives ("", {})."""
    try:
        text = bytes(blob).decode("ascii")
    except UnicodeDecodeError:
        return "", {}
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        return "", {}
    scales = {}
    for line in lines[1:]:
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or len(value) != 8:
            continue
        try:
            scales[name.strip()] = float(np.frombuffer(bytes.fromhex(value)[::-1], "<f4")[0])
        except ValueError:
            continue
    return lines[0], scales


def entropy_calibrator(trt: Any, batches: CalibrationBatches, cache: CalibrationCache, cuda: Any = None) -> Any:
    """A `trt.IInt8EntropyCalibrator2` feeding `batches` through device buffers (runtime/trt/cuda.py)."""
    if cuda is None:
        from runtime.trt import cuda

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)   # required by the bindings (TensorRT docs)
            self._batches = iter(batches)
            self._buffers: dict[str, Any] = {}
            self._stream = cuda.Stream()
            self.served = 0

        def get_batch_size(self) -> int:
            return 1                                    # explicit batch: shapes come from the profile

        def get_batch(self, names: Sequence[str], *args: Any) -> list[int]:
            try:
                feed = next(self._batches)
            except StopIteration:
                return []
            pointers = []
            for name in names:
                value = feed[name]
                buf = self._buffers.get(name)
                if buf is None or buf.nbytes < value.nbytes:
                    if buf is not None:
                        buf.close()
                    buf = self._buffers[name] = cuda.DeviceBuffer(value.nbytes, f"calibration input {name}")
                cuda.memcpy_htod_async(buf.ptr, value.ctypes.data, value.nbytes, self._stream)
                pointers.append(int(buf.ptr))
            self._stream.sync()                         # TensorRT reads the buffers after we return
            self.served += 1
            if self.served % 8 == 0:
                log.info("%s: calibration batch %d/%d", batches.graph, self.served, len(batches))
            return pointers

        def read_calibration_cache(self, *args: Any) -> bytes | None:
            blob = cache.read()
            if blob is not None:
                log.info("%s: INT8 scales from %s", batches.graph, cache.path)
            return blob

        def write_calibration_cache(self, blob: Any, *args: Any) -> None:
            cache.write(bytes(blob))
            log.info("%s: INT8 calibration cache written to %s", batches.graph, cache.path)

        def close(self) -> None:
            for buf in self._buffers.values():
                buf.close()
            self._buffers.clear()
            self._stream.close()

    return EntropyCalibrator()


def calibrator_factory(calib_dir: str | Path, limit: int | None = None, trt: Any = None, cuda: Any = None) -> Any:
    """The engines' CalibratorFactory over a calibration directory (see the module docstring)."""
    from engines.calibration_hook import CalibratorFactory  # noqa: F401 (the protocol this satisfies)

    from .gate import refused_graphs

    calib_dir = Path(calib_dir)
    store = FeedStore.open(calib_dir)
    refused = refused_graphs(calib_dir)

    def factory(graph: str, entry: Any, profile: Any) -> Any | None:
        if graph in refused:
            log.warning("%s: INT8 refused by the gate (%s); built fp16", graph, refused[graph])
            return None
        if graph not in store.graphs:
            log.warning("%s: no calibration feeds; built fp16", graph)
            return None
        t = trt
        if t is None:
            from runtime.trt.api import import_tensorrt

            t = import_tensorrt()
        opt = {i.name: i.opt for i in profile.inputs}
        dtypes = {s.name: s.dtype for s in entry.inputs}
        batches = CalibrationBatches(store, graph, opt, dtypes, limit)
        key = CacheKey(graph, entry.sha256, batches.digest(), profile.label, str(t.__version__).split(".")[0])
        return entropy_calibrator(t, batches, CalibrationCache(calib_dir / INT8_DIR / f"{graph}.cache", key), cuda)

    return factory
