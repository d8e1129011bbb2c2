"""Checkpoint directory layout: auxiliary models found in every accepted place, clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.layout import CheckpointLayout
from runtime.errors import CheckpointError


def _ckpt(tmp_path: Path) -> Path:
    (tmp_path / "config.yaml").write_text("gpt_checkpoint: my_gpt.pth\n")
    return tmp_path


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        CheckpointLayout.open(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="config.yaml: config file not found"):
        CheckpointLayout.open(tmp_path)


def test_main_files_follow_config_names(tmp_path: Path) -> None:
    layout = CheckpointLayout.open(_ckpt(tmp_path))
    assert layout.main_file("gpt") == tmp_path / "my_gpt.pth"
    with pytest.raises(CheckpointError, match=r"my_gpt\.pth: required checkpoint file \(gpt\) not found"):
        layout.require("gpt")
    (tmp_path / "my_gpt.pth").write_bytes(b"x")
    assert layout.require("gpt") == tmp_path / "my_gpt.pth"


@pytest.mark.parametrize("rel", ["hf_cache/campplus_cn_common.bin", "campplus_cn_common.bin",
                                 "hf_cache/models--funasr--campplus/snapshots/abc123/campplus_cn_common.bin"])
def test_aux_candidates(tmp_path: Path, rel: str) -> None:
    layout = CheckpointLayout.open(_ckpt(tmp_path))
    with pytest.raises(CheckpointError, match="campplus: not found"):
        layout.require("campplus")
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b"x")
    assert layout.require("campplus") == tmp_path / rel


def test_hf_snapshot_dir_for_w2v_bert(tmp_path: Path) -> None:
    layout = CheckpointLayout.open(_ckpt(tmp_path))
    snap = tmp_path / "hf_cache/models--facebook--w2v-bert-2.0/snapshots/0123"
    snap.mkdir(parents=True)
    assert layout.aux("w2v_bert") == snap
