"""Demo checkpoints: a complete IndexTTS2 checkpoint directory in the original layout, seeded random weights.

Real checkpoints cannot be downloaded on the machines this toolkit is developed and tested on, so the
tests and the quick start run on a directory written here, read by the SAME loaders as a real one:

    python -m export.demo --out DIR --size tiny|full [--seed N] [--version 2.0|2.5]

`tiny` writes in seconds and is what the tests use; `full` has the real config's sizes (for benchmarks;
several GB). Random weights give noise, not speech. Layout written (UPSTREAM §1.1):

    DIR/config.yaml  gpt.pth  s2mel.pth  bpe.model  wav2vec2bert_stats.pt  feat1.pt  feat2.pt  DEMO.txt
    DIR/qwen0.6bemo4-merge/  (a tiny random Qwen3 emotion LM with a byte-level tokenizer)
    DIR/hf_cache/w2v-bert-2.0/{config.json, preprocessor_config.json, model.safetensors}
    DIR/hf_cache/semantic_codec/model.safetensors
    DIR/hf_cache/campplus_cn_common.bin
    DIR/hf_cache/bigvgan/{config.json, bigvgan_generator.pt}
    DIR/examples/speaker.wav, emotion.wav  (synthetic voice-like references at 24 / 16 kHz)

IndexTTS-2.5 (`--version 2.5`, UPSTREAM-2.5 §2): no bpe.model and no MaskGCT codec; instead `codec.pth`
(`{'model': sd}`, the codec decoder) and `multilingual_zh_ja_yue_char_del.tiktoken` (a small ranks file trained
here, export/demo_tiktoken.py); gpt.pth in the 2.5 layout (spk_emb_proj, lang_embedding, no conditioning
encoder / perceiver / speed_emb); `number_text_tokens` = the demo tokenizer's ranks + 1 673 specials (tiny) or
the real 60 509 (full); config.yaml without `dataset` and with `version: 2.5`.

One deliberate generalisation makes `tiny` small: upstream hard-codes the semantic width 1024 (w2v-BERT
hidden size = codec width = gpt_layer output = conformer input); here it is `semantic_codec.hidden_size`
of config.yaml, which is 1024 for the real config.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from runtime.errors import ToolkitError

from .layout import VERSION_20, VERSION_25

from .config import (
    BigVGANConfig,
    CAMPPlusConfig,
    ConditionModuleConfig,
    DiTConfig,
    GPTConfig,
    IndexTTS2Config,
    LengthRegulatorConfig,
    S2MelConfig,
    SemanticCodecConfig,
    WavenetConfig,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class W2VBertSize:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096


@dataclass(frozen=True)
class DemoSpec:
    """Everything that differs between demo sizes."""

    config: IndexTTS2Config
    w2v: W2VBertSize = field(default_factory=W2VBertSize)
    bigvgan: BigVGANConfig = field(default_factory=BigVGANConfig)
    campplus: CAMPPlusConfig = field(default_factory=CAMPPlusConfig)
    bpe_vocab_size: int = 400


def tiny_spec() -> DemoSpec:
    """Small everywhere, structure of the real config kept (uvit depth odd, wavenet post-net, ...)."""
    dim = 64  # the semantic width (w2v hidden = codec hidden = length-regulator input)
    cfg = IndexTTS2Config(
        gpt=GPTConfig(
            model_dim=64, heads=4, layers=2, max_mel_tokens=250, max_text_tokens=120,
            number_text_tokens=512, number_mel_codes=258, start_mel_token=256, stop_mel_token=257,
            condition_module=ConditionModuleConfig(output_size=32, linear_units=64, attention_heads=4,
                                                   num_blocks=2, perceiver_mult=2.0),
            emo_condition_module=ConditionModuleConfig(output_size=16, linear_units=32, attention_heads=2,
                                                       num_blocks=2, perceiver_mult=0.25),
        ),
        semantic_codec=SemanticCodecConfig(codebook_size=256, hidden_size=dim, codebook_dim=8, vocos_dim=32,
                                           vocos_intermediate_dim=64, vocos_num_layers=2),
        s2mel=S2MelConfig(
            length_regulator=LengthRegulatorConfig(channels=48, in_channels=dim),
            DiT=DiTConfig(hidden_dim=64, num_heads=4, depth=5, content_dim=48),
            wavenet=WavenetConfig(hidden_dim=64, num_layers=3),
        ),
    )
    return DemoSpec(
        config=cfg,
        w2v=W2VBertSize(hidden_size=dim, num_layers=18, num_heads=4, intermediate_size=128),
        bigvgan=BigVGANConfig(upsample_initial_channel=128),
        campplus=CAMPPlusConfig(growth_rate=8, bn_size=4, init_channels=64),
        bpe_vocab_size=400,
    )


def full_spec() -> DemoSpec:
    """The real IndexTTS2 sizes (UPSTREAM §1.2-1.4)."""
    return DemoSpec(config=IndexTTS2Config(gpt=GPTConfig(), semantic_codec=SemanticCodecConfig(),
                                           s2mel=S2MelConfig()))


SIZES = {"tiny": tiny_spec, "full": full_spec}


def _plain(value: Any) -> Any:
    """Dataclass tree -> yaml-ready plain values (tuples as lists)."""
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_yaml(cfg: IndexTTS2Config) -> str:
    """config.yaml in the layout of the real one (training-only keys included where they are harmless)."""
    s2mel = _plain(cfg.s2mel)
    s2mel["preprocess_params"]["spect_params"]["fmax"] = "None"
    s2mel.update(dit_type="DiT", reg_loss_type="l1")
    data = {
        "dataset": {"bpe_model": cfg.bpe_model, "sample_rate": 24000, "squeeze": False},
        "gpt": _plain(cfg.gpt),
        "semantic_codec": _plain(cfg.semantic_codec),
        "s2mel": s2mel,
        "gpt_checkpoint": cfg.gpt_checkpoint,
        "w2v_stat": cfg.w2v_stat,
        "s2mel_checkpoint": cfg.s2mel_checkpoint,
        "emo_matrix": cfg.emo_matrix,
        "spk_matrix": cfg.spk_matrix,
        "emo_num": list(cfg.emo_num),
        "qwen_emo_path": cfg.qwen_emo_path,
        "vocoder": {"type": "bigvgan", "name": "nvidia/bigvgan_v2_22khz_80band_256x"},
        "version": 2.0,
    }
    if cfg.version == VERSION_25:                 # 2.5's config: no dataset block (UPSTREAM-2.5 §2)
        del data["dataset"]
        data["vocoder"] = {"name": "bigvgan_generator.pt"}
        data["version"] = 2.5
    return "# DEMO checkpoint config (random weights), layout of IndexTTS-2 checkpoints/config.yaml\n" + \
        yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def train_bpe(path: Path, vocab_size: int) -> None:
    """Train a SentencePiece BPE model on the embedded corpus (settings as upstream's tokenizer expects:
    bos 0 = start_text_token, eos 1 = stop_text_token, unk 2, full character coverage)."""
    import io

    import sentencepiece as spm

    from .demo_corpus import corpus_lines

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, bos_id=0, eos_id=1, unk_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def synthetic_voice(sr: int = 24000, seconds: float = 3.0, seed: int = 0, f0: float = 140.0) -> np.ndarray:
    """A voice-like test signal: a gliding harmonic tone with syllable-rate amplitude and some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = f0 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2
    x = 0.15 * voice * envelope + 0.01 * rng.standard_normal(t.size)
    return (x / np.abs(x).max() * 0.7).astype(np.float32)


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + salt)


#: The demo tokenizer of 2.5: 256 byte ranks + these merges (+ 1 673 specials).
DEMO_TIKTOKEN_MERGES = 200
REAL_TEXT_TOKENS_25 = 60509


def spec_for_version(spec: DemoSpec, version: str, size: str) -> DemoSpec:
    """The 2.5 variant of a size: its text vocabulary and `version`; everything else as 2.0's."""
    if version == VERSION_20:
        return spec
    from runtime.frontend.text25.bpe import special_tokens

    assert spec.config.gpt is not None
    vocab = REAL_TEXT_TOKENS_25 if size == "full" else 256 + DEMO_TIKTOKEN_MERGES + len(special_tokens())
    gpt = dataclasses.replace(spec.config.gpt, number_text_tokens=vocab)
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, gpt=gpt, version=VERSION_25))


def write_demo(out: Path, size: str = "tiny", seed: int = 0, version: str = VERSION_20) -> Path:
    """Write a complete demo checkpoint directory (IndexTTS2 `version` 2.0 or 2.5); returns `out`."""
    import soundfile as sf

    from .emotion_matrices import write_demo_emotion_matrices
    from .models.bigvgan import write_demo_bigvgan
    from .models.campplus import write_demo_campplus
    from .models.s2mel import write_demo_s2mel
    from .models.semantic_codec import write_demo_semantic_codec
    from .models.unified_voice import write_demo_gpt
    from .qwen_emotion import write_demo_qwen_emotion
    from .models.w2v_bert import write_demo_w2v_bert, write_demo_w2v_stats

    from .demo_tiktoken import write_tiktoken
    from .layout import TIKTOKEN_FILE, CODEC_FILE
    from .models.semantic_decoder import write_demo_semantic_decoder

    if size not in SIZES:
        raise ToolkitError(f"unknown demo size {size!r}; choose one of {sorted(SIZES)}")
    if version not in (VERSION_20, VERSION_25):
        raise ToolkitError(f"unknown IndexTTS2 version {version!r}; choose {VERSION_20} or {VERSION_25}")
    spec = spec_for_version(SIZES[size](), version, size)
    cfg = spec.config
    assert cfg.gpt is not None and cfg.s2mel is not None and cfg.semantic_codec is not None
    try:
        (out / "hf_cache").mkdir(parents=True, exist_ok=True)
        (out / "examples").mkdir(exist_ok=True)
    except OSError as err:
        raise ToolkitError(f"{out}: cannot create the demo checkpoint directory ({err})") from err
    dim = cfg.semantic_codec.hidden_size
    steps = [
        ("config.yaml", lambda: (out / "config.yaml").write_text(config_yaml(cfg), encoding="utf-8")),
        ("bpe.model", lambda: train_bpe(out / cfg.bpe_model, spec.bpe_vocab_size)) if version == VERSION_20 else
        (TIKTOKEN_FILE, lambda: write_tiktoken(out / TIKTOKEN_FILE, DEMO_TIKTOKEN_MERGES)),
        ("wav2vec2bert_stats.pt", lambda: write_demo_w2v_stats(out / cfg.w2v_stat, dim, _generator(seed, 1))),
        ("feat1.pt / feat2.pt", lambda: write_demo_emotion_matrices(
            out / cfg.spk_matrix, out / cfg.emo_matrix, _generator(seed, 2), emo_num=cfg.emo_num,
            model_dim=cfg.gpt.model_dim, style_dim=spec.campplus.embedding_size)),
        ("w2v-bert-2.0", lambda: write_demo_w2v_bert(out / "hf_cache/w2v-bert-2.0", spec.w2v.hidden_size,
                                                     spec.w2v.num_layers, spec.w2v.num_heads,
                                                     spec.w2v.intermediate_size, _generator(seed, 3))),
        ("semantic codec", lambda: write_demo_semantic_codec(out / "hf_cache/semantic_codec/model.safetensors",
                                                             cfg.semantic_codec, _generator(seed, 4)))
        if version == VERSION_20 else
        (CODEC_FILE, lambda: write_demo_semantic_decoder(out / CODEC_FILE, cfg.semantic_codec, _generator(seed, 4))),
        ("campplus", lambda: write_demo_campplus(out / "hf_cache/campplus_cn_common.bin", spec.campplus,
                                                 _generator(seed, 5))),
        ("bigvgan", lambda: write_demo_bigvgan(out / "hf_cache/bigvgan", spec.bigvgan, _generator(seed, 6))),
        ("s2mel.pth", lambda: write_demo_s2mel(out / cfg.s2mel_checkpoint, cfg.s2mel, cfg.gpt.model_dim,
                                               _generator(seed, 7))),
        ("gpt.pth", lambda: write_demo_gpt(out / cfg.gpt_checkpoint, cfg.gpt, dim, _generator(seed, 8), version)),
        ("qwen0.6bemo4-merge", lambda: write_demo_qwen_emotion(out / cfg.qwen_emo_path, _generator(seed, 9))),
        ("examples/speaker.wav", lambda: sf.write(out / "examples/speaker.wav", synthetic_voice(seed=seed),
                                                  24000, subtype="PCM_16")),
        ("examples/emotion.wav", lambda: sf.write(out / "examples/emotion.wav",
                                                  synthetic_voice(seconds=2.0, seed=seed + 1, f0=220.0),
                                                  16000, subtype="PCM_16")),
    ]
    for i, (name, step) in enumerate(steps, 1):
        t0 = time.perf_counter()
        step()
        log.info("[%d/%d] %s (%.1f s)", i, len(steps), name, time.perf_counter() - t0)
    (out / "DEMO.txt").write_text(
        f"IndexTTS2 {version} DEMO checkpoint, size {size}, seed {seed}: seeded RANDOM weights in the original "
        "layout.\n"
        "It exercises the loaders and the pipeline; it produces noise, not speech.\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.demo", description="Write a demo IndexTTS2 "
                                     "checkpoint directory (original layout, seeded random weights).")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", choices=(VERSION_20, VERSION_25), default=VERSION_20,
                        help="IndexTTS2 2.0 (default) or IndexTTS-2.5's layout and GPT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        write_demo(args.out, args.size, args.seed, args.version)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.size} IndexTTS2 {args.version} demo checkpoint to {args.out} in {time.perf_counter() - t0:.1f} s "
          "(random weights: noise, not speech)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
