"""Layering (DESIGN.md §1): imports point down only. `runtime/` is the ground floor and torch-free; `engines/`
may import `runtime/`; `export/` may import both; `calibration/` and `benchmarks/` sit on top.

The check is a static scan of every module's source (ast), so it sees what a run of the test suite would
not: imports at module level, inside functions and methods, under `try` / `if` (TYPE_CHECKING included),
and `importlib.import_module("...")` / `__import__("...")` with a literal name. Relative imports are
resolved to absolute names. The scanner itself is tested on synthetic sources below, so a forbidden lazy
import demonstrably fails this test.

One allowance: `transformers` in the runtime, only in runtime/emotion/llm.py — the optional emotion LLM
(Qwen3), the one runtime module that needs the transformers stack, loaded only when emotion-from-text is
used. Our code there never imports torch itself (transformers does, inside its own package).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("runtime", "engines", "export", "calibration", "benchmarks", "serve")
TORCH = ("torch", "torchaudio", "torchvision")

#: package -> top-level names its modules must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "runtime": (*TORCH, "transformers", "export", "engines", "calibration", "benchmarks", "serve"),
    "engines": ("export", "calibration", "benchmarks", "serve"),
    "export": ("calibration", "benchmarks", "serve"),
    # the service sits on the runtime alone: no torch in a server process, no export or calibration code
    "serve": (*TORCH, "transformers", "export", "calibration", "benchmarks"),
}
#: (module, top-level name) pairs allowed despite FORBIDDEN, with the reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("runtime.emotion.llm", "transformers"): "the optional emotion LLM, loaded only for emotion-from-text",
}


@dataclass(frozen=True)
class ImportRef:
    """One import found in a module: the absolute module name, its line, and whether it runs lazily
    (inside a function or method) rather than at import time."""

    name: str
    line: int
    lazy: bool

    @property
    def top(self) -> str:
        return self.name.split(".")[0]


def resolve(name: str | None, level: int, module: str, is_package: bool) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package (level {level})")
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal_import_call(node: ast.Call) -> str | None:
    """The literal module name of `importlib.import_module("x")`, `import_module("x")` or `__import__("x")`."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_in(source: str, module: str, is_package: bool = False) -> list[ImportRef]:
    """Every import `source` (the text of `module`) can execute, with relative names made absolute."""
    found: list[ImportRef] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(ImportRef(a.name, node.lineno, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.module, node.level, module, is_package)
            if node.module is None:                          # from . import a, b: a and b are modules
                found.extend(ImportRef(f"{base}.{a.name}", node.lineno, lazy) for a in node.names)
            else:
                found.append(ImportRef(base, node.lineno, lazy))
        elif isinstance(node, ast.Call):
            name = _literal_import_call(node)
            if name is not None:
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    name = resolve(name.lstrip(".") or None, level, module, is_package)
                found.append(ImportRef(name, node.lineno, lazy))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package's __init__) of a file under REPO."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """One line per import of `module` that its package's layer forbids."""
    forbidden = FORBIDDEN.get(module.split(".")[0], ())
    out = []
    for ref in imports_in(source, module, is_package):
        if ref.top in forbidden and (module, ref.top) not in ALLOWED:
            out.append(f"{module}:{ref.line}: imports {ref.name}{' (lazily)' if ref.lazy else ''}")
    return out


def package_files() -> list[Path]:
    return sorted(p for pkg in SCANNED for p in (REPO / pkg).rglob("*.py"))


# ---------------------------------------------------------------------------------------------------
# The scanner on synthetic sources


def test_resolve_relative_imports():
    assert resolve("builder", 1, "engines.precision", False) == "engines.builder"
    assert resolve("builder", 1, "engines", True) == "engines.builder"
    assert resolve("errors", 2, "runtime.emotion.llm", False) == "runtime.errors"
    assert resolve(None, 1, "export.build", False) == "export"
    assert resolve("export.build", 0, "runtime.cli", False) == "export.build"
    with pytest.raises(ValueError, match="beyond the top-level package"):
        resolve("x", 3, "runtime.cli", False)


SYNTHETIC = '''
import numpy as np
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from export.config import IndexTTS2Config
try:
    import torch
except ImportError:
    torch = None

def load():
    from ..export import build
    import importlib
    return importlib.import_module("calibration.int8"), __import__("benchmarks")

class Runner:
    def run(self):
        from .. import engines
        from . import sampling
        return engines
'''


def test_scanner_sees_every_kind_of_import():
    refs = imports_in(SYNTHETIC, "runtime.gpt.generate")
    got = {(r.name, r.lazy) for r in refs}
    assert got == {("numpy", False), ("typing", False), ("export.config", False), ("torch", False),
                   ("runtime.export", True), ("importlib", True), ("calibration.int8", True),
                   ("benchmarks", True), ("runtime.engines", True), ("runtime.gpt.sampling", True)}


def test_a_forbidden_lazy_import_is_caught():
    source = "import numpy\n\ndef helper():\n    if True:\n        import torch.nn\n    return 1\n"
    assert violations(source, "runtime.cfm") == ["runtime.cfm:5: imports torch.nn (lazily)"]
    lazy_module = "def f():\n    import importlib\n    return importlib.import_module('export.build')\n"
    assert violations(lazy_module, "engines.builder") == ["engines.builder:3: imports export.build (lazily)"]
    relative = "def f():\n    from ..export import build\n"
    assert violations(relative, "runtime.emotion.llm") == []            # resolves to runtime.export: allowed
    assert violations("from .. import engines\n", "runtime.trt.gpu") == []     # runtime.engines
    assert violations("from ..calibration import int8\n", "export.wrappers", True) == []   # export.calibration
    assert violations("from calibration import int8\n", "export.build") == ["export.build:1: imports calibration"]


def test_the_one_allowance_is_the_emotion_llm():
    source = "def load():\n    from transformers import AutoTokenizer\n"
    assert violations(source, "runtime.emotion.llm") == []
    assert violations(source, "runtime.synthesizer") == ["runtime.synthesizer:2: imports transformers (lazily)"]
    assert violations("def f():\n    import torch\n", "runtime.emotion.llm") == [
        "runtime.emotion.llm:2: imports torch (lazily)"]


def test_upper_layers_may_import_anything_below():
    source = "import torch\nfrom export.build import build\nfrom engines import build_all\n"
    assert violations(source, "calibration.cli") == [] and violations(source, "benchmarks.stages") == []


# ---------------------------------------------------------------------------------------------------
# The packages


def test_every_package_is_scanned():
    files = package_files()
    for pkg in SCANNED:
        assert any(module_name(p)[0].startswith(pkg + ".") or module_name(p)[0] == pkg for p in files), pkg
    assert len(files) > 50


def test_imports_point_down_only():
    found = []
    for path in package_files():
        module, is_package = module_name(path)
        found += violations(path.read_text(encoding="utf-8"), module, is_package)
    assert not found, "layering violations (DESIGN.md §1):\n  " + "\n  ".join(found)
