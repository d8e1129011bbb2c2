"""The generic fixture runner: comparison rule, unsupported kinds, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from export.fixtures.__main__ import main
from export.fixtures.runner import compare, run_fixture


def test_compare_rule() -> None:
    want = np.array([1.0, -2.0, -np.inf], dtype=np.float32)
    ok, max_abs, _, _ = compare(want + np.float32(1e-6), want, False, 1e-5, 1e-5)
    assert ok and max_abs < 2e-6
    assert not compare(want + np.float32(1e-3), want, False, 1e-5, 1e-5)[0]
    assert not compare(np.array([1.0, -2.0, np.inf], np.float32), want, False, 1, 1)[0]  # inf sign
    assert not compare(np.array([1.0, np.nan, -np.inf], np.float32), want, False, 1, 1)[0]  # NaN
    assert not compare(want.astype(np.float64), want, False, 1, 1)[0]  # dtype
    assert not compare(want[:2], want, False, 1, 1)[0]  # shape
    ints = np.array([1, 2, 3], np.int64)
    assert compare(ints.copy(), ints, True, 0, 0)[0]
    assert not compare(ints + 1, ints, True, 0, 0)[0]
    assert compare(["a", "b"], ["a", "b"], True, 0, 0)[0]
    assert not compare("x", "y", True, 0, 0)[0]


def _toy_fixture(root: Path, kind: str, out_value: float) -> Path:
    d = root / "toy"
    d.mkdir(parents=True)
    save_file({"c.in.x": np.ones(3, np.float32), "c.out.y": np.full(3, out_value, np.float32)},
              str(d / "io.safetensors"))
    manifest = {"fixture": "toy", "weights": None, "config": None, "io": "io.safetensors",
                "calls": [{"call": "c", "kind": kind, "inputs": {"x": "c.in.x"}, "scalars": {},
                           "outputs": {"y": "c.out.y"}, "tolerance": {"atol": 1e-5, "rtol": 1e-5}}]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_runner_reports_pass_fail_unsupported(tmp_path: Path) -> None:
    d = _toy_fixture(tmp_path, "double", 2.0)
    handlers = {"double": lambda fx, call: {"y": call.inputs["x"] * 2}}
    assert [r.status for r in run_fixture(d, handlers)] == ["pass"]
    handlers = {"double": lambda fx, call: {"y": call.inputs["x"] * 3}}
    assert [r.status for r in run_fixture(d, handlers)] == ["FAIL"]
    assert [r.status for r in run_fixture(d, {})] == ["unsupported"]
    assert [r.status for r in run_fixture(d, {"double": lambda fx, call: {}})] == ["FAIL"]

    def boom(fx, call):
        raise ValueError("broken")
    rows = list(run_fixture(d, {"double": boom}))
    assert rows[0].status == "error" and "broken" in rows[0].detail


def test_cli_exit_codes(tmp_path: Path, capsys) -> None:
    _toy_fixture(tmp_path, "no_such_kind", 1.0)
    assert main([str(tmp_path)]) == 0  # unsupported only: listed, not a failure
    out = capsys.readouterr().out
    assert "unsupported kinds: no_such_kind" in out and "0 passed, 0 failed" in out
    assert main([str(tmp_path / "nothing_here")]) == 2
