"""Typed configuration read from an IndexTTS2 `config.yaml` and BigVGAN's `config.json`.

Why typed: the original code reads a free-form OmegaConf tree, and ports went wrong on values that look
like integers but are not (`perceiver_mult` is 0.25 in small configs) or on keys silently ignored. Each
section here is a frozen dataclass with the real config's values as defaults; unknown keys are ignored
(the real file carries training-only entries), and wrong types are reported with their yaml path.
Sections a file does not contain stay `None`, so a fixture config with only `s2mel:` loads too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from runtime.errors import CheckpointError

T = TypeVar("T")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a yaml value to the declared field type, or raise naming the yaml path."""
    if typ in ("float", float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if typ in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"config: {where} must be an integer, got {value!r}")
        return value
    if typ in ("bool", bool):
        if not isinstance(value, bool):
            raise CheckpointError(f"config: {where} must be true/false, got {value!r}")
        return value
    if typ in ("str", str):
        return str(value)
    if typ in ("tuple[int, ...]",):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
            raise CheckpointError(f"config: {where} must be a list of integers, got {value!r}")
        return tuple(value)
    if typ in ("float | None",):
        if value is None or value == "None":
            return None
        return _coerce(value, float, where)
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a mapping; nested dataclass fields are built recursively."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise CheckpointError(f"config: {where} must be a mapping, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        sub = f"{where}.{f.name}"
        nested = _NESTED.get((cls.__name__, f.name))
        if nested is not None:
            kwargs[f.name] = from_mapping(nested, data[f.name], sub)
        else:
            kwargs[f.name] = _coerce(data[f.name], f.type, sub)
    return cls(**kwargs)


@dataclass(frozen=True)
class SpectParams:
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    fmin: int = 0
    fmax: float | None = None


@dataclass(frozen=True)
class PreprocessParams:
    sr: int = 22050
    spect_params: SpectParams = field(default_factory=SpectParams)


@dataclass(frozen=True)
class LengthRegulatorConfig:
    channels: int = 512
    in_channels: int = 1024
    content_codebook_size: int = 2048
    sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)
    is_discrete: bool = False
    vector_quantize: bool = False
    f0_condition: bool = False


@dataclass(frozen=True)
class DiTConfig:
    hidden_dim: int = 512
    num_heads: int = 8
    depth: int = 13
    in_channels: int = 80
    content_dim: int = 512
    content_codebook_size: int = 1024  # rows of the unused cond_embedder (kept in checkpoints)
    style_condition: bool = True
    final_layer_type: str = "wavenet"
    long_skip_connection: bool = True
    uvit_skip_connection: bool = True
    is_causal: bool = False
    time_as_token: bool = False
    style_as_token: bool = False
    zero_prompt_speech_token: bool = False
    f0_condition: bool = False
    add_resblock_in_transformer: bool = False


@dataclass(frozen=True)
class WavenetConfig:
    hidden_dim: int = 512
    num_layers: int = 8
    kernel_size: int = 5
    dilation_rate: int = 1
    style_condition: bool = True


@dataclass(frozen=True)
class StyleEncoderConfig:
    dim: int = 192


@dataclass(frozen=True)
class S2MelConfig:
    preprocess_params: PreprocessParams = field(default_factory=PreprocessParams)
    style_encoder: StyleEncoderConfig = field(default_factory=StyleEncoderConfig)
    length_regulator: LengthRegulatorConfig = field(default_factory=LengthRegulatorConfig)
    DiT: DiTConfig = field(default_factory=DiTConfig)
    wavenet: WavenetConfig = field(default_factory=WavenetConfig)


@dataclass(frozen=True)
class SemanticCodecConfig:
    codebook_size: int = 8192
    hidden_size: int = 1024
    codebook_dim: int = 8
    vocos_dim: int = 384
    vocos_intermediate_dim: int = 2048
    vocos_num_layers: int = 12


@dataclass(frozen=True)
class ConditionModuleConfig:
    output_size: int = 512
    linear_units: int = 2048
    attention_heads: int = 8
    num_blocks: int = 6
    input_layer: str = "conv2d2"
    perceiver_mult: float = 2.0


@dataclass(frozen=True)
class GPTConfig:
    model_dim: int = 1280
    max_mel_tokens: int = 1815
    max_text_tokens: int = 600
    heads: int = 20
    layers: int = 24
    number_text_tokens: int = 12000
    number_mel_codes: int = 8194
    start_mel_token: int = 8192
    stop_mel_token: int = 8193
    start_text_token: int = 0
    stop_text_token: int = 1
    mel_length_compression: int = 1024
    use_mel_codes_as_input: bool = True
    train_solo_embeddings: bool = False
    condition_type: str = "conformer_perceiver"
    condition_module: ConditionModuleConfig = field(default_factory=ConditionModuleConfig)
    emo_condition_module: ConditionModuleConfig = field(
        default_factory=lambda: ConditionModuleConfig(linear_units=1024, attention_heads=4, num_blocks=4)
    )


@dataclass(frozen=True)
class IndexTTS2Config:
    """The whole `config.yaml`. Sections absent from the file are None."""

    gpt: GPTConfig | None = None
    semantic_codec: SemanticCodecConfig | None = None
    s2mel: S2MelConfig | None = None
    emo_num: tuple[int, ...] = (3, 17, 2, 8, 4, 5, 10, 24)
    gpt_checkpoint: str = "gpt.pth"
    s2mel_checkpoint: str = "s2mel.pth"
    w2v_stat: str = "wav2vec2bert_stats.pt"
    emo_matrix: str = "feat2.pt"
    spk_matrix: str = "feat1.pt"
    bpe_model: str = "bpe.model"
    qwen_emo_path: str = "qwen0.6bemo4-merge/"
    version: str | None = None      # what the file says ("2.0", "2.5"), None if it says nothing; the checkpoint's
                                    # keys decide the version (export/models/unified_voice.py:gpt_version_of)


_NESTED: dict[tuple[str, str], type] = {
    ("PreprocessParams", "spect_params"): SpectParams,
    ("S2MelConfig", "preprocess_params"): PreprocessParams,
    ("S2MelConfig", "style_encoder"): StyleEncoderConfig,
    ("S2MelConfig", "length_regulator"): LengthRegulatorConfig,
    ("S2MelConfig", "DiT"): DiTConfig,
    ("S2MelConfig", "wavenet"): WavenetConfig,
    ("GPTConfig", "condition_module"): ConditionModuleConfig,
    ("GPTConfig", "emo_condition_module"): ConditionModuleConfig,
}


def parse_config(data: Mapping[str, Any], source: str = "config.yaml") -> IndexTTS2Config:
    """Build the typed config from an already-parsed yaml mapping."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{source}: expected a mapping at the top level")
    kwargs: dict[str, Any] = {}
    sections = {"gpt": GPTConfig, "semantic_codec": SemanticCodecConfig, "s2mel": S2MelConfig}
    for name, cls in sections.items():
        if data.get(name) is not None:
            kwargs[name] = from_mapping(cls, data[name], f"{source}:{name}")
    dataset = data.get("dataset") or {}
    if isinstance(dataset, Mapping) and "bpe_model" in dataset:
        kwargs["bpe_model"] = str(dataset["bpe_model"])
    if "emo_num" in data:
        kwargs["emo_num"] = _coerce(data["emo_num"], "tuple[int, ...]", f"{source}:emo_num")
    for key in ("gpt_checkpoint", "s2mel_checkpoint", "w2v_stat", "emo_matrix", "spk_matrix",
                "qwen_emo_path", "version"):
        if key in data and data[key] is not None:
            kwargs[key] = str(data[key])
    return IndexTTS2Config(**kwargs)


def load_config(path: str | Path) -> IndexTTS2Config:
    """Read `config.yaml` (the original IndexTTS2 layout)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path}: not valid YAML ({err})") from err
    return parse_config(data, source=str(path))


@dataclass(frozen=True)
class BigVGANConfig:
    """The generator hyper-parameters of BigVGAN's `config.json` (training keys are ignored)."""

    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"
    snake_logscale: bool = True
    use_tanh_at_final: bool = False
    use_bias_at_final: bool = False
    sampling_rate: int = 22050
    hop_size: int = 256
    n_fft: int = 1024
    win_size: int = 1024


def load_bigvgan_config(path: str | Path) -> BigVGANConfig:
    """Read BigVGAN's `config.json` (NVIDIA's format)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: BigVGAN config.json not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    where = str(path)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(BigVGANConfig):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "resblock_dilation_sizes":
            kwargs[f.name] = tuple(_coerce(v, "tuple[int, ...]", f"{where}:{f.name}") for v in value)
        else:
            kwargs[f.name] = _coerce(value, f.type, f"{where}:{f.name}")
    cfg = BigVGANConfig(**kwargs)
    if cfg.resblock != "1" or cfg.activation != "snakebeta":
        raise CheckpointError(
            f"{path}: only resblock '1' with activation 'snakebeta' (BigVGAN v2 as IndexTTS2 ships it) is "
            f"supported, got resblock {cfg.resblock!r}, activation {cfg.activation!r}"
        )
    return cfg


@dataclass(frozen=True)
class CAMPPlusConfig:
    """CAMPPlus constructor arguments. infer_v2 passes only feat_dim/embedding_size; the rest are the
    3D-Speaker defaults that `campplus_cn_common.bin` was trained with."""

    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
