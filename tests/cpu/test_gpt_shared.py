"""The GPT graphs in one ONNX Runtime session (export/gpt_shared.py, runtime/executors/gpt_session.py): the
weights stored once, every branch computing exactly what its own graph computes, and a stale or foreign file
never used."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import EngineMismatchError
from runtime.executors import GraphSet, OrtExecutor
from runtime.executors.gpt_session import SharedGptSession, shared_gpt_usable
from runtime.manifest import MANIFEST_NAME, read_manifest
from runtime.synthesizer import Synthesizer

from .helpers import fixed_length_synthesis

GPT = ("gpt_decode", "gpt_prefill", "gpt_latent")


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export[0])


def _feeds(manifest) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    d = manifest.dims
    spk = rng.standard_normal((1, d.n_latents, d.model_dim)).astype(np.float32)
    emo = rng.standard_normal((1, d.model_dim)).astype(np.float32)
    text = rng.integers(2, 50, (1, 9)).astype(np.int64)
    cache = 8
    decode = {"mel_ids": np.array([[5], [7]], np.int64), "mel_pos": np.array([[3], [3]], np.int64),
              "kv_mask": np.ones((2, cache), np.float32)}
    for i in range(d.layers):
        decode[f"kv_cache.{i}"] = rng.standard_normal((2, 2, d.heads, cache, d.head_dim)).astype(np.float32)
    return {"gpt_prefill": {"spk_latent": spk, "emovec": emo, "text_ids": text},
            "gpt_latent": {"spk_latent": spk, "emovec": emo, "text_ids": text,
                           "codes": rng.integers(0, 200, (1, 6)).astype(np.int64)},
            "gpt_decode": decode}


def test_the_export_records_one_shared_file(tiny_export, manifest) -> None:
    shared = manifest.shared_gpt
    assert shared is not None and shared.branches == GPT and shared.current(manifest.graphs)
    assert shared.path(tiny_export[0]).is_file() and shared.shared_bytes > 0
    assert shared_gpt_usable(manifest, tiny_export[0])


def test_weights_are_stored_once_and_every_branch_is_one_scope_down(tiny_export, manifest) -> None:
    """Each shared weight is one top-level initializer, no branch holds a copy, and no If is nested (ONNX Runtime
    pre-packs outer-scope weights only one scope down)."""
    import onnx

    model = onnx.load(str(manifest.shared_gpt.path(tiny_export[0])))
    top = {t.name: t for t in model.graph.initializer}
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == len(GPT)
    per_graph = {g: {t.name for t in onnx.load(str(manifest.graph(g).path(tiny_export[0]))).graph.initializer}
                 for g in GPT}
    shared = set.intersection(*per_graph.values())
    assert shared and shared <= set(top)                       # under their own names, once
    for node in ifs:
        for attr in node.attribute:
            body = attr.g
            assert not body.initializer
            assert not [n for n in body.node if n.op_type in ("If", "Loop", "Scan")]
    stored = sum(t.ByteSize() for t in top.values())
    separate = sum(sum(t.ByteSize() for t in onnx.load(str(manifest.graph(g).path(tiny_export[0]))).graph.initializer)
                   for g in GPT)
    assert stored < separate - manifest.shared_gpt.shared_bytes     # at least one copy fewer


def test_every_branch_computes_exactly_its_graph(tiny_export, manifest) -> None:
    graphs = GraphSet(manifest, tiny_export[0], "ort-cpu")
    feeds = _feeds(manifest)
    sessions = {id(graphs[g].session) for g in GPT}
    assert len(sessions) == 1 and graphs["gpt_decode"]._prefix == "gpt_decode/"
    assert graphs["dit_step"]._prefix == ""                    # every other graph keeps its own session
    for g in GPT:
        alone = OrtExecutor(manifest.graph(g), tiny_export[0]).run(feeds[g])
        together = graphs[g].run(feeds[g])
        assert set(together) == set(alone)
        for k in alone:
            np.testing.assert_array_equal(together[k], alone[k], err_msg=f"{g}.{k}")
    out = {"logits": np.empty((2, manifest.dims.vocab), np.float32)}
    assert graphs["gpt_decode"].run(feeds["gpt_decode"], outputs=out)["logits"] is out["logits"]
    graphs.close()


def test_other_precisions_keep_one_session_per_graph(tiny_export, manifest) -> None:
    graphs = GraphSet(manifest, tiny_export[0], "ort-cpu", precision="fp16")
    assert graphs["gpt_decode"]._prefix == "" and graphs["gpt_decode"].entry.form_kind == "fp16"


def _copy_with_manifest(tiny_export, tmp_path, edit) -> Path:
    root = Path(shutil.copytree(tiny_export[0], tmp_path / "engines"))
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    return root


def test_a_stale_shared_file_is_not_used(tiny_export, tmp_path, caplog) -> None:
    root = _copy_with_manifest(tiny_export, tmp_path,
                               lambda d: d["shared_gpt"]["made_from"].update(gpt_decode="0" * 64))
    manifest = read_manifest(root)
    with caplog.at_level(logging.WARNING, logger="runtime.executors.gpt_session"):
        graphs = GraphSet(manifest, root, "ort-cpu")
    assert "made from other GPT graphs" in caplog.text
    assert graphs["gpt_decode"]._prefix == ""


def test_a_foreign_shared_file_is_refused(tiny_export, tmp_path) -> None:
    root = _copy_with_manifest(tiny_export, tmp_path, lambda d: d["shared_gpt"].update(fingerprint="f" * 64))
    with pytest.raises(EngineMismatchError, match="shared GPT graph: .* was not made from the GPT graphs"):
        SharedGptSession(read_manifest(root), root)


def test_a_branch_of_another_build_is_refused(tiny_export, tmp_path) -> None:
    """The manifest entry says another build made gpt_decode: its branch is refused as its own file would be."""
    root = _copy_with_manifest(tiny_export, tmp_path,
                               lambda d: d["graphs"]["gpt_decode"].update(fingerprint="0" * 64))
    graphs = GraphSet(read_manifest(root), root, "ort-cpu")
    with pytest.raises(EngineMismatchError, match="'gpt_decode': its branch of .* was not produced by the build"):
        graphs["gpt_decode"]
    assert graphs["gpt_prefill"]._prefix == "gpt_prefill/"


def test_synthesis_is_identical_with_and_without_the_shared_session(tiny_export, tmp_path, tiny_ckpt) -> None:
    root = _copy_with_manifest(tiny_export, tmp_path, lambda d: d.pop("shared_gpt"))
    speaker = tiny_ckpt / "examples" / "speaker.wav"
    with Synthesizer(tiny_export[0], "ort-cpu") as shared, Synthesizer(root, "ort-cpu") as separate:
        assert shared.graphs["gpt_prefill"]._prefix and not separate.graphs["gpt_prefill"]._prefix
        a = fixed_length_synthesis(shared, speaker)
        b = fixed_length_synthesis(separate, speaker)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_the_25_export_shares_prefill_and_decode(tiny25_export) -> None:
    manifest = read_manifest(tiny25_export[0])
    assert manifest.shared_gpt is not None and manifest.shared_gpt.branches == ("gpt_decode", "gpt_prefill")
    assert dataclasses.replace(manifest.shared_gpt).current(manifest.graphs)
