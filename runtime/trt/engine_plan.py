"""What a TensorRT plan in an export directory was built for, as data both the builder (engines/) and the
TensorRT executor (runtime/trt/executor.py) read. Torch-free and tensorrt-free.

DESIGN.md §5: one plan per graph and precision; optimization profiles from the manifest's ranges (the
decode graph: one profile per KV-cache bucket, cache_len fixed, so each bucket's shapes are static and
its step can be captured in a CUDA graph, and a batch range per bucket sized for the decode batch shared by
requests: `decode_batch_max`, `decode_rows_bound`); a plan is keyed by graph, ONNX sha256, precision, profiles,
TensorRT version, GPU name and compute capability (plus the precision policy, which changes the plan, and the
graph's precision form: plans are strongly typed, so the ONNX graph carries the precision — "fp32",
"fp16-mixed" (fp16 with explicit Casts around fp32 islands) or "int8-qdq" (QuantizeLinear/DequantizeLinear)).
A plan whose key differs from what this machine would build is rebuilt by the builder and refused by the
runtime, with a message that says what differs.

Files: `OUT/engines/<graph>.<precision>.plan` and beside it `<graph>.<precision>.json` (the key, the
profiles and what the build chose), `OUT/engines/timing.cache` (shared TensorRT timing cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.contracts import KV_BUCKETS
from runtime.errors import EngineMismatchError
from runtime.gpt.batch_cache import ROW_BUCKETS
from runtime.manifest import GraphEntry, plain_json

ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"
SIDECAR_FORMAT = "indextts2-engines/plan"
SIDECAR_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
#: The precision form of the ONNX graph a plan of each precision is built from (strong typing: TensorRT takes
#: every tensor's type from the graph, https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
#: tensorrt-10x-to-11x.html "Strongly Typed Networks Are Now Required").
GRAPH_FORMS = {"fp32": "fp32", "fp16": "fp16-mixed", "int8": "int8-qdq"}
#: The graph form a record without one stands for: plans built before the builder was strongly typed (weakly
#: typed networks with precision flags and per-layer precision). Never equal to a real form, so such a plan is
#: rebuilt (builder) or refused (runtime).
LEGACY_GRAPH_FORM = "weakly-typed"
#: KV-cache buckets of the host runtime (runtime/gpt/kv_cache.py); the engines add the contract maximum.
DECODE_GRAPH = "gpt_decode"
#: The most device memory one allocation of the shared decode cache may take (runtime/trt/kv_batch_device.py):
#: half of an RTX 3090's 24 GiB. The rest holds the engines (fp16: ~1 GB of weights for each of the three GPT
#: graphs, ~1.2 GB for w2v-BERT, the DiT, vocoder and conditioners; fp32 twice that), their activations and
#: the other stages' buffers. It bounds what the profiles admit; the rows actually used are the scheduler's
#: choice below it (runtime/scheduler/: SchedulerConfig.kv_budget_bytes; mind that a reallocation holds the
#: old and the new allocation at once).
DECODE_KV_CEILING_BYTES = 12 << 30

Shape = tuple[int, ...]


@dataclass(frozen=True)
class GpuInfo:
    name: str                      # e.g. "NVIDIA GeForce RTX 3090"
    compute_capability: str        # e.g. "8.6"

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.compute_capability})"


@dataclass(frozen=True)
class InputProfile:
    """One input's (min, opt, max) shapes in one optimization profile."""

    name: str
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a label (e.g. "cache_len=512") and every input's shape range."""

    label: str
    inputs: tuple[InputProfile, ...]

    def shapes(self) -> dict[str, tuple[Shape, Shape, Shape]]:
        return {i.name: (i.min, i.opt, i.max) for i in self.inputs}

    def admits(self, shapes: Mapping[str, Shape]) -> bool:
        """Whether concrete input shapes fall inside this profile."""
        for i in self.inputs:
            s = shapes.get(i.name)
            if s is None or len(s) != len(i.min):
                return False
            if any(not (lo <= v <= hi) for v, lo, hi in zip(s, i.min, i.max)):
                return False
        return True


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on; two plans with equal keys are interchangeable."""

    graph: str
    onnx_sha256: str
    precision: str
    profiles: tuple[Profile, ...]
    trt_version: str
    gpu: GpuInfo
    policy_sha256: str = ""        # the precision policy applied ("" = none)
    graph_form: str = ""           # the ONNX graph's precision form ("" = GRAPH_FORMS[precision])

    def __post_init__(self) -> None:
        if not self.graph_form:
            object.__setattr__(self, "graph_form", default_graph_form(self.precision))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    def differences(self, other: "EngineKey") -> list[str]:
        """Human-readable reasons why a plan built for `other` is not one for `self`."""
        out = []
        if other.graph != self.graph:
            out.append(f"it is a plan of graph '{other.graph}', not '{self.graph}'")
        if other.onnx_sha256 != self.onnx_sha256:
            out.append("it was built from another ONNX file (re-exported since)")
        if other.precision != self.precision:
            out.append(f"it was built for {other.precision}, not {self.precision}")
        if other.trt_version != self.trt_version:
            out.append(f"it was built with TensorRT {other.trt_version}, this is TensorRT {self.trt_version}")
        if other.gpu != self.gpu:
            out.append(f"it was built for {other.gpu.describe()}, this GPU is {self.gpu.describe()}")
        if other.profiles != self.profiles:
            out.append("its optimization profiles differ from the ones this build makes (the manifest's ranges; "
                       "for gpt_decode, a batch range per KV bucket): "
                       + profiles_change(other.profiles, self.profiles))
        if other.policy_sha256 != self.policy_sha256:
            out.append("it was built with another precision policy")
        if other.graph_form != self.graph_form:
            out.append(f"{_describe_form(other.graph_form)}, this build is strongly typed from the {self.graph_form} "
                       "graph")
        return out


def profiles_change(was: Sequence[Profile], now: Sequence[Profile]) -> str:
    """The first difference between a plan's profiles (`was`) and this build's (`now`), in words."""
    if [p.label for p in was] != [p.label for p in now]:
        return f"it has profiles {[p.label for p in was]}, this build makes {[p.label for p in now]}"
    for old, new in zip(was, now):
        olds, news = old.shapes(), new.shapes()
        for name in sorted(set(olds) | set(news)):
            if olds.get(name) != news.get(name):
                def fmt(s: tuple[Shape, Shape, Shape] | None) -> str:
                    return "no such input" if s is None else f"min {s[0]} opt {s[1]} max {s[2]}"
                return (f"profile {new.label}, input '{name}': {fmt(olds.get(name))} in the plan, "
                        f"{fmt(news.get(name))} now")
    return "the inputs' order differs"


def default_graph_form(precision: str) -> str:
    """The graph form a plan of `precision` is built from (unknown precisions map to themselves)."""
    return GRAPH_FORMS.get(precision, precision)


def _describe_form(form: str) -> str:
    if form == LEGACY_GRAPH_FORM:
        return ("it was built as a weakly typed network (its record names no graph form: precision flags, before "
                "the precision moved into the ONNX graph)")
    return f"it was built from the {form} graph"


@dataclass(frozen=True)
class PlanRecord:
    """The sidecar of a plan: its key, the plan's sha256 and what the build decided."""

    key: EngineKey
    plan_sha256: str
    fp32_layers: tuple[str, ...] = ()          # layers forced to fp32 in an fp16/int8 plan
    build_seconds: float = 0.0
    notes: Mapping[str, Any] = field(default_factory=dict)


def plan_paths(root: str | Path, graph: str, precision: str) -> tuple[Path, Path]:
    """(plan, sidecar) paths of one graph's plan in export directory `root`."""
    folder = Path(root) / ENGINES_DIR
    return folder / f"{graph}.{precision}.plan", folder / f"{graph}.{precision}.json"


# ---------------------------------------------------------------------------------------------------
# Profiles


def decode_buckets(entry: GraphEntry, host_buckets: Sequence[int] = KV_BUCKETS) -> tuple[int, ...]:
    """The KV-cache lengths the decode plan has a profile for: the host buckets inside the contract's
    cache_len range, plus the range's maximum (so every request fits a bucket)."""
    r = entry.ranges["cache_len"]
    inside = [b for b in sorted(host_buckets) if r.min <= b < r.max]
    return tuple(inside + [r.max])


def decode_row_bytes(entry: GraphEntry) -> int:
    """Bytes one decode row takes per cache position: every `gpt_decode` input with both a batch and a
    cache_len axis (each layer's kv_cache.<i>, 2*heads*head_dim float32, and kv_mask). Real model:
    24 * 2*20*64*4 + 4 = 245,764 bytes."""
    total = 0
    for spec in entry.inputs:
        if "batch" in spec.shape and "cache_len" in spec.shape:
            static = math.prod(d for d in spec.shape if isinstance(d, int))
            total += static * np.dtype(spec.dtype).itemsize
    return total


def decode_batch_max(entry: GraphEntry, bucket: int) -> int:
    """The most decode rows `bucket`'s profile admits: the rows one cache allocation of
    DECODE_KV_CEILING_BYTES holds at `bucket` positions, rounded down to a row bucket of the shared batch
    (runtime/gpt/batch_cache.py:ROW_BUCKETS, at most its largest), never below the manifest's batch maximum
    (one request's beams must always fit). Real model, 12 GiB: 256 -> 64 (204 fit), 512 -> 64 (102),
    1024 -> 48 (51), 2048 -> 24 (25), 2688 -> 16 (19)."""
    fit = DECODE_KV_CEILING_BYTES // max(decode_row_bytes(entry) * bucket, 1)
    rows = max([b for b in ROW_BUCKETS if b <= fit], default=0)
    return max(rows, entry.ranges["batch"].max)


def decode_rows_bound(entry: GraphEntry, buckets: Sequence[int] | None = None) -> int:
    """Decode rows the plan admits at every one of `buckets` (default: every bucket of the plan): the least
    per-bucket maximum. A shared batch's rows all move to the bucket its longest row needs, whichever that
    is, so this is the row bound of a decode batch on TensorRT (16 for the real model)."""
    return min(decode_batch_max(entry, b) for b in (buckets or decode_buckets(entry)))


def engine_profiles(entry: GraphEntry) -> tuple[Profile, ...]:
    """The optimization profiles of `entry`'s plan: one from the manifest's ranges, except `gpt_decode`,
    which gets one per KV-cache bucket with cache_len fixed (static shapes per bucket) and a batch range
    from the manifest's minimum to `decode_batch_max` (the opt point stays the manifest's: one request's
    beams, the latency-critical case)."""
    if entry.name != DECODE_GRAPH:
        return (_profile("default", entry, {a: (r.min, r.opt, r.max) for a, r in entry.ranges.items()}),)
    profiles = []
    batch = entry.ranges["batch"]
    for bucket in decode_buckets(entry):
        axes = {a: (r.min, r.opt, r.max) for a, r in entry.ranges.items()}
        hi = decode_batch_max(entry, bucket)
        axes["batch"] = (batch.min, min(batch.opt, hi), hi)
        axes["cache_len"] = (bucket, bucket, bucket)
        profiles.append(_profile(f"cache_len={bucket}", entry, axes))
    return tuple(profiles)


def _profile(label: str, entry: GraphEntry, axes: Mapping[str, tuple[int, int, int]]) -> Profile:
    points = [{a: v[i] for a, v in axes.items()} for i in range(3)]
    inputs = tuple(InputProfile(t.name, *(tuple(t.concrete(p)) for p in points)) for t in entry.inputs)
    return Profile(label, inputs)


# ---------------------------------------------------------------------------------------------------
# Sidecar files


def write_record(path: str | Path, record: PlanRecord) -> None:
    """Write a plan's sidecar atomically."""
    path = Path(path)
    data = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, **plain_json(dataclasses.asdict(record))}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: str | Path) -> PlanRecord:
    """A plan's sidecar; unreadable or of another format -> EngineMismatchError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SIDECAR_FORMAT or data.get("version") != SIDECAR_VERSION:
            raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
        k = data["key"]
        key = EngineKey(
            graph=str(k["graph"]), onnx_sha256=str(k["onnx_sha256"]), precision=str(k["precision"]),
            profiles=tuple(Profile(str(p["label"]), tuple(
                InputProfile(str(i["name"]), tuple(i["min"]), tuple(i["opt"]), tuple(i["max"])) for i in p["inputs"]))
                for p in k["profiles"]),
            trt_version=str(k["trt_version"]), gpu=GpuInfo(str(k["gpu"]["name"]), str(k["gpu"]["compute_capability"])),
            policy_sha256=str(k.get("policy_sha256", "")),
            graph_form=str(k.get("graph_form") or LEGACY_GRAPH_FORM))
        return PlanRecord(key, str(data["plan_sha256"]), tuple(data.get("fp32_layers", ())),
                          float(data.get("build_seconds", 0.0)), dict(data.get("notes", {})))
    except FileNotFoundError as err:
        raise EngineMismatchError(f"{path}: the plan's record is missing; rebuild with python -m export.build") from err
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise EngineMismatchError(f"{path}: unreadable plan record ({err}); rebuild with python -m export.build") \
            from err


def check_record(record: PlanRecord, expected: EngineKey, plan: str | Path) -> None:
    """Refuse a plan built for another key, saying what differs."""
    reasons = expected.differences(record.key)
    if reasons:
        raise EngineMismatchError(f"{plan}: this engine cannot run here: " + "; ".join(reasons)
                                  + ". Rebuild it on this machine with python -m export.build")
