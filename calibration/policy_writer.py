"""The precision policy a calibration run writes: the base rules plus one measured rule per forced layer.

Output is the engines' own format (engines/precision.py, `precision_policy.json`), so
`python -m export.build ... --precision-policy CALIB/precision_policy.json` (or `build_all(policy_path=...)`)
uses it unchanged, and its sha256 enters every fp16 plan's cache key. Measured rules name exact ONNX
nodes (= TensorRT layer names) and carry the finding in `why`, e.g.
`calibration (overflow): max |activation| 7.1e+04 over the calibration feeds: within 4x of fp16's 65504`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from engines.precision import POLICY_FILE_NAME, PrecisionPolicy

from .fp16_analysis import GraphAnalysis, measured_rules


def calibrated_policy(base: PrecisionPolicy | None, analyses: Sequence[GraphAnalysis]) -> PrecisionPolicy:
    graphs = {g: tuple(rules) for g, rules in (base.graphs.items() if base is not None else ())}
    for a in analyses:
        rules = measured_rules(a)
        if rules:
            graphs[a.graph] = tuple(graphs.get(a.graph, ())) + tuple(rules)
    return PrecisionPolicy(graphs, source="calibration")


def write_policy(policy: PrecisionPolicy, out_dir: Path) -> Path:
    """Write `out_dir/precision_policy.json` atomically (one rule per line, readable in a diff)."""
    data = policy.to_json()
    lines = ["{", f'  "version": {data["version"]},', '  "graphs": {']
    graph_items = list(data["graphs"].items())
    for gi, (graph, rules) in enumerate(graph_items):
        lines.append(f"    {json.dumps(graph)}: [")
        for ri, rule in enumerate(rules):
            lines.append("      " + json.dumps(rule, ensure_ascii=False) + ("," if ri < len(rules) - 1 else ""))
        lines.append("    ]" + ("," if gi < len(graph_items) - 1 else ""))
    lines += ["  }", "}", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / POLICY_FILE_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    PrecisionPolicy.from_file(tmp)                       # what we wrote must read back
    os.replace(tmp, path)
    return path
