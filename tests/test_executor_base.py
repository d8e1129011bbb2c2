"""runtime/executors/base.py: BaseExecutor checks a feed only when its binding key changes and backends
implement only `_run` — on the ONNX Runtime executor and on a minimal backend over the tiny manifest."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ContractError
from runtime.executors import OrtExecutor
from runtime.executors import base as base_module
from runtime.executors.base import BaseExecutor, binding_key, value_key
from runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


@pytest.fixture
def counted_checks(monkeypatch):
    """Counts the real check_feed calls BaseExecutor makes."""
    calls = []
    real = base_module.check_feed

    def counting(entry, feed, names=None):
        calls.append(entry.name)
        return real(entry, feed, names)
    monkeypatch.setattr(base_module, "check_feed", counting)
    return calls


def _features(t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, t, 64)).astype(np.float32)


def test_the_key_is_where_and_what_shape_never_the_contents() -> None:
    a = np.zeros((2, 3), np.float32)
    before = value_key(a)
    a[...] = 7
    assert value_key(a) == before                                     # contents are not part of the key
    assert value_key(a.copy()) != before                              # another address
    assert value_key(a.reshape(3, 2)) != before                       # same address, another shape
    assert value_key(a[:, :2]) != value_key(a[:, :2].copy())
    assert value_key(a.view(np.int32)) != before                      # another dtype
    assert binding_key({"x": a, "y": a}, {}) == binding_key({"y": a, "x": a}, {})
    assert binding_key({"x": a}, {}) != binding_key({"x": a}, {"out": a})


def test_ort_feeds_are_checked_only_when_the_binding_key_changes(tiny_export, manifest, counted_checks) -> None:
    executor = OrtExecutor(manifest.graph("semantic_codec"), tiny_export[0])
    features = _features(12)
    first = executor.run({"features": features})["quantized"]
    again = executor.run({"features": features})["quantized"]
    assert counted_checks == ["semantic_codec"]                      # same arrays: checked once
    np.testing.assert_array_equal(again, first)
    features[...] = _features(12, seed=1)                             # new contents, same array: no check,
    changed = executor.run({"features": features})["quantized"]       # but the run sees the new values
    assert len(counted_checks) == 1 and not np.array_equal(changed, first)
    executor.run({"features": _features(12)})                         # a new array: checked again
    executor.run({"features": _features(20)})                         # a new shape: checked again
    assert len(counted_checks) == 3
    buf = {"quantized": np.empty((1, 20, 64), np.float32)}
    executor.run({"features": _features(20)}, outputs=buf)
    assert len(counted_checks) == 4                                   # output targets are part of the key


def test_a_failed_check_is_not_remembered(tiny_export, manifest, counted_checks) -> None:
    executor = OrtExecutor(manifest.graph("semantic_codec"), tiny_export[0])
    good = _features(12)
    executor.run({"features": good})
    bad = good.astype(np.float64)
    for _ in range(2):                                                # refused every time, never cached
        with pytest.raises(ContractError, match="dtype float64"):
            executor.run({"features": bad})
    executor.run({"features": good})                                  # the good key was forgotten too
    assert len(counted_checks) == 4
    with pytest.raises(ContractError, match="must be a numpy array"):
        executor.run({"features": good}, outputs={"quantized": [0.0]})


class EchoExecutor(BaseExecutor):
    """A backend with only `_run`: returns the sizes it was handed."""

    backend = "echo"

    def __init__(self, entry) -> None:
        super().__init__()
        self.name, self.entry, self.runs = entry.name, entry, []

    def _run(self, feed, outputs, checked):
        self.runs.append(dict(checked))
        return {"sizes": checked}


def test_a_backend_implements_only_run(manifest, counted_checks) -> None:
    executor = EchoExecutor(manifest.graph("length_regulator"))
    feed = {"s": np.zeros((2, 5, 64), np.float32), "ylens": np.array([3, 4], np.int64)}
    for _ in range(3):
        executor.run(feed)
    assert executor.runs == [{"batch": 2, "seq_len": 5}] * 3 and executor.checks == 1 and len(counted_checks) == 1
    with pytest.raises(ContractError, match="another input has batch = 2"):
        executor.run({**feed, "ylens": np.array([3], np.int64)})
    assert len(executor.runs) == 3                                    # _run never saw the bad feed
    with pytest.raises(ContractError, match="missing from the feed"):
        executor.run({"s": feed["s"]})
