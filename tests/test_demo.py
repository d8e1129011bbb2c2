"""Demo checkpoints: written in the original layout, read back by the real loaders, every module runs;
bad checkpoint directories and bad audio give clear errors and no output file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from export.config import load_config
from export.demo import write_demo
from export.eager import EagerModels, codes_to_mel, mel_length, prepare_speaker, vocode
from export.smoke import main as smoke_main
from runtime.errors import CheckpointError, InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo") / "ckpt", "tiny", seed=0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_layout_is_the_original_one(tiny_ckpt: Path) -> None:
    for rel in ("config.yaml", "gpt.pth", "qwen0.6bemo4-merge/config.json", "s2mel.pth", "bpe.model", "wav2vec2bert_stats.pt", "feat1.pt", "feat2.pt",
                "hf_cache/w2v-bert-2.0/config.json", "hf_cache/w2v-bert-2.0/model.safetensors",
                "hf_cache/w2v-bert-2.0/preprocessor_config.json", "hf_cache/semantic_codec/model.safetensors",
                "hf_cache/campplus_cn_common.bin", "hf_cache/bigvgan/config.json",
                "hf_cache/bigvgan/bigvgan_generator.pt"):
        assert (tiny_ckpt / rel).is_file(), rel
    net = torch.load(tiny_ckpt / "s2mel.pth", weights_only=True)["net"]
    assert set(net) == {"cfm", "length_regulator", "gpt_layer"}
    assert any(k.endswith("weight_g") for k in net["cfm"])  # weight norm stored as upstream stores it
    gen = torch.load(tiny_ckpt / "hf_cache/bigvgan/bigvgan_generator.pt", weights_only=True)
    assert "generator" in gen and "conv_pre.weight_v" in gen["generator"]
    cfg = load_config(tiny_ckpt / "config.yaml")
    assert cfg.gpt is not None and cfg.gpt.emo_condition_module.perceiver_mult == 0.25
    n = sum(cfg.emo_num)
    assert torch.load(tiny_ckpt / "feat1.pt", weights_only=True).shape == (n, 192)
    assert torch.load(tiny_ckpt / "feat2.pt", weights_only=True).shape == (n, cfg.gpt.model_dim)


def test_same_seed_same_files(tiny_ckpt: Path, tmp_path: Path) -> None:
    again = write_demo(tmp_path / "again", "tiny", seed=0)
    for rel in ("s2mel.pth", "hf_cache/semantic_codec/model.safetensors", "bpe.model"):
        a = (tiny_ckpt / rel).read_bytes()
        b = (again / rel).read_bytes()
        if rel.endswith(".pth"):  # torch zip archives carry no timestamps, but compare tensors anyway
            sa, sb = torch.load(tiny_ckpt / rel, weights_only=True), torch.load(again / rel, weights_only=True)
            assert all(torch.equal(sa["net"]["cfm"][k], sb["net"]["cfm"][k]) for k in sa["net"]["cfm"])
        else:
            assert a == b, rel


def test_every_module_runs_on_the_demo(tiny_ckpt: Path) -> None:
    models = EagerModels.load(tiny_ckpt)
    prompt = prepare_speaker(models, tiny_ckpt / "examples/speaker.wav")
    assert prompt.style.shape == (1, 192) and torch.isfinite(prompt.style).all()
    t_ref = prompt.ref_mel.shape[-1]
    assert prompt.prompt_condition.shape[:2] == (1, t_ref)
    cfg = models.layout.config
    n = 20
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.semantic_codec.codebook_size, (1, n), generator=gen)
    latent = torch.randn(1, n, cfg.gpt.model_dim, generator=gen)
    noise = torch.randn(1, 80, t_ref + mel_length(n), generator=gen)
    mel = codes_to_mel(models, prompt, codes, latent, noise, steps=4)
    assert mel.shape == (1, 80, mel_length(n)) and torch.isfinite(mel).all()
    wav = vocode(models, mel)
    assert wav.shape == (256 * mel_length(n),) and np.isfinite(wav).all() and wav.std() > 1e-3


def test_smoke_cli_writes_a_wav(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.wav"
    assert smoke_main(["--checkpoints", str(tiny_ckpt), "--speaker", str(tiny_ckpt / "examples/speaker.wav"),
                       "--out", str(out), "--codes", "30", "--steps", "3"]) == 0
    data, sr = sf.read(out, dtype="int16")
    assert sr == 22050 and data.shape == (256 * mel_length(30),)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("damage, expected", [
    ("remove:s2mel.pth", r"s2mel\.pth: required checkpoint file \(s2mel\) not found"),
    ("truncate:s2mel.pth", r"s2mel\.pth: cannot be read"),
    ("truncate:hf_cache/semantic_codec/model.safetensors", r"model\.safetensors: cannot be read as safetensors"),
    ("remove:hf_cache/campplus_cn_common.bin", "campplus: not found"),
    ("remove:hf_cache/bigvgan/config.json", "config.json not found"),
    ("mismatch:s2mel.pth", r"s2mel\.pth:net\['length_regulator'\]: state dict does not match"),
])
def test_bad_checkpoint_directory(tiny_ckpt: Path, tmp_path: Path, damage: str, expected: str) -> None:
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    action, rel = damage.split(":")
    target = ckpt / rel
    if action == "remove":
        target.unlink()
    elif action == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    else:  # a length regulator of another width: shapes no longer match config.yaml
        state = torch.load(target, weights_only=True)
        lr = state["net"]["length_regulator"]
        lr["content_in_proj.weight"] = torch.zeros(lr["content_in_proj.weight"].shape[0] + 1,
                                                   lr["content_in_proj.weight"].shape[1])
        torch.save(state, target)
    with pytest.raises(CheckpointError, match=expected):
        EagerModels.load(ckpt)


def test_cli_errors_are_clean_and_leave_no_file(tiny_ckpt: Path, tmp_path: Path) -> None:
    bad_audio = tmp_path / "garbage.wav"
    bad_audio.write_bytes(b"RIFF....this is not audio" * 10)
    out = tmp_path / "out.wav"
    cases = [
        (["--checkpoints", str(tmp_path / "absent")], "checkpoint directory not found"),
        (["--checkpoints", str(tiny_ckpt), "--speaker", str(bad_audio)], "cannot decode the audio"),
        (["--checkpoints", str(tiny_ckpt), "--speaker", str(tmp_path / "none.wav")], "audio file not found"),
    ]
    for args, message in cases:
        args = args + (["--speaker", str(bad_audio)] if "--speaker" not in args else []) + ["--out", str(out)]
        proc = subprocess.run([sys.executable, "-m", "export.smoke", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".out.wav.*"))


def test_silent_speaker_is_rejected(tiny_ckpt: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(24000, np.float32), 24000)
    models = EagerModels.load(tiny_ckpt)
    with pytest.raises(InputError, match="silent"):
        prepare_speaker(models, silent)
