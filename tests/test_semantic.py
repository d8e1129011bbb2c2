"""Semantic family: w2v-BERT 2.0 encoder (hidden_states[17] + stats) and the MaskGCT RepCodec codec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.config import SemanticCodecConfig
from export.models.semantic_codec import load_semantic_codec, write_demo_semantic_codec
from export.models.w2v_bert import (load_semantic_encoder, relative_index, skew_relative,
                                    write_demo_w2v_bert, write_demo_w2v_stats)
from runtime.errors import CheckpointError
from tests.conftest import assert_rows_pass, run_fixture_calls

TINY_CODEC = SemanticCodecConfig(codebook_size=64, hidden_size=32, codebook_dim=8, vocos_dim=24,
                                 vocos_intermediate_dim=48, vocos_num_layers=2)


@pytest.fixture(scope="module")
def w2v_demo(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("w2v")
    gen = torch.Generator().manual_seed(1)
    w2v_dir = write_demo_w2v_bert(root / "w2v-bert-2.0", 32, 18, 2, 64, gen)
    stats = write_demo_w2v_stats(root / "wav2vec2bert_stats.pt", 32, gen)
    return w2v_dir, stats


@pytest.fixture(scope="module")
def codec_demo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codec") / "semantic_codec" / "model.safetensors"
    return write_demo_semantic_codec(path, TINY_CODEC, torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------- fixtures


def test_w2v_bert_fixture(fixtures_root):
    assert_rows_pass(run_fixture_calls(fixtures_root, "w2v_bert"))


def test_semantic_codec_fixture(fixtures_root):
    assert_rows_pass(run_fixture_calls(fixtures_root, "semantic_codec"))


# ---------------------------------------------------------------------------------- w2v-bert


def test_skew_relative_matches_direct_indexing():
    for t in (1, 2, 5, 80):
        idx = relative_index(t, 64, 8, torch.device("cpu"))
        rel = torch.randn(2, 3, t, 2 * t - 1)
        got = skew_relative(rel)
        i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
        want = rel[:, :, i, j - i + t - 1]
        assert torch.equal(got, want)
        d = torch.arange(-(t - 1), t)
        assert torch.equal(idx, d.clamp(-64, 8) + 64)


def test_w2v_demo_round_trip(w2v_demo):
    w2v_dir, stats = w2v_demo
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in w2v_dir.iterdir()}
    keys = load_file(str(w2v_dir / "model.safetensors")).keys()
    assert "encoder.layers.17.final_layer_norm.weight" in keys and "masked_spec_embed" in keys
    model = load_semantic_encoder(w2v_dir, stats)
    assert len(model.encoder.layers) == 17
    x = torch.randn(1, 40, 160)
    with torch.no_grad():
        feat = model(x, torch.ones(1, 40, dtype=torch.int32))
    assert feat.shape == (1, 40, 32) and torch.isfinite(feat).all()
    assert 0.1 < feat.std().item() < 10


def test_w2v_padding_does_not_leak(w2v_demo):
    """Valid frames of a padded row equal the same row run alone (masked keys, zeroed conv input)."""
    model = load_semantic_encoder(*w2v_demo)
    x = torch.randn(2, 30, 160)
    mask = torch.ones(2, 30, dtype=torch.int64)
    mask[1, 21:] = 0
    x[1, 21:] = 1.0
    with torch.no_grad():
        batch = model(x, mask)
        alone = model(x[1:, :21], mask[1:, :21])
    torch.testing.assert_close(batch[1:, :21], alone, atol=1e-5, rtol=1e-5)


def test_w2v_reads_pytorch_model_bin(w2v_demo, tmp_path):
    w2v_dir, stats = w2v_demo
    (tmp_path / "config.json").write_bytes((w2v_dir / "config.json").read_bytes())
    torch.save(load_file(str(w2v_dir / "model.safetensors")), tmp_path / "pytorch_model.bin")
    a, b = load_semantic_encoder(w2v_dir, stats), load_semantic_encoder(tmp_path, stats)
    x = torch.randn(1, 12, 160)
    m = torch.ones(1, 12, dtype=torch.int64)
    with torch.no_grad():
        assert torch.equal(a(x, m), b(x, m))


def _rewrite(w2v_dir: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_bytes((w2v_dir / "config.json").read_bytes())
    state = dict(load_file(str(w2v_dir / "model.safetensors")))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_w2v_missing_key(w2v_demo, tmp_path):
    w2v_dir, stats = w2v_demo
    bad = _rewrite(w2v_dir, tmp_path, lambda s: s.pop("encoder.layers.3.self_attn.linear_q.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys.*encoder\.layers\.3\.self_attn\.linear_q\.weight"):
        load_semantic_encoder(bad, stats)


def test_w2v_wrong_shape_and_unexpected_key(w2v_demo, tmp_path):
    w2v_dir, stats = w2v_demo

    def edit(s):
        s["feature_projection.projection.weight"] = torch.zeros(32, 80)
        s["encoder.layers.2.self_attn.linear_pos.weight"] = torch.zeros(32, 32)

    bad = _rewrite(w2v_dir, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_semantic_encoder(bad, stats)
    assert "feature_projection.projection.weight: checkpoint (32, 80), model (32, 160)" in str(err.value)
    assert "encoder.layers.2.self_attn.linear_pos.weight" in str(err.value)


def test_w2v_truncated_and_missing_files(w2v_demo, tmp_path):
    w2v_dir, stats = w2v_demo
    (tmp_path / "config.json").write_bytes((w2v_dir / "config.json").read_bytes())
    data = (w2v_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_semantic_encoder(tmp_path, stats)
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_semantic_encoder(tmp_path / "nowhere", stats)
    (tmp_path / "stats.pt").write_bytes(stats.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="stats.pt"):
        load_semantic_encoder(w2v_dir, tmp_path / "stats.pt")
    torch.save({"mean": torch.zeros(16), "var": torch.ones(16)}, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="expected \\(32,\\)"):
        load_semantic_encoder(w2v_dir, tmp_path / "small.pt")


# ---------------------------------------------------------------------------------- codec


def test_codec_demo_round_trip(codec_demo):
    keys = load_file(str(codec_demo)).keys()
    assert "decoder.0.embed.weight" in keys and "decoder.1.weight" in keys
    assert "quantizer.quantizers.0.in_project.weight_g" in keys
    assert "quantizer.quantizers.0.out_project.weight_v" in keys
    codec = load_semantic_codec(codec_demo, TINY_CODEC)
    x = torch.randn(2, 25, 32)
    with torch.no_grad():
        codes, quantized = codec.quantize(x)
        emb = codec.vq2emb(codes)
        row1 = codec.vq2emb(codes[1:])
    assert codes.dtype == torch.int64 and codes.shape == (2, 25)
    assert quantized.shape == (2, 25, 32) and torch.isfinite(quantized).all()
    assert 0.01 < quantized.std().item() < 10
    # vq2emb is the same lookup as quantize's output, and correct for every batch row.
    # (conv kernels may pick another summation order per batch size: float noise only)
    torch.testing.assert_close(emb.transpose(1, 2), quantized, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(emb[1:], row1, atol=1e-6, rtol=1e-6)


def _codec_rewrite(src: Path, dst: Path, edit) -> Path:
    state = dict(load_file(str(src)))
    edit(state)
    save_file(state, str(dst))
    return dst


def test_codec_bad_checkpoints(codec_demo, tmp_path):
    bad = _codec_rewrite(codec_demo, tmp_path / "a.safetensors",
                         lambda s: s.pop("encoder.0.convnext.1.gamma"))
    with pytest.raises(CheckpointError, match=r"missing keys.*encoder\.0\.convnext\.1\.gamma"):
        load_semantic_codec(bad, TINY_CODEC)
    bad = _codec_rewrite(codec_demo, tmp_path / "b.safetensors",
                         lambda s: s.update({"quantizer.quantizers.0.codebook.weight": torch.zeros(128, 8)}))
    with pytest.raises(CheckpointError, match=r"codebook\.weight: checkpoint \(128, 8\), model \(64, 8\)"):
        load_semantic_codec(bad, TINY_CODEC)
    bad = _codec_rewrite(codec_demo, tmp_path / "c.safetensors",
                         lambda s: s.pop("quantizer.quantizers.0.in_project.weight_v"))
    with pytest.raises(CheckpointError, match="in_project.weight_g has no matching"):
        load_semantic_codec(bad, TINY_CODEC)
    data = codec_demo.read_bytes()
    (tmp_path / "d.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="d.safetensors.*truncated"):
        load_semantic_codec(tmp_path / "d.safetensors", TINY_CODEC)
    with pytest.raises(CheckpointError, match="not found"):
        load_semantic_codec(tmp_path / "missing.safetensors", TINY_CODEC)
