"""`python -m export.demo --version 2.5`: 2.5's layout, read by the real loaders; the checkpoint's version comes
from its GPT keys, and a config.yaml stating the other version is refused naming both (upstream #739)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from export.demo import main as demo_main
from export.layout import CheckpointLayout
from export.models.semantic_decoder import load_semantic_decoder
from export.models.unified_voice import load_gpt
from runtime.errors import CheckpointError
from runtime.frontend.text25.bpe import BpeTokenizer


@pytest.fixture(scope="module")
def demo25(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo25")
    assert demo_main(["--out", str(out), "--size", "tiny", "--version", "2.5"]) == 0
    return out


def test_layout_and_loaders(demo25: Path) -> None:
    layout = CheckpointLayout.open(demo25)
    assert layout.version == "2.5" and layout.config.version == "2.5"
    assert not (demo25 / "bpe.model").exists() and not (demo25 / "hf_cache" / "semantic_codec").exists()
    cfg = layout.config
    gpt = load_gpt(layout.require("gpt"), cfg.gpt, cfg.semantic_codec.hidden_size, version=layout.version)
    assert gpt.version == "2.5" and not hasattr(gpt, "perceiver_encoder")
    load_semantic_decoder(layout.require("codec"), cfg.semantic_codec)
    bpe = BpeTokenizer(layout.require("tiktoken"))
    assert bpe.vocab_size == cfg.gpt.number_text_tokens              # ranks + 1 673 specials
    assert bpe.encode("!") == [0] and bpe.encode("<|en|> ")[0] == bpe.vocab_size - 1673 + 2


def test_2_0_demo_reads_as_2_0(tiny_ckpt: Path) -> None:
    assert CheckpointLayout.open(tiny_ckpt).version == "2.0"


@pytest.mark.parametrize("weights, stated", [("2.5", "2.0"), ("2.0", "2.5")])
def test_a_config_of_the_other_version_is_refused(demo25: Path, tiny_ckpt: Path, tmp_path: Path, weights: str,
                                                  stated: str) -> None:
    bad = tmp_path / "ckpt"
    shutil.copytree(demo25 if weights == "2.5" else tiny_ckpt, bad)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["version"] = float(stated)
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=rf"gpt\.pth is IndexTTS-{weights}'s .* config\.yaml says version {stated}"):
        CheckpointLayout.open(bad).version


def test_codec_file_in_another_layout_is_refused(tmp_path: Path, demo25: Path) -> None:
    import torch

    from export.config import load_config

    path = tmp_path / "codec.pth"
    torch.save(torch.load(demo25 / "codec.pth", weights_only=True)["model"], path)        # no {'model': ...}
    with pytest.raises(CheckpointError, match=r"expected IndexTTS-2\.5's codec checkpoint \{'model'"):
        load_semantic_decoder(path, load_config(demo25 / "config.yaml").semantic_codec)


@pytest.mark.parametrize("name", ["codec.pth", "multilingual_zh_ja_yue_char_del.tiktoken"])
def test_a_2_5_checkpoint_without_its_codec_or_tokenizer_is_refused_before_any_export(demo25: Path, tmp_path: Path,
                                                                                         name: str) -> None:
    from export.build import BuildOptions, build

    bad = tmp_path / "ckpt"
    shutil.copytree(demo25, bad)
    (bad / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name}: required checkpoint file \(\w+\) not found"):
        build(BuildOptions(bad, tmp_path / "out", "fp32"))
    assert not (tmp_path / "out").exists()
