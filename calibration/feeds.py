"""The collected feeds: one `.npz` per recorded graph call plus an index with statistics.

Feeds are the executors' currency (`dict[name -> array]`, contract names), so whatever consumes them —
the FP16 analysis, the INT8 quantizer, a benchmark — runs a graph on them without translation.

Layout of a calibration directory::

    CALIB/calibration.json           index: settings, items, per-graph feed list and tensor statistics
    CALIB/feeds/<graph>/<n>.npz      one call's feed (np.savez, uncompressed: reads are memory-cheap)
    CALIB/references/*.wav           the generated default voices (when used)

Statistics per graph input (over every kept call): dtype, min, max, max |x|, mean, std, element and call
counts, non-finite count, and the range of each dimension — enough to see whether the set covers the
shapes an engine profile allows and the value ranges an INT8 scale must hold.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from runtime.errors import InputError

INDEX_NAME = "calibration.json"
FEEDS_DIR = "feeds"
FORMAT_VERSION = 1

Feed = dict[str, np.ndarray]


@dataclass
class TensorStats:
    """Running statistics of one input tensor of one graph (float64 accumulation)."""

    dtype: str = ""
    calls: int = 0
    count: int = 0
    nonfinite: int = 0
    min: float = math.inf
    max: float = -math.inf
    absmax: float = 0.0
    sum: float = 0.0
    sumsq: float = 0.0
    dims: list[list[int]] = field(default_factory=list)       # per axis [lowest, highest]

    def add(self, value: np.ndarray) -> None:
        value = np.asarray(value)
        self.dtype = self.dtype or str(value.dtype)
        self.calls += 1
        if not self.dims:
            self.dims = [[d, d] for d in value.shape]
        for axis, d in enumerate(value.shape[:len(self.dims)]):
            self.dims[axis] = [min(self.dims[axis][0], d), max(self.dims[axis][1], d)]
        if value.size == 0 or value.dtype == np.bool_:
            self.count += value.size
            return
        x = value.astype(np.float64, copy=False)
        finite = np.isfinite(x)
        self.nonfinite += int(x.size - np.count_nonzero(finite))
        x = x[finite] if not finite.all() else x.reshape(-1)
        if x.size == 0:
            return
        self.count += int(x.size)
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.absmax = max(self.absmax, float(np.abs(x).max()))
        self.sum += float(x.sum())
        self.sumsq += float(np.square(x).sum())

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        if not self.count:
            return math.nan
        return math.sqrt(max(self.sumsq / self.count - self.mean ** 2, 0.0))

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("sum", "sumsq")}
        out.update(mean=self.mean, std=self.std)
        for k in ("min", "max", "mean", "std"):
            out[k] = None if not math.isfinite(out[k]) else out[k]
        out["_sum"], out["_sumsq"] = self.sum, self.sumsq
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorStats":
        s = cls(dtype=data["dtype"], calls=data["calls"], count=data["count"], nonfinite=data["nonfinite"],
                absmax=data["absmax"], sum=data["_sum"], sumsq=data["_sumsq"], dims=[list(d) for d in data["dims"]])
        s.min = data["min"] if data["min"] is not None else math.inf
        s.max = data["max"] if data["max"] is not None else -math.inf
        return s


@dataclass
class FeedRecord:
    file: str                     # relative to the calibration directory
    item: int                     # index into the index's items
    segment: int
    call: int                     # the graph's call index within the segment
    shapes: dict[str, list[int]]


@dataclass
class GraphFeeds:
    feeds: list[FeedRecord] = field(default_factory=list)
    stats: dict[str, TensorStats] = field(default_factory=dict)


class FeedStore:
    """Writes and reads a calibration directory (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta: dict[str, Any] = {}
        self.items: list[dict[str, Any]] = []
        self.graphs: dict[str, GraphFeeds] = {}

    # -- writing ----------------------------------------------------------------------------------
    def add(self, graph: str, feed: Mapping[str, np.ndarray], item: int, segment: int, call: int) -> FeedRecord:
        g = self.graphs.setdefault(graph, GraphFeeds())
        rel = f"{FEEDS_DIR}/{graph}/{len(g.feeds):06d}.npz"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k: np.asarray(v) for k, v in feed.items()})
        for name, value in feed.items():
            g.stats.setdefault(name, TensorStats()).add(value)
        record = FeedRecord(rel, item, segment, call, {k: list(np.shape(v)) for k, v in feed.items()})
        g.feeds.append(record)
        return record

    def save(self) -> Path:
        """Write the index atomically (a crash leaves the previous index, never half of one)."""
        data = {"version": FORMAT_VERSION, "meta": self.meta, "items": self.items,
                "graphs": {g: {"feeds": [asdict(r) for r in gf.feeds],
                               "stats": {n: s.to_json() for n, s in gf.stats.items()}}
                           for g, gf in sorted(self.graphs.items())}}
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / INDEX_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        return path

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "FeedStore":
        root = Path(root)
        path = root / INDEX_NAME
        if not path.is_file():
            raise InputError(f"{root}: not a calibration directory ({INDEX_NAME} missing); create one with "
                             "python -m calibration collect")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from err
        if data.get("version") != FORMAT_VERSION:
            raise InputError(f"{path}: calibration format {data.get('version')!r}, this toolkit reads "
                             f"{FORMAT_VERSION}; collect again")
        store = cls(root)
        store.meta, store.items = data.get("meta", {}), data.get("items", [])
        for g, gd in data.get("graphs", {}).items():
            store.graphs[g] = GraphFeeds([FeedRecord(**r) for r in gd["feeds"]],
                                         {n: TensorStats.from_json(s) for n, s in gd["stats"].items()})
        return store

    def records(self, graph: str, limit: int | None = None) -> list[FeedRecord]:
        """The graph's feed records; with `limit`, that many spread evenly over the set (first and last
        included), so a subset still spans the texts, voices and call positions."""
        recs = self.graphs.get(graph, GraphFeeds()).feeds
        if limit is None or len(recs) <= limit:
            return list(recs)
        if limit <= 1:
            return recs[:limit]
        picks = sorted({round(i * (len(recs) - 1) / (limit - 1)) for i in range(limit)})
        return [recs[i] for i in picks]

    def load(self, record: FeedRecord) -> Feed:
        path = self.root / record.file
        if not path.is_file():
            raise InputError(f"{path}: feed file missing from the calibration directory; collect again")
        with np.load(path, allow_pickle=False) as data:
            return {k: np.ascontiguousarray(data[k]) for k in data.files}

    def feeds(self, graph: str, limit: int | None = None) -> Iterator[Feed]:
        for record in self.records(graph, limit):
            yield self.load(record)
