"""The extras in pyproject.toml: only `cpu` and the GPU extras bring an ONNX Runtime build, so a GPU machine can
install `.[gpu,test]` without the CPU `onnxruntime` overwriting `onnxruntime-gpu` (both install the `onnxruntime`
module folder). Checked on the declared extras and, for the packages installed here, on their own requirements.
Each GPU extra (`gpu-cu12`, `gpu-cu13`; `gpu` = `gpu-cu12`) is the TensorRT 10.12-11.x, cuda-python and
onnxruntime-gpu builds of one CUDA major."""

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


#: The CUDA major of each GPU extra, and versions its pins must admit / refuse (TensorRT 10.12 to 11.x; the
#: onnxruntime-gpu builds of that CUDA major: up to 1.26 CUDA 12, from 1.27 CUDA 13).
GPU_EXTRAS = {
    "gpu-cu12": {"tensorrt-cu12": (["10.12.0.36", "10.16.1.11", "11.4.0.106"], ["10.11.0.33", "12.0.0"]),
                 "cuda-python": (["12.0.0", "12.9.5"], ["11.8.7", "13.0.0"]),
                 "onnxruntime-gpu": (["1.19.0", "1.26.0"], ["1.18.1", "1.27.0", "1.31.1"])},
    "gpu-cu13": {"tensorrt-cu13": (["10.13.2.6", "11.4.0.106"], ["10.11.0.33", "12.0.0"]),
                 "cuda-python": (["13.0.0", "13.4.4"], ["12.9.5", "14.0.0"]),
                 "onnxruntime-gpu": (["1.27.0", "1.31.1"], ["1.26.0"])},
}


@pytest.mark.parametrize("extra", sorted(GPU_EXTRAS))
def test_each_gpu_extra_is_one_cuda_major(extra) -> None:
    from packaging.requirements import Requirement

    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    reqs = {_name(r): Requirement(r) for r in extras[extra]}
    assert set(reqs) == set(GPU_EXTRAS[extra]), f"extra '{extra}': {sorted(reqs)}"
    for name, (admitted, refused) in GPU_EXTRAS[extra].items():
        spec = reqs[name].specifier
        assert all(spec.contains(v) for v in admitted), f"{extra}: {name}{spec} refuses one of {admitted}"
        assert not any(spec.contains(v) for v in refused), f"{extra}: {name}{spec} admits one of {refused}"


def test_gpu_is_one_of_the_cuda_extras_and_the_install_hints_agree() -> None:
    """`gpu` is an alias of exactly one CUDA extra, and runtime/trt/gpu.py's pip commands (shown when TensorRT
    is missing, too old or the driver too old) pin what the extras pin."""
    from runtime.trt import gpu

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["gpu"] == [f"{project['name']}[gpu-cu12]"]
    for major in (12, 13):
        pins = {_name(r): r for r in extras[f"gpu-cu{major}"]}
        assert f"'{pins[f'tensorrt-cu{major}']}'" in gpu.CUDA_BUILDS[major]
        assert f"'{pins['cuda-python']}'" in gpu.CUDA_BUILDS[major]
