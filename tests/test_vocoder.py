"""Vocoder and speaker-style family: BigVGAN v2 (+ anti-aliased SnakeBeta) and CAMPPlus.

Golden fixtures through the generic runner, the export-friendly rewrites against straightforward
references of upstream's formulation (transposed-conv up-sampler, avg_pool1d ceil_mode segment pooling),
BatchNorm folding, demo checkpoints read back by the loaders, bad checkpoints, and dynamic-T export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from export.config import BigVGANConfig, CAMPPlusConfig
from export.models.alias_free import (Activation1d, PhaseSeparatedActivation1d, UpSample2x, kaiser_sinc_filter,
                                      phase_separated)
from export.models.bigvgan import GENERATOR_FILE, load_bigvgan, write_demo_bigvgan
from export.models.campplus import (CAMLayer, load_campplus, make_segments, segment_context,
                                    write_demo_campplus)
from runtime.errors import CheckpointError
from tests.conftest import assert_rows_pass, run_fixture_calls

TINY_BIGVGAN = BigVGANConfig(upsample_initial_channel=64)   # real structure, 64 -> 1 channels
TINY_CAMPPLUS = CAMPPlusConfig(growth_rate=8, bn_size=4, init_channels=64)  # the fixture's size


# --- golden fixtures ------------------------------------------------------------------------------

def test_bigvgan_fixture(fixtures_root: Path) -> None:
    assert_rows_pass(run_fixture_calls(fixtures_root, "bigvgan"))


def test_campplus_fixture(fixtures_root: Path) -> None:
    assert_rows_pass(run_fixture_calls(fixtures_root, "campplus"))


# --- anti-aliased activation -----------------------------------------------------------------------

def _reference_up2(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Upstream's formulation: replicate pad 5, 2 * grouped conv_transpose1d stride 2, crop 15 / 15."""
    c = x.shape[1]
    y = 2 * F.conv_transpose1d(F.pad(x, (5, 5), mode="replicate"), filt.expand(c, -1, -1), stride=2, groups=c)
    return y[..., 15:-15]


def _reference_act(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    up = _reference_up2(x, filt)
    a, b = alpha.exp().view(1, -1, 1), beta.exp().view(1, -1, 1)
    act = up + 1.0 / (b + 1e-9) * torch.sin(up * a).pow(2)
    return F.conv1d(F.pad(act, (5, 6), mode="replicate"), filt.expand(c, -1, -1), stride=2, groups=c)


def test_kaiser_filter_equals_checkpoint_buffer(fixtures_root: Path) -> None:
    state = load_file(str(fixtures_root / "bigvgan" / "weights.safetensors"))
    filt = kaiser_sinc_filter()
    assert torch.equal(filt, state["activation_post.upsample.filter"])
    assert torch.equal(filt, state["activation_post.downsample.lowpass.filter"])


@pytest.mark.parametrize("t", [1, 2, 3, 8, 33])
def test_polyphase_upsampler_matches_transposed_conv(t: int) -> None:
    up = UpSample2x(5).double()
    x = torch.randn(2, 5, t, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    got = up(x)
    assert got.shape == (2, 5, 2 * t)
    torch.testing.assert_close(got, _reference_up2(x, up.filter), rtol=0, atol=1e-12)


@pytest.mark.parametrize("t", [1, 4, 17])
def test_activation1d_matches_reference(t: int) -> None:
    act = Activation1d(3)
    with torch.no_grad():
        act.act.alpha.copy_(torch.tensor([0.2, -0.3, 0.0]))
        act.act.beta.copy_(torch.tensor([-0.1, 0.4, 0.1]))
    act.refresh()
    x = torch.randn(1, 3, t, generator=torch.Generator().manual_seed(7))
    want = _reference_act(x, act.act.alpha.detach(), act.act.beta.detach(), act.upsample.filter)
    torch.testing.assert_close(act(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 17, 64])
def test_phase_separated_activation_equals_activation1d(t: int) -> None:
    """The exported form (no interleave, no strided down-sampling) against the eager one, in float64 so
    that only a wrong tap or a wrong edge value could differ (both edges are exercised at every t)."""
    act = Activation1d(6).double()
    with torch.no_grad():
        act.act.alpha.copy_(torch.linspace(-0.5, 0.7, 6, dtype=torch.float64))
        act.act.beta.copy_(torch.linspace(0.3, -0.4, 6, dtype=torch.float64))
    act.refresh()
    x = torch.randn(2, 6, t, dtype=torch.float64, generator=torch.Generator().manual_seed(t)) * 3
    with torch.no_grad():
        torch.testing.assert_close(PhaseSeparatedActivation1d(act)(x), act(x), rtol=0, atol=1e-12)
        want = _reference_act(x.float(), act.act.alpha.detach().float(), act.act.beta.detach().float(),
                              act.upsample.filter.float())
        torch.testing.assert_close(PhaseSeparatedActivation1d(act.float())(x.float()), want, rtol=1e-6, atol=1e-6)


def test_phase_separated_copies_the_model(bigvgan_dir: Path) -> None:
    model = load_bigvgan(bigvgan_dir)
    exported = phase_separated(model)
    assert not any(isinstance(m, PhaseSeparatedActivation1d) for m in model.modules())
    n = sum(isinstance(m, Activation1d) for m in model.modules())
    assert n > 0 and sum(isinstance(m, PhaseSeparatedActivation1d) for m in exported.modules()) == n
    assert not any(isinstance(m, Activation1d) for m in exported.modules())
    mel = torch.randn(1, 80, 9, generator=torch.Generator().manual_seed(2)) * 2 - 5
    with torch.no_grad():
        torch.testing.assert_close(exported(mel), model(mel), rtol=0, atol=2e-6)


# --- CAMPPlus segment pooling -------------------------------------------------------------------

def _reference_context(x: torch.Tensor) -> torch.Tensor:
    """Upstream CAMLayer context per frame: mean_T + avg_pool1d(100, 100, ceil_mode) repeated, cropped."""
    seg = F.avg_pool1d(x, kernel_size=100, stride=100, ceil_mode=True)
    seg = seg.unsqueeze(-1).expand(*seg.shape, 100).reshape(*seg.shape[:-1], -1)[..., : x.shape[-1]]
    return x.mean(-1, keepdim=True) + seg


@pytest.mark.parametrize("t", [1, 2, 50, 99, 100, 101, 130, 199, 200, 201, 350])
def test_segment_pooling_matches_avg_pool_ceil_mode(t: int) -> None:
    x = torch.randn(2, 6, t, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    seg = make_segments(t, x.device, x.dtype)
    per_frame = segment_context(x, seg).index_select(-1, seg.frame_seg)
    torch.testing.assert_close(per_frame, _reference_context(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("t", [3, 100, 130, 257])
def test_cam_layer_matches_reference(t: int) -> None:
    torch.manual_seed(t)
    layer = CAMLayer(16, 8, 3, 2).double().eval()
    x = torch.randn(2, 16, t, dtype=torch.float64)
    gate = torch.sigmoid(layer.linear2(F.relu(layer.linear1(_reference_context(x)))))
    want = layer.linear_local(x) * gate
    torch.testing.assert_close(layer(x, make_segments(t, x.device, x.dtype)), want, rtol=0, atol=1e-12)


# --- demo checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bigvgan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bigvgan")
    write_demo_bigvgan(directory, TINY_BIGVGAN, torch.Generator().manual_seed(0))
    return directory


@pytest.fixture(scope="module")
def campplus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("campplus") / "campplus_cn_common.bin"
    write_demo_campplus(path, TINY_CAMPPLUS, torch.Generator().manual_seed(0))
    return path


def test_bigvgan_demo_round_trip(bigvgan_dir: Path) -> None:
    raw = torch.load(bigvgan_dir / GENERATOR_FILE, weights_only=True)
    assert set(raw) == {"generator"}
    state = raw["generator"]
    assert "conv_pre.weight_g" in state and "conv_post.weight_v" in state and "conv_post.bias" not in state
    assert torch.equal(state["resblocks.0.activations.0.upsample.filter"], kaiser_sinc_filter())
    config = json.loads((bigvgan_dir / "config.json").read_text())
    assert config["use_tanh_at_final"] is False and config["upsample_initial_channel"] == 64

    model = load_bigvgan(bigvgan_dir)
    mel = torch.randn(1, 80, 6, generator=torch.Generator().manual_seed(1)) * 2 - 5
    with torch.no_grad():
        wav = model(mel)
        assert model(mel[..., :1]).shape == (1, 1, 256)
    assert wav.shape == (1, 1, 6 * 256)
    assert torch.isfinite(wav).all() and wav.abs().max() <= 1.0
    assert 0.02 < wav.std() < 1.0
    assert (wav.abs() < 1.0).float().mean() > 0.5, "demo weights clamp most of the output"


def test_campplus_demo_round_trip(campplus_file: Path) -> None:
    raw = torch.load(campplus_file, weights_only=True)
    assert raw["xvector.dense.nonlinear.batchnorm.num_batches_tracked"].dtype == torch.int64
    fbank = torch.randn(2, 150, 80, generator=torch.Generator().manual_seed(2))
    fbank = fbank - fbank.mean(1, keepdim=True)
    fused = load_campplus(campplus_file, TINY_CAMPPLUS)
    plain = load_campplus(campplus_file, TINY_CAMPPLUS, fuse=False)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine is False
                   for m in fused.modules()), "dense BatchNorm was not folded"
    with torch.no_grad():
        style, style_plain = fused(fbank), plain(fbank)
    assert style.shape == (2, 192) and torch.isfinite(style).all()
    assert 0.1 < style.std() < 10
    torch.testing.assert_close(style, style_plain, rtol=1e-5, atol=1e-5)


# --- bad checkpoints ------------------------------------------------------------------------------

def _copy_bigvgan(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    state = torch.load(src / GENERATOR_FILE, weights_only=True)["generator"]
    if edit:
        edit(state)
    torch.save({"generator": state}, dst / GENERATOR_FILE)
    return dst


def test_bigvgan_missing_key(bigvgan_dir: Path, tmp_path: Path) -> None:
    d = _copy_bigvgan(bigvgan_dir, tmp_path / "m", edit=lambda s: s.pop("activation_post.act.beta"))
    with pytest.raises(CheckpointError, match=r"missing keys.*activation_post\.act\.beta"):
        load_bigvgan(d)


def test_bigvgan_wrong_shape(bigvgan_dir: Path, tmp_path: Path) -> None:
    def edit(s: dict) -> None:
        s["conv_pre.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*conv_pre\.bias"):
        load_bigvgan(_copy_bigvgan(bigvgan_dir, tmp_path / "s", edit=edit))


def test_bigvgan_unexpected_final_bias(bigvgan_dir: Path, tmp_path: Path) -> None:
    def edit(s: dict) -> None:
        s["conv_post.bias"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*conv_post\.bias"):
        load_bigvgan(_copy_bigvgan(bigvgan_dir, tmp_path / "b", edit=edit))


def test_bigvgan_truncated_file(bigvgan_dir: Path, tmp_path: Path) -> None:
    d = _copy_bigvgan(bigvgan_dir, tmp_path / "t")
    data = (d / GENERATOR_FILE).read_bytes()
    (d / GENERATOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="bigvgan_generator.pt"):
        load_bigvgan(d)


def test_bigvgan_no_generator_entry(bigvgan_dir: Path, tmp_path: Path) -> None:
    d = _copy_bigvgan(bigvgan_dir, tmp_path / "g")
    torch.save(torch.load(d / GENERATOR_FILE, weights_only=True)["generator"], d / GENERATOR_FILE)
    with pytest.raises(CheckpointError, match="'generator'"):
        load_bigvgan(d)


@pytest.mark.parametrize("key", ["use_tanh_at_final", "use_bias_at_final"])
def test_bigvgan_unsupported_config(bigvgan_dir: Path, tmp_path: Path, key: str) -> None:
    d = _copy_bigvgan(bigvgan_dir, tmp_path / key, config_edit=lambda c: c.update({key: True}))
    with pytest.raises(CheckpointError, match=key):
        load_bigvgan(d)


def test_bigvgan_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_bigvgan(tmp_path)


def test_campplus_missing_key(campplus_file: Path, tmp_path: Path) -> None:
    state = torch.load(campplus_file, weights_only=True)
    del state["xvector.block2.tdnnd3.cam_layer.linear1.bias"]
    torch.save(state, tmp_path / "c.bin")
    with pytest.raises(CheckpointError, match=r"missing keys.*block2\.tdnnd3\.cam_layer\.linear1\.bias"):
        load_campplus(tmp_path / "c.bin", TINY_CAMPPLUS)


def test_campplus_wrong_shape(campplus_file: Path, tmp_path: Path) -> None:
    state = torch.load(campplus_file, weights_only=True)
    state["head.conv1.weight"] = torch.zeros(32, 1, 5, 5)
    torch.save(state, tmp_path / "c.bin")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*head\.conv1\.weight"):
        load_campplus(tmp_path / "c.bin", TINY_CAMPPLUS)


def test_campplus_wrong_config(campplus_file: Path) -> None:
    """The fixture-size file against the real (default) config: every width differs."""
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_campplus(campplus_file)


def test_campplus_truncated_file(campplus_file: Path, tmp_path: Path) -> None:
    data = campplus_file.read_bytes()
    (tmp_path / "c.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="c.bin"):
        load_campplus(tmp_path / "c.bin", TINY_CAMPPLUS)


# --- export friendliness ------------------------------------------------------------------------

def test_bigvgan_exports_with_dynamic_time() -> None:
    from torch.export import Dim, export

    from export.models.bigvgan import BigVGAN

    cfg = BigVGANConfig(upsample_initial_channel=16, upsample_rates=(4, 2), upsample_kernel_sizes=(8, 4),
                        resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3, 5),))
    model = BigVGAN(cfg).eval()
    program = export(model, (torch.randn(2, 80, 10),),
                     dynamic_shapes={"mel": {0: Dim("B", min=1, max=32), 2: Dim("T", min=1, max=8192)}})
    for t in (1, 37):
        x = torch.randn(1, 80, t)
        torch.testing.assert_close(program.module()(x), model(x))


def test_campplus_exports_with_dynamic_time(campplus_file: Path) -> None:
    from torch.export import Dim, export

    model = load_campplus(campplus_file, TINY_CAMPPLUS)
    program = export(model, (torch.randn(2, 250, 80),),
                     dynamic_shapes={"fbank": {0: Dim("B", min=1, max=32), 1: Dim("T", min=3, max=4000)}})
    with torch.no_grad():
        for t in (3, 150, 201, 420):
            x = torch.randn(1, t, 80)
            torch.testing.assert_close(program.module()(x), model(x))
