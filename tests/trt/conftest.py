"""Fixtures of the TensorRT-side tests: the fake cudart, the tiny manifest, fake engines over it."""

from __future__ import annotations

import pytest

from runtime.manifest import read_manifest
from runtime.trt import cuda, gpu
from tests.trt.fakes import RTX3090, TRT_VERSION, FakeCudart, FakeTrt, _write_plan


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    return fake


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


@pytest.fixture
def fake_engines(manifest, tiny_export, tmp_path, monkeypatch, fake_cuda):
    """An export directory with fake plans for every graph (the ONNX files are the tiny export's)."""
    import shutil

    root = tmp_path / "out"
    shutil.copytree(tiny_export[0], root)
    for entry in manifest.graphs.values():
        _write_plan(root, entry, "fp16", RTX3090, TRT_VERSION)
    monkeypatch.setattr(gpu, "gpu_info", lambda device=0: RTX3090)
    return root, FakeTrt(manifest, root, fake_cuda)


