"""The CPU plan of an export directory: which executor and precision runs each graph on this CPU.

Why a plan: on a CPU the fastest way to run a graph differs per graph (issue 22, measured: OpenVINO in bf16
runs the DiT step ~1.8-3x faster than ONNX Runtime float32, but the GPT decode step is slower on OpenVINO in
either precision), and bf16 is only allowed where calibration's end-to-end gates pass. The plan is made by
`python -m benchmarks.cpu_plan` (it measures every candidate on this CPU and runs the gates) and written
next to the export as `cpu_plan.json`, like the TensorRT engines' sidecars; `--backend cpu-auto` reads it
and `python -m runtime inspect` shows it. This module only holds the data, its identity checks and the
file; it measures nothing.

A plan is valid only for the CPU it was measured on (model name and the instruction-set flags that decide
the kernels: AVX-512, bf16, AMX, VNNI) and the export it was measured with (the fingerprints of its graphs):
a plan from another CPU or another export is refused naming both, since its timings and gates say nothing
here. `cpu-auto` falls back to ONNX Runtime float32 only when asked (`fallback=True`), with a warning.

Candidates (`Choice`): ("ort-cpu", "fp32"), ("ov-cpu", "fp32"), ("ov-cpu", "bf16"), and for the GPT decode
step ("ort-cpu", "int8w"): its weight-only int8 form (calibration/weight_only.py), a file the plan maker writes
next to the export and records in the plan (`GraphPlan.form`, with the float32 file it was made from).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from runtime.errors import CheckpointError, ContractError, EngineMismatchError, InputError
from runtime.manifest import Manifest, plain_json

if TYPE_CHECKING:
    from runtime.manifest import GraphEntry

log = logging.getLogger(__name__)

PLAN_FILE = "cpu_plan.json"
PLAN_FORMAT = "indextts2-engines/cpu-plan"
PLAN_VERSION = 1
#: the (backend, precision) pairs a plan may choose for a graph
CANDIDATES = (("ort-cpu", "fp32"), ("ov-cpu", "fp32"), ("ov-cpu", "bf16"), ("ort-cpu", "int8w"))
#: instruction-set flags (Linux /proc/cpuinfo names) that change which kernels ONNX Runtime and OpenVINO run
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")


@dataclass(frozen=True)
class CpuIdentity:
    """What a measurement on a CPU depends on: its model name, architecture and kernel-relevant ISA flags."""

    model: str
    machine: str
    flags: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.model} ({self.machine}; {' '.join(self.flags) or 'no listed ISA extensions'})"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "flags": list(self.flags)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CpuIdentity":
        return cls(str(d["model"]), str(d["machine"]), tuple(str(f) for f in d["flags"]))


def this_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuIdentity:
    """The identity of the CPU this process runs on (Linux: /proc/cpuinfo; elsewhere platform's names)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("unknown CPU", platform.processor()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuIdentity(model, platform.machine(), tuple(f for f in ISA_FLAGS if f in flags))


def export_identity(manifest: Manifest) -> str:
    """A digest of the graphs a plan was measured on (their build fingerprints): another export, another plan."""
    h = hashlib.sha256(manifest.version.encode())
    for name in sorted(manifest.graphs):
        h.update(f"{name}={manifest.graphs[name].fingerprint};".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Choice:
    """How one graph runs: `backend` ort-cpu | ov-cpu, `precision` fp32 | bf16 (ov-cpu) | int8w (ort-cpu, the
    weight-only int8 form)."""

    backend: str
    precision: str

    def __post_init__(self) -> None:
        if (self.backend, self.precision) not in CANDIDATES:
            raise ContractError(f"CPU plan: {self.backend} {self.precision} is not a candidate "
                                f"({', '.join(f'{b} {p}' for b, p in CANDIDATES)})")

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass
class GraphPlan:
    """One graph's choice, what every candidate measured (median ms on the recorded feeds, keyed by label),
    the gate verdict of its bf16 candidate (None when not gated) and why the choice is what it is."""

    choice: Choice
    timings_ms: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    reason: str = ""
    form: dict[str, Any] | None = None      # the int8w file: {"file", "sha256", "external_data", "made_from", ...}
    call_ms: dict[str, list[float]] = field(default_factory=dict)   # per recorded call (prompt, codes, ...)

    def entry(self, entry: "GraphEntry") -> "GraphEntry":
        """The manifest entry of the file this choice runs (int8w: the plan's form of the graph)."""
        if self.choice.precision != "int8w":
            return entry
        assert self.form is not None
        return dataclasses.replace(entry, file=str(self.form["file"]), sha256=str(self.form["sha256"]),
                                   external_data=dict(self.form.get("external_data", {})), forms={},
                                   form_kind="int8w")


@dataclass
class CpuPlan:
    cpu: CpuIdentity
    export: str                             # export_identity of the manifest
    graphs: dict[str, GraphPlan]
    threads: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)      # the whole plan's end-to-end effect
    created: str = ""                       # when the plan was made (local time)
    measured_s: float | None = None         # how long making it took (timing + gates)

    def choice(self, graph: str) -> Choice:
        plan = self.graphs.get(graph)
        return plan.choice if plan is not None else Choice("ort-cpu", "fp32")

    @property
    def backends(self) -> set[str]:
        return {g.choice.backend for g in self.graphs.values()}

    def to_json(self) -> dict[str, Any]:
        return plain_json({
            "format": PLAN_FORMAT, "format_version": PLAN_VERSION, "created": self.created,
            "measured_s": self.measured_s, "cpu": self.cpu.to_json(), "export": self.export, "threads": self.threads,
            "versions": self.versions, "gates": self.gates,
            "graphs": {g: {"backend": p.choice.backend, "precision": p.choice.precision,
                           "timings_ms": p.timings_ms, "call_ms": p.call_ms, "gate": p.gate, "reason": p.reason,
                           "form": p.form}
                       for g, p in self.graphs.items()}})

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CpuPlan":
        if d.get("format") != PLAN_FORMAT or d.get("format_version") != PLAN_VERSION:
            raise ContractError(f"not a CPU plan of format {PLAN_FORMAT} v{PLAN_VERSION} "
                                f"(format {d.get('format')!r} v{d.get('format_version')!r})")
        graphs = {g: GraphPlan(Choice(str(p["backend"]), str(p["precision"])),
                               {k: float(v) for k, v in p.get("timings_ms", {}).items()}, p.get("gate"),
                               str(p.get("reason", "")), p.get("form"),
                               {k: [float(x) for x in v] for k, v in p.get("call_ms", {}).items()})
                  for g, p in d["graphs"].items()}
        return cls(CpuIdentity.from_json(d["cpu"]), str(d["export"]), graphs, d.get("threads"),
                   dict(d.get("versions", {})), dict(d.get("gates", {})), str(d.get("created", "")),
                   None if d.get("measured_s") is None else float(d["measured_s"]))


def plan_path(root: str | Path) -> Path:
    return Path(root) / PLAN_FILE


def write_plan(root: str | Path, plan: CpuPlan) -> Path:
    """Write `cpu_plan.json` atomically (a reader never sees half a plan)."""
    path = plan_path(root)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cpu_plan.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(plan.to_json(), f, indent=2)
    os.replace(tmp, path)
    return path


def read_plan(root: str | Path, manifest: Manifest, cpu: CpuIdentity | None = None) -> CpuPlan:
    """The plan of export `root`, checked against this CPU and this export.

    InputError when there is none (it says how to make one); EngineMismatchError naming both sides when it
    was measured on another CPU or another export; ContractError when it is not a plan or names graphs the
    export does not have."""
    path = plan_path(root)
    if not path.is_file():
        raise InputError(f"{root}: no CPU plan ({PLAN_FILE}); measure one on this machine with "
                         f"python -m benchmarks.cpu_plan --engines {root} (or run --backend ort-cpu / ov-cpu)")
    try:
        plan = CpuPlan.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ContractError(f"{path}: not a readable CPU plan ({err}); re-measure it with "
                            f"python -m benchmarks.cpu_plan --engines {root}") from err
    here = cpu or this_cpu()
    if plan.cpu != here:
        raise EngineMismatchError(f"{path} was measured on another CPU: {plan.cpu.describe()}; this machine is "
                                  f"{here.describe()}. Re-measure with python -m benchmarks.cpu_plan --engines "
                                  f"{root}, or run ONNX Runtime float32 (--backend ort-cpu, or --cpu-plan-fallback)")
    export = export_identity(manifest)
    if plan.export != export:
        raise EngineMismatchError(f"{path} was measured on another export (graphs {plan.export[:12]}...), this "
                                  f"directory's graphs are {export[:12]}... (rebuilt since?). Re-measure with "
                                  f"python -m benchmarks.cpu_plan --engines {root}, or run ONNX Runtime float32 "
                                  f"(--backend ort-cpu, or --cpu-plan-fallback)")
    unknown = sorted(set(plan.graphs) - set(manifest.graphs))
    if unknown:
        raise ContractError(f"{path} names graph(s) {unknown} this export does not have")
    for name, g in plan.graphs.items():
        if g.choice.precision != "int8w":
            continue
        form = g.form or {}
        if form.get("made_from") != manifest.graphs[name].sha256:
            raise EngineMismatchError(f"{path}: the weight-only int8 form of {name} was made from another float32 "
                                      f"graph; re-measure with python -m benchmarks.cpu_plan --engines {root}")
        if not (Path(root) / str(form.get("file", ""))).is_file():
            raise CheckpointError(f"{path}: the weight-only int8 form of {name} ({form.get('file')}) is missing; "
                                  f"re-measure with python -m benchmarks.cpu_plan --engines {root}")
    return plan
