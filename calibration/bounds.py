"""The fp16 error bounds a calibration records, and the check of a shipped fp16 graph against them.

Why: the analysis measures, per graph output, how far the fp16 form made with the calibrated policy lands
from float32 on the calibration feeds (fp16_analysis.py, final round). That measurement is the bound a
shipped fp16 graph is held to — on other inputs too, so the check allows a margin: a float output may
deviate by up to `FACTOR` times the recorded worst relative error plus one fp16 rounding step (`FLOOR`,
2^-11 of the output's range), an integer output (codes, indices) may agree on `INT_SLACK` fewer values.
Written to `CALIB/fp16_bounds.json` next to `precision_policy.json`; the committed full-size one is
`calibration/fp16_bounds.json`.

The check runs the fp16 form as calibration's emulation derived from that file (fp16_emulation.emulate_form:
ONNX Runtime's CPU provider would compute its fp16 nodes in float32, hiding the activation rounding).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.errors import InputError

BOUNDS_NAME = "fp16_bounds.json"
FACTOR = 2.0
FLOOR = 2.0 ** -11
INT_SLACK = 0.005


@dataclass(frozen=True)
class OutputBound:
    """What the calibration measured for one output: worst relative error (float) or agreement (int)."""

    kind: str                      # "float" or "int"
    rel_err: float = 0.0
    agreement: float = 1.0

    def limit(self) -> float:
        """The largest relative error (float) or the smallest agreement (int) a check accepts."""
        if self.kind == "float":
            return FACTOR * self.rel_err + FLOOR
        return max(0.0, self.agreement - INT_SLACK)


def bounds_record(analyses: Sequence[Any], policy_sha256: str) -> dict[str, Any]:
    """The JSON record of the final (calibrated) round of each graph's analysis."""
    graphs = {}
    for a in analyses:
        graphs[a.graph] = {o.name: asdict(OutputBound(o.kind, float(o.rel_err), float(o.agreement)))
                           for o in a.final.outputs}
    return {"policy_sha256": policy_sha256, "factor": FACTOR, "floor": FLOOR, "int_slack": INT_SLACK,
            "feeds": {a.graph: a.feeds for a in analyses}, "graphs": graphs}


def write_bounds(record: Mapping[str, Any], calib: Path) -> Path:
    path = Path(calib) / BOUNDS_NAME
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def read_bounds(path: str | Path) -> dict[str, dict[str, OutputBound]]:
    """graph -> output -> OutputBound; a clear InputError for a missing or malformed file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {g: {o: OutputBound(**b) for o, b in outs.items()} for g, outs in data["graphs"].items()}
    except FileNotFoundError as err:
        raise InputError(f"{path}: fp16 bounds not found; run python -m calibration analyze first") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not an fp16 bounds file ({type(err).__name__}: {err})") from err


def deviation(ref: np.ndarray, test: np.ndarray) -> tuple[str, float]:
    """("float", max |test - ref| / max |ref|; inf for a non-finite value) or ("int", share of equal values)."""
    if np.issubdtype(ref.dtype, np.floating):
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        if not np.all(np.isfinite(test)):
            return "float", math.inf
        err = float(np.abs(test.astype(np.float64) - ref).max()) if ref.size else 0.0
        return "float", err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return "int", float(np.mean(ref == test)) if ref.size else 1.0


def problems(graph: str, bounds: Mapping[str, OutputBound], ref: Mapping[str, np.ndarray],
             test: Mapping[str, np.ndarray]) -> list[str]:
    """Outputs of `graph` outside their bound, one message each (empty: within every bound)."""
    out = []
    for name, bound in bounds.items():
        kind, value = deviation(ref[name], test[name])
        if kind == "float" and value > bound.limit():
            out.append(f"{graph}.{name}: relative error {value:.3g} > bound {bound.limit():.3g} "
                       f"(calibration measured {bound.rel_err:.3g})")
        elif kind == "int" and value < bound.limit():
            out.append(f"{graph}.{name}: agreement {value:.4f} < bound {bound.limit():.4f} "
                       f"(calibration measured {bound.agreement:.4f})")
    return out
