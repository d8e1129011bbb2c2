"""The static sizes of one checkpoint (`ModelDims`) and the axis ranges its graphs can honour.

upstream: indextts/infer_v2.py:IndexTTS2.__init__ (which sizes each submodel is built with) and
indextts/gpt/model_v2.py:UnifiedVoice.__init__ (the position tables that bound text and code lengths).

Why a module of its own: the contracts of runtime/contracts.py name their static dimensions
(`sem_dim`, `model_dim`, ...) and the export, the dummy inputs, the manifest and the engine profiles all
need the numbers of *this* checkpoint. They are read from `config.yaml` and the auxiliary models'
own configs, never from loaded weights, so that `export.build` can decide that nothing needs rebuilding
without loading any model. Sizes that several files state must agree (e.g. the DiT's style width and
CAMPPlus's embedding width); a disagreement is a `CheckpointError` listing every conflict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Mapping

from runtime.contracts import DERIVED_AXES, AxisRange, GraphContract, ModelDims, build_contracts
from runtime.errors import CheckpointError

from .checkpoint import as_state_dict, read_torch_file
from .config import CAMPPlusConfig, IndexTTS2Config, load_bigvgan_config
from .layout import CheckpointLayout

if TYPE_CHECKING:
    from .eager import EagerModels

#: Perceiver latents of the speaker conditioner (UnifiedVoice `condition_num_latent`, not in config.yaml).
N_LATENTS = 32


def model_dims(layout: CheckpointLayout, models: "EagerModels | None" = None) -> ModelDims:
    """`ModelDims` of the checkpoint at `layout`.

    `models` (already loaded) saves re-reading the CAMPPlus file, whose sizes exist only in its weights.
    """
    cfg = layout.config
    problems: list[str] = []
    for section in ("gpt", "semantic_codec", "s2mel"):
        if getattr(cfg, section) is None:
            problems.append(f"{layout.root / 'config.yaml'}: section '{section}' is missing")
    if problems:
        raise CheckpointError("; ".join(problems))
    campplus = _campplus_config(layout, models)
    dims = _dims_from(cfg, campplus, _w2v_feature_dim(layout))
    problems = _agreement_problems(layout, cfg, dims)
    if problems:
        raise CheckpointError(f"{layout.root}: the model configs disagree: " + "; ".join(problems))
    return dims


def _dims_from(cfg: IndexTTS2Config, campplus: CAMPPlusConfig, feat_dim: int) -> ModelDims:
    assert cfg.gpt is not None and cfg.semantic_codec is not None and cfg.s2mel is not None
    gpt = cfg.gpt
    if gpt.model_dim % gpt.heads:
        raise CheckpointError(f"config.yaml: gpt.model_dim {gpt.model_dim} is not divisible by gpt.heads {gpt.heads}")
    return ModelDims(
        sem_dim=cfg.semantic_codec.hidden_size,
        model_dim=gpt.model_dim,
        content_dim=cfg.s2mel.length_regulator.channels,
        vocab=gpt.number_mel_codes,
        layers=gpt.layers,
        heads=gpt.heads,
        head_dim=gpt.model_dim // gpt.heads,
        style_dim=campplus.embedding_size,
        n_latents=N_LATENTS,
        mel_bins=cfg.s2mel.preprocess_params.spect_params.n_mels,
        feat_dim=feat_dim,
        fbank_bins=campplus.feat_dim,
        text_vocab=gpt.number_text_tokens,
        max_text_tokens=gpt.max_text_tokens,
        max_mel_tokens=gpt.max_mel_tokens,
    )


def _campplus_config(layout: CheckpointLayout, models: "EagerModels | None") -> CAMPPlusConfig:
    """CAMPPlus ships no config: its sizes are read off its state dict (or the loaded module)."""
    if models is not None and isinstance(getattr(models.campplus, "cfg", None), CAMPPlusConfig):
        return models.campplus.cfg
    from .models.campplus import campplus_config_from_state

    path = layout.require("campplus")
    return campplus_config_from_state(as_state_dict(read_torch_file(path), path), path)


def _w2v_feature_dim(layout: CheckpointLayout) -> int:
    from .models.w2v_bert import read_w2v_config

    return int(read_w2v_config(layout.require("w2v_bert")).feature_projection_input_dim)


def _agreement_problems(layout: CheckpointLayout, cfg: IndexTTS2Config, dims: ModelDims) -> list[str]:
    """Every pair of places that state the same size and disagree (one message each)."""
    assert cfg.s2mel is not None
    from .models.w2v_bert import read_w2v_config

    s2mel = cfg.s2mel
    w2v_width = read_w2v_config(layout.require("w2v_bert")).hidden_size
    vocoder = load_bigvgan_config(layout.require("bigvgan") / "config.json")
    hop = DERIVED_AXES["wav_len"][1]
    pairs = [
        ("semantic_codec.hidden_size", dims.sem_dim, "w2v-bert hidden_size", w2v_width),
        ("semantic_codec.hidden_size", dims.sem_dim, "s2mel.length_regulator.in_channels",
         s2mel.length_regulator.in_channels),
        ("s2mel.length_regulator.channels", dims.content_dim, "s2mel.DiT.content_dim", s2mel.DiT.content_dim),
        ("CAMPPlus embedding size", dims.style_dim, "s2mel.style_encoder.dim", s2mel.style_encoder.dim),
        ("s2mel n_mels", dims.mel_bins, "s2mel.DiT.in_channels", s2mel.DiT.in_channels),
        ("s2mel n_mels", dims.mel_bins, "BigVGAN num_mels", vocoder.num_mels),
        ("contract wav_len hop", hop, "BigVGAN prod(upsample_rates)", math.prod(vocoder.upsample_rates)),
    ]
    return [f"{a} = {va} but {b} = {vb}" for a, va, b, vb in pairs if va != vb]


# ---------------------------------------------------------------------------------------------------
# Axis ranges bounded by the checkpoint


def axis_limits(cfg: IndexTTS2Config) -> dict[str, int]:
    """Hard upper bounds a checkpoint puts on dynamic axes: the GPT's learned position tables.

    The text table has max_text_tokens + 2 rows (start/stop around the text), the mel table
    max_mel_tokens + 3 (start, codes, stop, one conditioning slot): longer inputs index past the
    tables. The contracts' ranges are the real checkpoint's values; a smaller (demo) checkpoint is
    bounded lower, and its engine profiles, dummy inputs and export `Dim`s must be too.
    """
    if cfg.gpt is None:
        return {}
    return {"text_len": cfg.gpt.max_text_tokens, "code_len": cfg.gpt.max_mel_tokens}


def clip_ranges(contract: GraphContract, limits: Mapping[str, int]) -> GraphContract:
    """`contract` with each range's max (and opt, min) lowered to the checkpoint's limit for that axis."""
    ranges: dict[str, AxisRange] = {}
    for axis, rng in contract.ranges.items():
        cap = limits.get(axis)
        if cap is None or rng.max <= cap:
            ranges[axis] = rng
            continue
        low = min(rng.min, cap)
        ranges[axis] = AxisRange(low, max(low, min(rng.opt, cap)), cap)
    return dataclasses.replace(contract, ranges=ranges)


def checkpoint_contracts(dims: ModelDims, cfg: IndexTTS2Config, version: str = "2.0") -> dict[str, GraphContract]:
    """The version's contracts at this checkpoint's sizes, ranges clipped to what the checkpoint can honour."""
    limits = axis_limits(cfg)
    return {name: clip_ranges(c, limits) for name, c in build_contracts(dims, version).items()}
