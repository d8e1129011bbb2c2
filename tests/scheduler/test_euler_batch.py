"""Shared Euler steps: each row's mel is its euler_solve alone, rows joining at different steps, padded to
the longest, with their own step counts and cfg rates; and the exported dit_step computes rows as alone."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backend import open_backend
from runtime.cfm import euler_solve
from runtime.manifest import read_manifest
from runtime.scheduler.euler_batch import EulerBatch, start_row


def _rows(rng, content, specs):
    """specs: (frames, prompt frames, steps, cfg_rate, join at call) -> solve inputs."""
    out = []
    for frames, prompt, steps, cfg, join in specs:
        out.append(dict(cond=rng.standard_normal((1, frames, content)).astype(np.float32),
                        prompt_mel=rng.standard_normal((1, 80, prompt)).astype(np.float32),
                        style=rng.standard_normal((1, 192)).astype(np.float32),
                        noise=rng.standard_normal((1, 80, frames)).astype(np.float32),
                        steps=steps, cfg=cfg, join=join))
    return out


def _run_batched(dit_step, rows, max_rows=4, pad_rows=True):
    batch = EulerBatch(dit_step, max_rows, pad_rows)
    waiting = list(enumerate(rows))
    mels, calls = {}, 0
    while waiting or len(batch):
        while waiting and waiting[0][1]["join"] <= calls and batch.has_room():
            i, r = waiting.pop(0)
            batch.join(i, start_row(r["cond"], r["prompt_mel"], r["style"], r["noise"], r["steps"], r["cfg"]))
        mels.update(batch.step())
        calls += 1
    return mels, batch


class RowwiseStep:
    """A fake dit_step that is row-independent by construction and reads every per-row input."""

    name, backend = "dit_step", "fake"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def run(self, feed, outputs=None):
        self.batches.append(feed["x"].shape[0])
        x, n = feed["x"], feed["x"].shape[2]
        out = np.empty_like(x)
        for b in range(x.shape[0]):
            T, P = int(feed["x_lens"][b]), int(feed["prompt_lens"][b])
            v = np.tanh(x[b, :, :T] * feed["t"][b] + feed["cond"][b, :T, :1].T + feed["prompt_x"][b, :, :T]
                        + feed["style"][b, :80, None]) * (1 + feed["cfg_rate"][0])
            out[b, :, :T] = x[b, :, :T] + feed["dt"][b] * v
            out[b, :, :P] = 0
            out[b, :, T:] = 7.0                                     # garbage past the row: must not matter
        assert out.shape[2] == n
        if outputs:
            outputs["x_next"][...] = out
            return outputs
        return {"x_next": out}


SPECS = [(40, 9, 5, 0.7, 0), (23, 4, 5, 0.7, 0), (31, 0, 3, 0.7, 2), (17, 5, 6, 0.5, 1), (40, 6, 4, 0.7, 4),
         (12, 3, 2, 0.7, 4)]


def test_rows_in_shared_steps_are_their_solves_alone_bookkeeping() -> None:
    rng = np.random.default_rng(0)
    rows = _rows(rng, 4, SPECS)
    step = RowwiseStep()
    mels, batch = _run_batched(step, rows, max_rows=3)
    for i, r in enumerate(rows):
        alone = euler_solve(RowwiseStep(), r["cond"], r["prompt_mel"], r["style"], r["noise"], r["steps"], r["cfg"])
        np.testing.assert_array_equal(mels[i], alone, err_msg=f"row {i}")
    assert max(step.batches) == 3 and batch.calls < sum(r["steps"] for r in rows)
    assert not len(batch)


def test_without_padding_only_equal_lengths_share_a_call() -> None:
    rng = np.random.default_rng(1)
    rows = _rows(rng, 4, [(20, 3, 3, 0.7, 0), (20, 5, 3, 0.7, 0), (25, 3, 3, 0.7, 0)])
    step = RowwiseStep()
    mels, _ = _run_batched(step, rows, pad_rows=False)
    assert sorted(step.batches) == [1, 1, 1, 2, 2, 2]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(mels[i], euler_solve(RowwiseStep(), r["cond"], r["prompt_mel"], r["style"],
                                                           r["noise"], r["steps"], r["cfg"]))


def test_the_exported_dit_step_batches_rows_as_alone(tiny_export) -> None:
    """ONNX Runtime on the tiny export: rows of different lengths, joining at different steps, each equal
    to its solve alone (the graph's rows_alone numerics; before it, a padded row was 0.6 % off)."""
    root = tiny_export[0]
    manifest = read_manifest(root)
    assert manifest.dit_rows_alone
    backend = open_backend(manifest, root, "ort-cpu")
    try:
        dit = backend.graphs["dit_step"]
        rows = _rows(np.random.default_rng(2), manifest.dims.content_dim,
                     [(90, 20, 4, 0.7, 0), (61, 11, 4, 0.7, 1), (37, 8, 3, 0.7, 1), (75, 30, 4, 0.7, 3)])
        mels, batch = _run_batched(dit, rows)
        for i, r in enumerate(rows):
            alone = euler_solve(dit, r["cond"], r["prompt_mel"], r["style"], r["noise"], r["steps"], r["cfg"])
            np.testing.assert_allclose(mels[i], alone, rtol=0, atol=1e-5, err_msg=f"row {i}")
        assert batch.calls < sum(r["steps"] for r in rows)
    finally:
        backend.close()


def test_a_batch_needs_rows() -> None:
    with pytest.raises(ValueError, match="at least 1 row"):
        EulerBatch(RowwiseStep(), 0)
