"""No module of the toolkit uses an API TensorRT 11 removed (tests/trt/removed_api.py: the weak-typing builder
flags and per-layer precision, the INT8 calibrators and their config calls, the engine/context calls replaced
by _v2 forms, ...), nor the builder's implicit-INT8 seam that went with them.

The scan reads the syntax tree (ast), not the text, so comments, docstrings and messages that name an API
for the reader do not count, and `self.precision = precision` is not `layer.precision = trt.float32`.

PENDING_REWRITE lists the files that still use removed APIs because another change rewrites them (the
explicit-quantization / mixed-precision graph work): each must still be flagged (an emptied or stale entry
fails too), so the list can only shrink, to nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.trt.removed_api import (
    REMOVED_BUILDER_FLAGS,
    REMOVED_NAMES,
    REMOVED_SEAM,
    REMOVED_SETTERS,
    REMOVED_TACTIC_SOURCES,
    SEAM_KEYWORDS,
)

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("runtime", "engines", "export", "calibration", "benchmarks")
#: Rewritten by the explicit-quantization work (INT8 as Q/DQ graphs; fp16 islands as Casts in the graph).
PENDING_REWRITE: frozenset[str] = frozenset()     # calibration/int8*.py: rewritten as Q/DQ forms
TRT_MODULE_NAMES = frozenset({"trt", "tensorrt"})
SEAM_CALLEES = frozenset({"build_all", "BuildSettings"})


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


def _dotted(node: ast.AST) -> str:
    """'trt.BuilderFlag.FP16' for an attribute chain ('' parts for anything else)."""
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _mentions_tensorrt(node: ast.AST) -> bool:
    """Whether an expression uses the tensorrt module (trt.float32, tensorrt.DataType.HALF, ...)."""
    return any(isinstance(n, ast.Attribute) and _dotted(n).split(".")[0] in TRT_MODULE_NAMES
               for n in ast.walk(node))


class _Scanner(ast.NodeVisitor):
    def __init__(self, file: str) -> None:
        self.file, self.found = file, []

    def _add(self, node: ast.AST, what: str) -> None:
        self.found.append(Finding(self.file, getattr(node, "lineno", 0), what))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = _dotted(node.value).rsplit(".", 1)[-1]
        if node.attr in REMOVED_NAMES:
            self._add(node, f".{node.attr}: removed in TensorRT 11 (use {REMOVED_NAMES[node.attr]})")
        elif node.attr in REMOVED_BUILDER_FLAGS and owner == "BuilderFlag":
            self._add(node, f"BuilderFlag.{node.attr}: removed in TensorRT 11 (use {REMOVED_BUILDER_FLAGS[node.attr]})")
        elif node.attr in REMOVED_TACTIC_SOURCES and owner == "TacticSource":
            self._add(node, f"TacticSource.{node.attr}: removed in TensorRT 11")
        elif node.attr in REMOVED_SEAM:
            self._add(node, f".{node.attr}: {REMOVED_SEAM[node.attr]}")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in REMOVED_SEAM:
            self._add(node, f"{node.id}: {REMOVED_SEAM[node.id]}")
        elif node.id in REMOVED_NAMES and node.id[:1].isupper():      # an imported class / enum (IInt8Calibrator)
            self._add(node, f"{node.id}: removed in TensorRT 11 (use {REMOVED_NAMES[node.id]})")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if any(part in REMOVED_SEAM for part in (node.module or "").split(".")):
            self._add(node, f"import from {node.module}: {REMOVED_SEAM['calibration_hook']}")
        for alias in node.names:
            if alias.name in REMOVED_SEAM or alias.name in REMOVED_NAMES:
                why = REMOVED_SEAM.get(alias.name) or f"removed in TensorRT 11 (use {REMOVED_NAMES[alias.name]})"
                self._add(node, f"import {alias.name}: {why}")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name in REMOVED_SEAM:
            self._add(node, f"def {node.name}: {REMOVED_SEAM[node.name]}")
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Constant(self, node: ast.Constant) -> None:
        # a removed name reached by string (getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"), a flag list)
        if isinstance(node.value, str) and node.value in REMOVED_NAMES:
            self._add(node, f"'{node.value}' (by name): removed in TensorRT 11 (use {REMOVED_NAMES[node.value]})")

    def visit_Call(self, node: ast.Call) -> None:
        callee = _dotted(node.func).rsplit(".", 1)[-1]
        if callee == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            name = node.args[1].value
            if name in REMOVED_BUILDER_FLAGS and _dotted(node.args[0]).endswith("BuilderFlag"):
                self._add(node, f"getattr(BuilderFlag, '{name}'): removed in TensorRT 11")
        if callee == "setattr" and len(node.args) == 3 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value in REMOVED_SETTERS and _mentions_tensorrt(node.args[2]):
            self._add(node, f"setattr(..., '{node.args[1].value}', ...): {REMOVED_SETTERS[node.args[1].value]}")
        if callee in SEAM_CALLEES:
            for kw in node.keywords:
                if kw.arg in SEAM_KEYWORDS:
                    self._add(node, f"{callee}({kw.arg}=...): the builder takes no calibrator (INT8 is an "
                                    "int8-qdq graph)")
        self.generic_visit(node)

    def _assigned(self, targets: list[ast.AST], value: ast.AST | None) -> None:
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr in REMOVED_SETTERS and value is not None \
                    and _mentions_tensorrt(value):
                self._add(target, f".{target.attr} = {ast.unparse(value)}: {REMOVED_SETTERS[target.attr]}")

    def visit_Assign(self, node: ast.Assign) -> None:
        self._assigned(node.targets, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._assigned([node.target], node.value)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._assigned([node.target], node.value)
        self.generic_visit(node)


def _strip_docstrings(tree: ast.AST) -> None:
    """Docstrings explain APIs to the reader; they are not uses."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body[0] = ast.Pass()


def scan_source(source: str, file: str = "<source>") -> list[Finding]:
    tree = ast.parse(source, filename=file)
    _strip_docstrings(tree)
    scanner = _Scanner(file)
    scanner.visit(tree)
    return sorted(set(scanner.found), key=lambda f: (f.file, f.line, f.what))


def scan_repository() -> list[Finding]:
    found: list[Finding] = []
    for package in SCANNED:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found += scan_source(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix())
    return found


@pytest.fixture(scope="module")
def findings() -> list[Finding]:
    return scan_repository()


def test_no_module_uses_an_api_tensorrt_11_removed(findings):
    unexpected = [f for f in findings if f.file not in PENDING_REWRITE]
    assert not unexpected, ("APIs TensorRT 11 removed (strong typing, explicit quantization and the _v2 calls "
                            "replace them; engines/TENSORRT_API.md):\n" + "\n".join(map(str, unexpected)))


def test_the_pending_rewrites_are_still_pending(findings):
    """Each PENDING_REWRITE file exists and still uses a removed API: once rewritten, take it off the list."""
    flagged = {f.file for f in findings}
    missing = sorted(f for f in PENDING_REWRITE if not (REPO / f).is_file())
    done = sorted(f for f in PENDING_REWRITE if f not in flagged and f not in missing)
    assert not missing, f"PENDING_REWRITE names files that do not exist: {missing}; remove them from the list"
    assert not done, f"{done} no longer use removed TensorRT APIs: remove them from PENDING_REWRITE"


@pytest.mark.parametrize("source", [
    "config.set_flag(trt.BuilderFlag.FP16)",
    "config.set_flag(tensorrt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)",
    "flag = getattr(trt.BuilderFlag, 'INT8')",
    "names = ('OBEY_PRECISION_CONSTRAINTS',)",
    "layer.precision = trt.float32",
    "network.get_layer(i).precision = trt.DataType.HALF",
    "tensor.dtype = trt.float16",
    "setattr(layer, 'precision', trt.float32)",
    "layer.set_output_type(0, trt.float32)",
    "config.int8_calibrator = calibrator",
    "config.set_calibration_profile(profile)",
    "class C(trt.IInt8EntropyCalibrator2): pass",
    "from tensorrt import IInt8MinMaxCalibrator",
    "size = engine.device_memory_size",
    "ctx = engine.create_execution_context_without_device_memory()",
    "ok = parser.supports_model(data)",
    "from engines.calibration_hook import CalibratorFactory",
    "engines.build_all(m, out, 'int8', calibrator=factory)",
    "factory = calibrator_factory(calib)",
    "config.clear_flag(trt.TacticSource.CUBLAS)",
])
def test_the_scan_finds_removed_uses(source):
    assert scan_source(source), source


@pytest.mark.parametrize("source", [
    '"""Docstring: config.set_flag(trt.BuilderFlag.FP16); layer.precision = trt.float32."""',
    "# config.int8_calibrator = calibrator",
    "self.precision = precision",
    "manifest.precision == 'fp16'",
    "config.clear_flag(trt.BuilderFlag.TF32)",
    "flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)",
    "size = engine.get_device_memory_size_for_profile_v2(0)",
    "size = engine.device_memory_size_v2",
    "dtype = np.dtype('float16'); x.dtype = np.float16",
    "names = ['FP16', 'INT8']",
    "raise BackendError(f'no {name}: OBEY_PRECISION_CONSTRAINTS is gone')",
    "config.set_preview_feature(trt.PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10, True)",
])
def test_the_scan_ignores_what_is_not_a_removed_use(source):
    assert scan_source(source) == [], source
