"""s2mel family: fixture parity (gpt_layer, length regulator, DiT, CFM), demo round trip, bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from export.config import DiTConfig, LengthRegulatorConfig, S2MelConfig, WavenetConfig
from export.models.cfm import cfm_inference
from export.models.length_regulator import nearest_source_index
from export.models.s2mel import load_s2mel, write_demo_s2mel
from runtime.errors import CheckpointError
from tests.conftest import assert_rows_pass, run_fixture_calls

TINY = S2MelConfig(
    length_regulator=LengthRegulatorConfig(channels=32, in_channels=64),
    DiT=DiTConfig(hidden_dim=32, num_heads=2, depth=3, content_dim=32),
    wavenet=WavenetConfig(hidden_dim=32, num_layers=2),
)
GPT_DIM = 48


@pytest.mark.parametrize("name", ["s2mel_gpt_layer", "s2mel_length_regulator", "s2mel_cfm"])
def test_fixture(fixtures_root: Path, name: str) -> None:
    assert_rows_pass(run_fixture_calls(fixtures_root, name))


def test_nearest_index_matches_torch_interpolate() -> None:
    for t_in in (1, 7, 20, 26, 33, 101):
        x = torch.arange(t_in, dtype=torch.float32)[None, None]
        for t_out in (1, 5, 34, 44, 87, 173, 500):
            want = F.interpolate(x, size=t_out, mode="nearest")[0, 0].long()
            assert torch.equal(nearest_source_index(t_in, torch.tensor(t_out)), want), (t_in, t_out)


@pytest.fixture()
def demo_path(tmp_path: Path) -> Path:
    path = tmp_path / "s2mel.pth"
    write_demo_s2mel(path, TINY, GPT_DIM, torch.Generator().manual_seed(0))
    return path


def test_demo_layout(demo_path: Path) -> None:
    net = torch.load(demo_path, weights_only=True)["net"]
    assert set(net) == {"cfm", "length_regulator", "gpt_layer"}
    cfm = net["cfm"]
    for key in ("estimator.wavenet.in_layers.0.conv.conv.weight_g", "estimator.final_layer.linear.weight_v",
                "estimator.x_embedder.weight_g", "estimator.cond_embedder.weight", "estimator.input_pos",
                "estimator.t_embedder.freqs"):
        assert key in cfm, key
    assert "estimator.wavenet.in_layers.0.conv.conv.weight" not in cfm
    assert {"embedding.weight", "mask_token"} <= set(net["length_regulator"])
    assert net["gpt_layer"]["0.weight"].shape == (256, GPT_DIM)


def test_demo_round_trip(demo_path: Path) -> None:
    m = load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM)
    assert not m.training
    with torch.no_grad():
        s = m.gpt_layer(torch.randn(1, 12, GPT_DIM))                           # (1, 12, 64)
        cond, olens = m.length_regulator(s, torch.tensor([20]))                # (1, 20, 32)
        prompt = torch.randn(1, 80, 6)
        mel = cfm_inference(m.cfm, cond, torch.tensor([20]), prompt, torch.randn(1, 192),
                            torch.randn(1, 80, 20), n_timesteps=4)
    assert cond.shape == (1, 20, 32) and olens.tolist() == [20]
    assert mel.shape == (1, 80, 20) and torch.isfinite(mel).all()
    assert torch.all(mel[:, :, :6] == 0)
    assert 0.1 < float(mel[:, :, 6:].std()) < 10


def test_step_matches_manual_cfg(demo_path: Path) -> None:
    """The dit_step module = estimator on the stacked CFG batch, guidance, update, prompt zeroing."""
    m = load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM, parts=("cfm",))
    B, T = 2, 15
    x, px, cond = torch.randn(B, 80, T), torch.randn(B, 80, T), torch.randn(B, T, 32)
    style, t, dt = torch.randn(B, 192), torch.tensor([0.2, 0.6]), torch.tensor([0.25, 0.25])
    x_lens, p_lens = torch.tensor([15, 11]), torch.tensor([4, 0])
    with torch.no_grad():
        got = m.cfm(x, px, x_lens, p_lens, t, dt, style, cond, torch.tensor([0.7]))
        est = m.cfm.estimator
        vc = est(x, px, x_lens, t, style, cond)
        vu = est(x, torch.zeros_like(px), x_lens, t, torch.zeros_like(style), torch.zeros_like(cond))
    want = x + dt[:, None, None] * ((1.0 + 0.7) * vc - 0.7 * vu)
    want[0, :, :4] = 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _rewrite(path: Path, edit) -> None:
    obj = torch.load(path, weights_only=True)
    edit(obj["net"])
    torch.save(obj, path)


def test_module_prefix_accepted(demo_path: Path) -> None:
    _rewrite(demo_path, lambda net: net.update(gpt_layer={"module." + k: v for k, v in net["gpt_layer"].items()}))
    load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM, parts=("gpt_layer",))


def test_missing_key(demo_path: Path) -> None:
    _rewrite(demo_path, lambda net: net["cfm"].pop("estimator.transformer.layers.1.attention.wo.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys.*estimator\.transformer\.layers\.1\.attention\.wo"):
        load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM)


def test_wrong_shape(demo_path: Path) -> None:
    _rewrite(demo_path, lambda net: net["length_regulator"].update({"model.0.weight": torch.zeros(32, 32, 5)}))
    with pytest.raises(CheckpointError, match=r"model\.0\.weight: checkpoint \(32, 32, 5\), model \(32, 32, 3\)"):
        load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM)


def test_unexpected_key_and_missing_part(demo_path: Path) -> None:
    _rewrite(demo_path, lambda net: net["gpt_layer"].update({"3.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*3\.weight"):
        load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM, parts=("gpt_layer",))
    _rewrite(demo_path, lambda net: net.pop("length_regulator"))
    with pytest.raises(CheckpointError, match=r"net\['length_regulator'\] not found"):
        load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM)


def test_truncated_and_wrong_container(demo_path: Path, tmp_path: Path) -> None:
    data = demo_path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_s2mel(bad, TINY, gpt_dim=GPT_DIM)
    flat = tmp_path / "flat.pth"
    torch.save({"cfm": {}}, flat)
    with pytest.raises(CheckpointError, match="'net'"):
        load_s2mel(flat, TINY, gpt_dim=GPT_DIM)


def test_padded_rows_of_a_step_equal_each_row_alone(demo_path: Path) -> None:
    """Batching requests into one dit_step call pads rows to the longest: each row must come out as its
    batch-1 call (upstream's only form) gives it. Before the WaveNet reflected at each row's own end,
    the padding leaked into a shorter row's last frames (0.6 % of the output's range), as it does upstream."""
    m = load_s2mel(demo_path, TINY, gpt_dim=GPT_DIM, parts=("cfm",))
    gen = torch.Generator().manual_seed(3)
    lens, prompts = [23, 9, 16], [5, 0, 3]
    rows = []
    for n, p in zip(lens, prompts):
        px = torch.randn(1, 80, n, generator=gen)
        px[:, :, p:] = 0
        rows.append((torch.randn(1, 80, n, generator=gen), px, torch.randn(1, n, 32, generator=gen),
                     torch.randn(1, 192, generator=gen), torch.rand(1, generator=gen)))
    T = max(lens)
    padded = [torch.zeros(len(lens), 80, T), torch.zeros(len(lens), 80, T), torch.zeros(len(lens), T, 32)]
    for i, (x, px, cond, _, _) in enumerate(rows):
        padded[0][i, :, :lens[i]], padded[1][i, :, :lens[i]], padded[2][i, :lens[i]] = x[0], px[0], cond[0]
    style = torch.cat([r[3] for r in rows])
    t = torch.cat([r[4] for r in rows])
    dt = torch.full((len(lens),), 0.04)
    with torch.no_grad():
        batched = m.cfm(padded[0], padded[1], torch.tensor(lens), torch.tensor(prompts), t, dt, style, padded[2],
                        torch.tensor([0.7]), rows_alone=True)
        upstream = m.cfm(padded[0], padded[1], torch.tensor(lens), torch.tensor(prompts), t, dt, style, padded[2],
                         torch.tensor([0.7]))
        for i, (x, px, cond, sty, ti) in enumerate(rows):
            alone = m.cfm(x, px, torch.tensor([lens[i]]), torch.tensor([prompts[i]]), ti, dt[:1], sty, cond,
                          torch.tensor([0.7]))
            torch.testing.assert_close(batched[i:i + 1, :, :lens[i]], alone, atol=2e-6, rtol=1e-5)
            if lens[i] < T:     # upstream's padded batch is not the row alone: the case rows_alone exists for
                assert (upstream[i:i + 1, :, :lens[i]] - alone).abs().max() > 1e-3


def test_row_reflection_is_reflect_padding_at_full_length() -> None:
    from export.models.wavenet import reflect_pad_rows

    x = torch.randn(2, 3, 11)
    for left, right in ((2, 2), (4, 4), (1, 0), (0, 3)):
        got = reflect_pad_rows(x, torch.tensor([11]), left, right)
        assert torch.equal(got, F.pad(x, (left, right), mode="reflect"))
        row = reflect_pad_rows(x, torch.tensor([11, 6]), left, right)[1:, :, :left + 6 + right]
        assert torch.equal(row, F.pad(x[1:, :, :6], (left, right), mode="reflect"))
