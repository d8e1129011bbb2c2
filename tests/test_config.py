"""Typed config: the real layout parses, numbers stay numbers, wrong types are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.config import GPTConfig, load_bigvgan_config, load_config, parse_config
from runtime.errors import CheckpointError


def test_fixture_config_parses_with_fractional_perceiver_mult(fixtures_root: Path) -> None:
    cfg = load_config(fixtures_root / "config.yaml")
    assert cfg.gpt is not None and cfg.s2mel is not None and cfg.semantic_codec is not None
    assert cfg.gpt.emo_condition_module.perceiver_mult == 0.25
    assert isinstance(cfg.gpt.condition_module.perceiver_mult, float)
    assert cfg.s2mel.DiT.depth == 5 and cfg.s2mel.length_regulator.channels == 48
    assert cfg.s2mel.preprocess_params.spect_params.fmax is None  # "None" string in yaml
    assert cfg.emo_num == (3, 17, 2, 8, 4, 5, 10, 24)


def test_section_only_config(fixtures_root: Path) -> None:
    cfg = load_config(fixtures_root / "semantic_codec" / "config.yaml")
    assert cfg.s2mel is None and cfg.gpt is None
    assert cfg.semantic_codec is not None and cfg.semantic_codec.codebook_size == 256


def test_defaults_are_the_real_config() -> None:
    gpt = GPTConfig()
    assert (gpt.model_dim, gpt.layers, gpt.heads, gpt.number_mel_codes) == (1280, 24, 20, 8194)
    assert gpt.emo_condition_module.num_blocks == 4 and gpt.condition_module.num_blocks == 6


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(CheckpointError, match=r"gpt\.layers"):
        parse_config({"gpt": {"layers": "twenty"}})
    with pytest.raises(CheckpointError, match="must be a mapping"):
        parse_config({"s2mel": {"DiT": 3}})


def test_missing_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_config(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text("gpt: [unclosed")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_config(tmp_path / "config.yaml")


def test_bigvgan_config(fixtures_root: Path, tmp_path: Path) -> None:
    cfg = load_bigvgan_config(fixtures_root / "bigvgan" / "config.json")
    assert cfg.upsample_initial_channel == 128 and cfg.upsample_rates == (4, 4, 2, 2, 2, 2)
    assert cfg.resblock_dilation_sizes == ((1, 3, 5),) * 3
    bad = json.loads((fixtures_root / "bigvgan" / "config.json").read_text())
    bad["activation"] = "snake"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="snakebeta"):
        load_bigvgan_config(tmp_path / "config.json")
