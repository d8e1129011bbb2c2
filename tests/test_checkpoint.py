"""Checkpoint reading rules shared by every loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from export.checkpoint import fold_weight_norm, load_into, read_torch_file, unfold_weight_norm
from runtime.errors import CheckpointError


def test_weight_norm_fold_matches_torch_and_round_trips() -> None:
    conv = nn.Conv1d(6, 4, 3)
    wn = torch.nn.utils.weight_norm(nn.Conv1d(6, 4, 3))
    with torch.no_grad():
        wn.weight_g.uniform_(0.5, 1.5)
    folded = fold_weight_norm(wn.state_dict())
    assert set(folded) == {"weight", "bias"}
    x = torch.randn(2, 6, 9)
    conv.load_state_dict(folded)
    torch.testing.assert_close(conv(x), wn(x), rtol=1e-6, atol=1e-6)
    again = fold_weight_norm(unfold_weight_norm(folded, ["weight"]))
    torch.testing.assert_close(again["weight"], folded["weight"], rtol=1e-6, atol=1e-7)


def test_weight_norm_fold_conv_transpose_uses_dim0() -> None:
    wn = torch.nn.utils.weight_norm(nn.ConvTranspose1d(4, 3, 4, stride=2))
    plain = nn.ConvTranspose1d(4, 3, 4, stride=2)
    plain.load_state_dict(fold_weight_norm(wn.state_dict()))
    x = torch.randn(1, 4, 7)
    torch.testing.assert_close(plain(x), wn(x), rtol=1e-6, atol=1e-6)


def test_load_into_lists_every_problem() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["1.bias"]
    state["0.weight"] = torch.zeros(5, 3)
    state["extra.buffer"] = torch.zeros(1)
    state["ignored.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_into(model, state, "model.pth", ignore=["ignored.*"])
    msg = str(err.value)
    assert "missing keys (1): 1.bias" in msg
    assert "unexpected keys (1): extra.buffer" in msg
    assert "0.weight: checkpoint (5, 3), model (4, 3)" in msg
    assert "ignored.thing" not in msg


def test_load_into_copies_values() -> None:
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    load_into(dst, src.state_dict(), "x")
    torch.testing.assert_close(dst.weight, src.weight)


def test_read_torch_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_torch_file(tmp_path / "absent.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_torch_file(tmp_path / "empty.pth")
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(100, 100)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        read_torch_file(truncated)
