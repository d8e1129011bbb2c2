"""The extras in pyproject.toml: only `cpu` and `gpu` bring an ONNX Runtime build, so a GPU machine can install
`.[gpu,test]` without the CPU `onnxruntime` overwriting `onnxruntime-gpu` (both install the `onnxruntime` module
folder). Checked on the declared extras and, for the packages installed here, on their own requirements."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
ORT_FREE_EXTRAS = ("test", "export", "text", "bench")


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _expanded(extra: str, extras: dict[str, list[str]], project: str) -> set[str]:
    """The requirement names of one extra, with its references to the project's own extras followed."""
    names: set[str] = set()
    for req in extras[extra]:
        name = _name(req)
        if name == project:
            inner = re.search(r"\[([^\]]*)\]", req)
            for sub in (inner.group(1).split(",") if inner else []):
                names |= _expanded(sub.strip(), extras, project)
        else:
            names.add(name)
    return names


def _installed_closure(names: set[str]) -> set[str]:
    """`names` and everything their installed distributions require (markers for extras not followed)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_only_the_backend_extras_bring_onnx_runtime() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert "onnxruntime" in _expanded("cpu", extras, project["name"])
    assert "onnxruntime-gpu" in _expanded("gpu", extras, project["name"])
    for extra in ORT_FREE_EXTRAS:
        declared = _expanded(extra, extras, project["name"])
        pulled = {n for n in _installed_closure(declared) if n.startswith("onnxruntime")}
        assert not pulled, f"extra '{extra}' pulls {sorted(pulled)}"
