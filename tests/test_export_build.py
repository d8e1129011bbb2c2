"""The export stage's machinery: model dims, dummy inputs, the manifest, `export.build` and `export.verify`.

Two layers of tests:
- a toy graph (its own contract and wrapper, injected into build/verify) exercises the machinery in
  seconds: reuse, --graphs subsets, fingerprints, CLI errors, a parity mismatch;
- the real registry on the tiny demo checkpoint: every registered graph is exported ONCE per session
  (`built` fixture, a few minutes on 2 cores), then checked against its contract, verified against its
  eager wrapper, and re-built to prove that nothing is re-exported.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import build as build_mod
from export.build import GRAPH_ROLES, BuildOptions, build
from export.dims import axis_limits, checkpoint_contracts, model_dims
from export.dummy import DEFAULT_SIZES, axis_sizes, feed_for
from export.graph_checks import io_problems
from export.layout import CheckpointLayout
from export.verify import format_table, verify
from export.wrappers.base import WrapperSpec
from runtime.contracts import (CONTRACT_VERSION, DYNAMIC_AXES, AxisRange, GraphContract, ModelDims,
                               build_contracts, f32, i64)
from runtime.errors import CheckpointError, ContractError
from runtime.manifest import (FORMAT_VERSION, CheckpointFile, CheckpointIdentity, Manifest, graph_entry,
                              read_manifest, write_manifest)


TINY_DIMS = dict(sem_dim=64, model_dim=64, content_dim=48, vocab=258, layers=2, heads=4, head_dim=16,
                 style_dim=192, n_latents=32, mel_bins=80, feat_dim=160, fbank_bins=80,
                 text_vocab=512, max_text_tokens=120, max_mel_tokens=250)


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("qwen*", "examples", "*.wav"))
    return dst


# ---------------------------------------------------------------------------------------------------
# A toy graph


def toy_contract(name: str = "toy") -> GraphContract:
    return GraphContract(
        name, (f32("x", "batch", "seq_len", "sem_dim"), i64("lens", "batch")),
        (f32("y", "batch", "seq_len", "sem_dim"), i64("idx", "batch", "seq_len")),
        {"batch": AxisRange(1, 1, 4), "seq_len": AxisRange(1, 10, 64)})


class ToyGraph(nn.Module):
    """A masked projection and an integer output (argmax, no ties on random inputs)."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        valid = (torch.arange(x.shape[1])[None] < lens[:, None]).to(x.dtype)
        return h * valid[..., None], h.argmax(-1)


def toy_feed(contract, dims, sizes, rng):
    b, t = sizes["batch"], sizes["seq_len"]
    lens = rng.integers(1, t + 1, b).astype(np.int64)
    lens[0] = t
    return {"x": rng.standard_normal((b, t, dims.sem_dim)).astype(np.float32), "lens": lens}


def toy_spec(seeds=None) -> WrapperSpec:
    seeds = seeds or itertools.repeat(0)
    return WrapperSpec(build=lambda m: ToyGraph(m.layout.config.semantic_codec.hidden_size, next(seeds)),
                       feed=toy_feed, export_sizes={"batch": 2, "seq_len": 5})


def toys(*names: str):
    """(wrappers, contracts_for) for toy graphs called `names`."""
    wrappers = {n: toy_spec() for n in names}
    return wrappers, (lambda dims, cfg, version="2.0": {n: toy_contract(n) for n in names})


class Counter:
    """Wraps a function and counts calls."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def count_exports(monkeypatch) -> tuple[Counter, Counter]:
    from export.eager import EagerModels

    exports = Counter(build_mod._export_graph)
    loads = Counter(EagerModels.load)
    monkeypatch.setattr(build_mod, "_export_graph", exports)
    monkeypatch.setattr(EagerModels, "load", loads)
    return exports, loads


# ---------------------------------------------------------------------------------------------------
# dims


def test_model_dims_of_the_tiny_demo(tiny_ckpt):
    dims = model_dims(CheckpointLayout.open(tiny_ckpt))
    assert dims == ModelDims(**TINY_DIMS)


def test_checkpoint_ranges_are_clipped_to_the_position_tables(tiny_ckpt):
    layout = CheckpointLayout.open(tiny_ckpt)
    assert axis_limits(layout.config) == {"text_len": 120, "code_len": 250}
    contracts = checkpoint_contracts(model_dims(layout), layout.config)
    assert contracts["gpt_prefill"].ranges["text_len"] == AxisRange(1, 40, 120)
    assert contracts["gpt_latent"].ranges["code_len"] == AxisRange(1, 250, 250)
    assert contracts["dit_step"].ranges == build_contracts()["dit_step"].ranges   # no limit: unchanged


def test_model_dims_name_every_disagreement(tiny_ckpt, tmp_path):
    ckpt = _copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    text = (ckpt / "config.yaml").read_text()
    text = text.replace("  style_encoder:\n    dim: 192", "  style_encoder:\n    dim: 100")
    text = text.replace("    content_dim: 48", "    content_dim: 40")
    (ckpt / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError) as err:
        model_dims(CheckpointLayout.open(ckpt))
    assert "s2mel.style_encoder.dim = 100" in str(err.value)
    assert "s2mel.DiT.content_dim = 40" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# dummy inputs


def test_axis_sizes_at_each_point():
    c = toy_contract()
    assert axis_sizes(c, "min") == {"batch": 1, "seq_len": 1}
    assert axis_sizes(c, "opt", batch=3) == {"batch": 3, "seq_len": 10}
    assert axis_sizes(c, "max") == {"batch": 4, "seq_len": 64}
    assert axis_sizes(c, "trace", spec=toy_spec()) == {"batch": 2, "seq_len": 5}
    assert axis_sizes(c, {"seq_len": 7}) == {"batch": 1, "seq_len": 7}
    long = GraphContract("long", c.inputs, c.outputs, {"batch": AxisRange(1, 1, 4), "seq_len": AxisRange(1, 10, 10**6)})
    assert axis_sizes(long, "max")["seq_len"] == DEFAULT_SIZES["seq_len"].cpu_max


def test_feed_for_makes_contract_shaped_inputs():
    dims = ModelDims(**TINY_DIMS)
    feed = feed_for(toy_contract(), toy_spec(), dims, "max", batch=2, rng=1)
    assert feed["x"].shape == (2, 64, 64) and feed["x"].dtype == np.float32
    assert feed["lens"].shape == (2,) and feed["lens"].dtype == np.int64


def test_feed_for_refuses_what_it_cannot_honour():
    dims, c = ModelDims(**TINY_DIMS), toy_contract()
    with pytest.raises(ContractError, match="no WrapperSpec"):
        feed_for(c, None, dims, "opt")
    no_range = GraphContract("toy", c.inputs, c.outputs, {"batch": AxisRange(1, 1, 4)})
    with pytest.raises(ContractError, match="'seq_len' has no range"):
        feed_for(no_range, toy_spec(), dims, "opt")
    with pytest.raises(ContractError, match="outside its range"):
        feed_for(c, toy_spec(), dims, {"seq_len": 65})
    bad = WrapperSpec(build=toy_spec().build, feed=lambda *a: {"x": np.zeros((1, 10, 64), np.float64)})
    with pytest.raises(ContractError) as err:
        feed_for(c, bad, dims, "opt")
    assert "x: dtype float64" in str(err.value) and "missing inputs ['lens']" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# manifest


def _manifest(tmp_path: Path) -> Manifest:
    dims = ModelDims(**TINY_DIMS)
    contract = build_contracts(dims)["gpt_prefill"]
    (tmp_path / "onnx").mkdir(exist_ok=True)
    (tmp_path / "onnx" / "gpt_prefill.onnx").write_bytes(b"x")
    entry = graph_entry(contract, dims, file="onnx/gpt_prefill.onnx", sha256="ab", opset=18, exporter="dynamo",
                        fingerprint="cd", lint="passed")
    identity = CheckpointIdentity("/ckpt", "ef", {"gpt.pth": CheckpointFile("01", 10, 20)})
    return Manifest(identity, dims, "fp16", {"gpt_prefill": entry}, {"torch": "2.13.0"})


def test_manifest_round_trip(tmp_path):
    manifest = _manifest(tmp_path)
    write_manifest(manifest, tmp_path)
    back = read_manifest(tmp_path)
    assert back == manifest
    entry = back.graph("gpt_prefill")
    assert entry.outputs[1].shape == (2, 2, "batch", 4, "prefill_len", 16)       # static dims resolved
    assert entry.profile_shapes()["text_ids"] == ((1, 1), (1, 40), (4, 600))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["sampling"] == {"do_sample": True, "num_beams": 3, "top_k": 30, "top_p": 0.8, "temperature": 0.8,
                                "repetition_penalty": 10.0, "length_penalty": 0.0, "max_mel_tokens": 1500}
    assert data["synthesis"] == {"sample_rate": 22050, "hop_length": 256, "euler_steps": 25, "cfg_rate": 0.7}
    assert data["kv_cache"]["input_template"] == "kv_cache.{layer}"


def test_manifest_forms_and_their_notes_round_trip(tmp_path):
    """An int8 form that is the fp16 graph (INT8 refused) says so in `graph_form` (for the engine builder)
    and why in `note`; both are written only when set, so a manifest written before them reads the same."""
    import dataclasses

    from runtime.manifest import GraphForm

    manifest = _manifest(tmp_path)
    fp16 = GraphForm("fp16", "onnx/gpt_prefill.onnx", "ab", "ab", "pp", counts={"fp16_nodes": 3})
    int8 = dataclasses.replace(fp16, kind="int8", note="fp16 form (no INT8): refused by the INT8 gate: mel SNR 9 dB",
                               graph_form="fp16-mixed")
    entry = dataclasses.replace(manifest.graph("gpt_prefill"), forms={"fp16": fp16, "int8": int8})
    manifest = dataclasses.replace(manifest, graphs={"gpt_prefill": entry})
    write_manifest(manifest, tmp_path)
    assert read_manifest(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    forms = data["graphs"]["gpt_prefill"]["forms"]
    assert "note" not in forms["fp16"] and forms["int8"]["note"].startswith("fp16 form (no INT8)")
    assert "graph_form" not in forms["fp16"] and forms["int8"]["graph_form"] == "fp16-mixed"
    assert "graph_form" not in data["graphs"]["gpt_prefill"]                   # the view attribute is not written
    view = read_manifest(tmp_path).graph("gpt_prefill").form("int8")
    assert (view.file, view.form_kind, view.graph_form) == ("onnx/gpt_prefill.onnx", "int8", "fp16-mixed")
    assert read_manifest(tmp_path).graph("gpt_prefill").form("fp16").graph_form == ""


@pytest.mark.parametrize("key, value, match", [
    ("format_version", FORMAT_VERSION + 1, "format version"),
    ("contract_version", CONTRACT_VERSION + 1, "contract version"),
    ("format", "something-else", "not an IndexTTS2 engines manifest"),
])
def test_manifest_of_another_version_is_refused(tmp_path, key, value, match):
    path = write_manifest(_manifest(tmp_path), tmp_path)
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match=match):
        read_manifest(tmp_path)


def test_manifest_missing_pieces_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="manifest not found"):
        read_manifest(tmp_path)
    path = write_manifest(_manifest(tmp_path), tmp_path)
    (tmp_path / "onnx" / "gpt_prefill.onnx").unlink()
    with pytest.raises(CheckpointError, match="onnx/gpt_prefill.onnx is missing"):
        read_manifest(tmp_path)
    data = json.loads(path.read_text())
    del data["graphs"]["gpt_prefill"]["sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="malformed manifest"):
        read_manifest(tmp_path, check_files=False)
    with pytest.raises(ContractError, match="not in the manifest"):
        _manifest(tmp_path).graph("bigvgan")


# ---------------------------------------------------------------------------------------------------
# engines seam


def test_engines_probe_never_crashes():
    import engines

    ok, reason = engines.available()
    assert isinstance(ok, bool) and reason
    if importlib.util.find_spec("tensorrt") is None:
        assert (ok, reason) == (False, "tensorrt is not installed")


# ---------------------------------------------------------------------------------------------------
# build + verify on the toy graph


def test_toy_build_checks_records_and_reuses(tiny_ckpt, tmp_path, monkeypatch):
    wrappers, contracts_for = toys("toy")
    out = tmp_path / "out"
    report = build(BuildOptions(tiny_ckpt, out, "fp32"), wrappers, contracts_for)
    assert report.exported == ["toy"] and not report.failed
    (skipped,) = report.engines.outcomes                   # no TensorRT here: typed, with the probe's reason
    assert (skipped.graph, skipped.status, skipped.plan) == ("toy", "skipped", None) and skipped.reason
    assert not report.engines_failed and report.engines.summary() == f"engines skipped: {skipped.reason}"
    manifest = read_manifest(out, check_hashes=True)
    entry = manifest.graph("toy")
    assert manifest.precision == "fp32" and entry.lint.startswith(("passed", "unavailable"))
    assert entry.inputs[0].shape == ("batch", "seq_len", 64)
    model = onnx.load(str(out / entry.file))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["indextts2.graph"] == "toy" and props["indextts2.contract_version"] == str(CONTRACT_VERSION)
    assert io_problems(model, toy_contract(), manifest.dims) == []
    rows = verify(out, wrappers=wrappers, contracts_for=contracts_for)
    assert rows and all(rows), format_table(rows)
    assert {r.shape.split()[0] for r in rows} == {"min", "opt", "max"} and {r.output for r in rows} == {"y", "idx"}

    _check_external_data_form(out / entry.file, tmp_path / "external", manifest.dims)

    exports, loads = count_exports(monkeypatch)
    again = build(BuildOptions(tiny_ckpt, out, "fp32", lint=False), wrappers, contracts_for)
    assert (exports.calls, loads.calls) == (0, 0) and again.reused == ["toy"]
    build(BuildOptions(tiny_ckpt, out, "fp32", force=True, lint=False), wrappers, contracts_for)
    assert exports.calls == 1


def _check_external_data_form(path: Path, folder: Path, dims: ModelDims) -> None:
    """A graph saved with external data (as graphs over 2 GB are) goes through the same checks."""
    from export.graph_checks import check_model, external_data_files, stamp_metadata
    from export.onnx_export import run_onnx

    folder.mkdir()
    target = folder / path.name
    onnx.save(onnx.load(str(path)), str(target), save_as_external_data=True, size_threshold=1024,
              location=f"{path.name}.data")       # the weights external, small constants inline
    stamp_metadata(target, {"indextts2.note": "external"})
    check_model(target, toy_contract(), dims)
    assert external_data_files(target) == [f"{path.name}.data"]
    feed = feed_for(toy_contract(), toy_spec(), dims, "opt", rng=3)
    assert np.array_equal(run_onnx(target, feed)["y"], run_onnx(path, feed)["y"])


def test_toy_graph_subsets_and_carry_over(tiny_ckpt, tmp_path, monkeypatch):
    wrappers, contracts_for = toys("toy_a", "toy_b")
    out = tmp_path / "out"
    exports, _ = count_exports(monkeypatch)
    report = build(BuildOptions(tiny_ckpt, out, graphs=("toy_a",), lint=False), wrappers, contracts_for)
    assert report.exported == ["toy_a"] and list(report.manifest.graphs) == ["toy_a"]
    report = build(BuildOptions(tiny_ckpt, out, lint=False), wrappers, contracts_for)
    assert (report.reused, report.exported, exports.calls) == (["toy_a"], ["toy_b"], 2)
    report = build(BuildOptions(tiny_ckpt, out, graphs=("toy_b",), lint=False), wrappers, contracts_for)
    assert list(report.manifest.graphs) == ["toy_a", "toy_b"] and exports.calls == 2   # toy_a carried over


def test_a_changed_checkpoint_file_is_re_exported(tiny_ckpt, tmp_path, monkeypatch):
    ckpt = _copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    wrappers, contracts_for = toys("toy")
    out = tmp_path / "out"
    build(BuildOptions(ckpt, out, lint=False), wrappers, contracts_for)
    exports, _ = count_exports(monkeypatch)
    cfg = ckpt / "hf_cache" / "bigvgan" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")                 # the toy depends on every checkpoint file
    build(BuildOptions(ckpt, out, lint=False), wrappers, contracts_for)
    assert exports.calls == 1


def test_toy_legacy_exporter(tiny_ckpt, tmp_path):
    contracts_for = toys("toy")[1]
    spec = WrapperSpec(build=toy_spec().build, feed=toy_feed, exporter="legacy")
    out = tmp_path / "out"
    report = build(BuildOptions(tiny_ckpt, out, lint=False), {"toy": spec}, contracts_for)
    assert report.exported == ["toy"] and report.manifest.graph("toy").exporter == "legacy"
    rows = verify(out, wrappers={"toy": spec}, contracts_for=contracts_for)
    assert rows and all(rows), format_table(rows)


def test_verify_reports_a_mismatch(tiny_ckpt, tmp_path, monkeypatch):
    contracts_for = toys("toy")[1]
    out = tmp_path / "out"
    build(BuildOptions(tiny_ckpt, out, lint=False), {"toy": toy_spec()}, contracts_for)
    drifting = {"toy": toy_spec(itertools.count(1))}       # the eager weights now differ from the export's
    rows = verify(out, wrappers=drifting, contracts_for=contracts_for)
    assert rows and not any(r for r in rows if r.output == "y")
    assert "FAIL" in format_table(rows)
    from export import verify as verify_mod
    import export.wrappers

    monkeypatch.setattr(export.wrappers, "all_wrappers", lambda version="2.0": {"toy": toy_spec(itertools.count(1))})
    monkeypatch.setattr(verify_mod, "checkpoint_contracts", contracts_for)
    assert verify_mod.main([str(out)]) == 1


# ---------------------------------------------------------------------------------------------------
# CLI errors


def test_bad_checkpoint_directory_is_a_clear_error(tmp_path, capsys):
    assert build_mod.main(["--checkpoints", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint directory not found" in err and "Traceback" not in err
    ckpt = tmp_path / "half"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("gpt:\n  model_dim: 64\n")
    assert build_mod.main(["--checkpoints", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    for problem in ("no 's2mel' section", "gpt.pth", "s2mel.pth", "bigvgan: not found"):
        assert problem in err
    assert "Traceback" not in err


def test_unwritable_out_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert build_mod.main(["--checkpoints", str(tiny_ckpt), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write there" in err and "Traceback" not in err


def test_unknown_graph_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    assert build_mod.main(["--checkpoints", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--graphs", "nope"]) == 2
    assert "unknown graph(s) ['nope']" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Coverage: every contract has what the export stage needs


def test_every_contract_has_a_wrapper_feed_rule_ranges_and_sizes():
    from export.wrappers import all_wrappers

    wrappers = all_wrappers()
    assert set(DEFAULT_SIZES) == set(DYNAMIC_AXES)
    dims = ModelDims()
    problems = []
    for name, contract in build_contracts(dims).items():
        spec = wrappers.get(name)
        if spec is None:
            problems.append(f"{name}: no WrapperSpec")
            continue
        if not callable(spec.feed) or not callable(spec.build):
            problems.append(f"{name}: no feed rule / build")
        problems += [f"{name}: no range for {a}" for a in contract.axes() if a not in contract.ranges]
        if name not in GRAPH_ROLES:
            problems.append(f"{name}: not in export.build.GRAPH_ROLES")
        for point in ("min", "trace"):
            try:
                feed_for(contract, spec, dims, point)
            except ContractError as err:
                problems.append(str(err))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------
# The real graphs on the tiny demo (exported once per session)


@pytest.fixture(scope="session")
def built(tiny_export):
    return tiny_export


def test_build_writes_every_registered_graph(built, tiny_ckpt):
    from export.wrappers import all_wrappers

    out, report = built
    manifest = read_manifest(out, check_hashes=True)
    assert set(manifest.graphs) == set(all_wrappers()) == set(report.exported)
    assert manifest.dims == ModelDims(**TINY_DIMS) and manifest.precision == "fp16"
    assert manifest.gpt.max_text_tokens == 120 and manifest.gpt.stop_mel_token == 257
    assert all(e.opset >= 18 for e in manifest.graphs.values())
    assets = manifest.assets
    assert assets.bpe is not None and assets.emotion_matrices is not None and assets.emo_num == (3, 17, 2, 8, 4, 5, 10, 24)
    assert (out / assets.bpe.file).read_bytes() == (tiny_ckpt / "bpe.model").read_bytes()
    assert Path(assets.emotion_llm) == (tiny_ckpt / "qwen0.6bemo4-merge").resolve()
    with np.load(out / assets.emotion_matrices.file) as data:
        np.testing.assert_array_equal(data["feat2"], torch.load(tiny_ckpt / "feat2.pt", weights_only=True).numpy())


def test_graph_io_equals_the_contracts(built, tiny_ckpt):
    out, _ = built
    manifest = read_manifest(out)
    layout = CheckpointLayout.open(tiny_ckpt)
    contracts = checkpoint_contracts(manifest.dims, layout.config)
    for name, entry in manifest.graphs.items():
        model = onnx.load(str(out / entry.file), load_external_data=False)
        assert io_problems(model, contracts[name], manifest.dims) == [], name
        props = {p.key: p.value for p in model.metadata_props}
        assert props["indextts2.graph"] == name and props["indextts2.fingerprint"] == entry.fingerprint


def test_graph_nodes_are_named_by_module_path(built):
    """TensorRT layer names come from the ONNX node names; the precision policy matches module paths."""
    out, _ = built
    manifest = read_manifest(out)
    model = onnx.load(str(out / manifest.graph("bigvgan").file), load_external_data=False)
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names)
    snake = [n for n in names if n.startswith("bigvgan.resblocks.0.activations.") and ".act/" in n]
    assert snake and any(n.endswith("/Sin") for n in snake)
    regulator = onnx.load(str(out / manifest.graph("length_regulator").file), load_external_data=False)
    assert any(n.name.endswith("/Floor") and n.name.startswith("regulator/") for n in regulator.graph.node)


def test_verify_passes_every_graph(built, capsys):
    from export.verify import main

    out, _ = built
    code = main([str(out)])
    table = capsys.readouterr().out
    assert code == 0, table
    assert "FAIL" not in table


def test_rebuild_with_nothing_changed_does_no_export_work(built, tiny_ckpt, monkeypatch):
    out, first = built
    exports, loads = count_exports(monkeypatch)
    report = build(BuildOptions(tiny_ckpt, out, "fp16"))
    assert (exports.calls, loads.calls) == (0, 0)
    assert report.reused == list(first.manifest.graphs) and not report.exported
