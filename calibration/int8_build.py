"""`python -m calibration int8`: INT8 TensorRT plans for an export, built where calibration lives.

INT8 needs calibration data, and calibration sits above export and engines (DESIGN.md §1), so the INT8
build is driven from here rather than from `export.build` (which refuses `--precision int8` and names
this command). The steps:

1. check the inputs: the export's manifest, the calibration directory (collected for this export's sizes),
   TensorRT and a GPU (engines.available());
2. `engines.build_all(..., "int8", calibrator=calibrator_factory(CALIB))`: one plan per graph with the
   entropy calibrator fed by the collected feeds (calibration/int8.py); graphs without feeds or refused
   by an earlier gate are built fp16 under their int8 plan name (`notes["int8"] = false`);
3. the INT8 gate (calibration/gate.py) over the plans that hold INT8 layers: each judged alone against
   float32; refused plans are moved aside and recorded in CALIB/int8_gate.json;
4. the refused graphs rebuilt at once (the factory now returns None for them: fp16 with the policy's fp32
   islands), so every graph has a runnable int8 plan when the command ends.

The manifest is left as export wrote it; run the INT8 plans with `--engine-precision int8`.
`judge` (the gate's measurement), `trt`, `gpu` and `cuda` are injectable so the flow runs on CPU through
fakes (tests/test_calibration.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from engines.outcome import EngineResults
from runtime.errors import BackendError, InputError

from .gate import GateDecision, GateOutcome, Int8Limits, apply_gate, int8_plans, judge_int8_plans

log = logging.getLogger(__name__)

#: (engines_dir, calib, candidates, n_items, progress, limits) -> graph -> decision
Judge = Callable[[Path, Path, Sequence[str], int, Callable[[str], None], Int8Limits], Mapping[str, GateDecision]]


@dataclass(frozen=True)
class Int8Settings:
    items: int = 4                              # calibration items the gate synthesizes per graph
    graphs: tuple[str, ...] | None = None       # None: every graph of the manifest
    policy_path: Path | None = None             # fp32 islands (default: the shipped policy)
    workspace_gib: float = 4.0
    limits: Int8Limits = field(default_factory=Int8Limits)


@dataclass(frozen=True)
class Int8Build:
    """The INT8 build (`engines`), what the gate decided and did (`gate`), and the refused graphs' fp16
    rebuild (`fallback`, None when nothing was refused)."""

    engines: EngineResults
    gate: GateOutcome
    fallback: EngineResults | None = None

    @property
    def ok(self) -> bool:
        """Every graph has a runnable int8 plan (INT8 or its fp16 fallback)."""
        return self.engines.ok and (self.fallback is None or self.fallback.ok)

    def lines(self) -> list[str]:
        out = [self.engines.summary(), *self.gate.lines()]
        if self.fallback is not None:
            out.append(f"refused graphs rebuilt as fp16 (int8 plan name): {self.fallback.summary()}")
        return out


def _check_inputs(engines_dir: Path, calib: Path, graphs: Sequence[str] | None) -> list[str]:
    """The graphs to build, after checking the manifest, the calibration directory and their match."""
    from runtime.manifest import read_manifest

    from .feeds import FeedStore

    manifest = read_manifest(engines_dir)
    store = FeedStore.open(calib)
    if store.meta.get("dims") and store.meta["dims"] != asdict(manifest.dims):
        raise InputError(f"{calib} was collected for a model with other sizes than {engines_dir} (dims differ); "
                         f"collect again for this export (python -m calibration collect --engines {engines_dir})")
    names = list(graphs) if graphs else list(manifest.graphs)
    unknown = [g for g in names if g not in manifest.graphs]
    if unknown:
        raise InputError(f"graphs {unknown} are not in {engines_dir} (it has {', '.join(manifest.graphs)})")
    return names


def _build(engines_dir: Path, calib: Path, names: Sequence[str], settings: Int8Settings,
           trt: Any, gpu: Any, cuda: Any) -> EngineResults:
    """build_all at int8 with a calibrator factory made now (it reads the gate record as it is now)."""
    import engines
    from runtime.manifest import read_manifest

    from .int8 import calibrator_factory

    factory = calibrator_factory(calib, trt=trt, cuda=cuda)
    try:
        return engines.build_all(read_manifest(engines_dir), engines_dir, "int8", settings.policy_path,
                                 settings.workspace_gib, names, factory, trt=trt, gpu=gpu)
    except engines.EngineBuildFailures as err:
        log.error("%s", err)
        return err.results


def build_int8(engines_dir: str | Path, calib: str | Path, settings: Int8Settings = Int8Settings(), *,
               progress: Callable[[str], None] = lambda s: None, judge: Judge | None = None,
               trt: Any = None, gpu: Any = None, cuda: Any = None) -> Int8Build:
    """Build, gate and (for refused graphs) rebuild the int8 plans of the export at `engines_dir`."""
    import engines

    engines_dir, calib = Path(engines_dir), Path(calib)
    names = _check_inputs(engines_dir, calib, settings.graphs)
    if trt is None:
        ok, reason = engines.available()
        if not ok:
            raise BackendError(f"INT8 engines are TensorRT plans: {reason}; run python -m calibration int8 on a "
                               "machine with TensorRT 10 and an NVIDIA GPU")
    progress(f"building int8 plans for {len(names)} graph(s)")
    built = _build(engines_dir, calib, names, settings, trt, gpu, cuda)
    candidates = int8_plans(engines_dir, [o.graph for o in built.outcomes if o.ok])
    progress(f"INT8 gate over {len(candidates)} plan(s) with INT8 layers")
    decisions = (judge or judge_int8_plans)(engines_dir, calib, candidates, settings.items, progress,
                                            settings.limits) if candidates else {}
    gate = apply_gate(engines_dir, calib, decisions, settings.limits)
    fallback = None
    if gate.refused:
        progress(f"rebuilding {len(gate.refused)} refused graph(s) as fp16")
        fallback = _build(engines_dir, calib, gate.refused, settings, trt, gpu, cuda)
    return Int8Build(built, gate, fallback)
