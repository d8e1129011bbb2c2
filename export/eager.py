"""The eager IndexTTS2 models loaded from one checkpoint directory, and the stages around the GPT.

upstream: indextts/infer_v2.py:IndexTTS2.__init__ (loading), infer_generator (speaker preparation,
the s2mel + vocoder part of each segment) — UPSTREAM.md §2.0, §2.3, §2.7 step 5-7.

`EagerModels.load` reads every submodel through its loader; `prepare_speaker` turns a reference file
into the cached conditioning upstream keeps per speaker; `codes_to_wav` is the per-segment tail:
gpt_layer(latent) + vq2emb(codes) → length regulator → CFM (prompt + target) → BigVGAN. The GPT
(codes and latent) is the next stage and plugs in front of `codes_to_wav`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.frontend.audio import check_not_silent, load_audio
from runtime.cfm import mel_length
from runtime.errors import CheckpointError
from runtime.frontend.features import campplus_features, seamless_features
from runtime.frontend.mel import s2mel_mel
from runtime.frontend.resample import resample_sinc

from .checkpoint import as_state_dict, read_torch_file
from .layout import CheckpointLayout
from .models.bigvgan import load_bigvgan
from .models.campplus import campplus_config_from_state, load_campplus
from .models.cfm import cfm_inference
from .models.s2mel import PARTS as S2MEL_PARTS, load_s2mel
from .models.semantic_codec import load_semantic_codec
from .models.semantic_decoder import load_semantic_decoder
from .models.unified_voice import load_gpt
from .models.w2v_bert import load_semantic_encoder

log = logging.getLogger(__name__)

SPEAKER_SR = 22050      # librosa.load default rate for the speaker prompt
SEMANTIC_SR = 16000     # w2v-BERT and CAMPPlus rate
#: 2.5's s2mel has no gpt_layer (its file still stores one, ignored: UPSTREAM-2.5 §2)
S2MEL_PARTS_25 = ("length_regulator", "cfm")


@dataclass
class EagerModels:
    """Every submodel, in eval mode, from one checkpoint directory (the GPT optional). 2.0 has the MaskGCT
    codec (`semantic_codec`), 2.5 the codec decoder of codec.pth (`semantic_decoder`) instead."""

    layout: CheckpointLayout
    semantic_encoder: nn.Module
    semantic_codec: nn.Module | None
    campplus: nn.Module
    s2mel: nn.Module
    bigvgan: nn.Module
    gpt: nn.Module | None = None
    semantic_decoder: nn.Module | None = None
    version: str = "2.0"

    @classmethod
    def load(cls, checkpoints: str | Path, with_gpt: bool = True) -> "EagerModels":
        layout = CheckpointLayout.open(checkpoints)
        cfg = layout.config
        for section in ("s2mel", "semantic_codec"):
            if getattr(cfg, section) is None:
                raise CheckpointError(f"{layout.root / 'config.yaml'}: section '{section}' is missing")
        assert cfg.s2mel is not None and cfg.semantic_codec is not None
        gpt_dim = cfg.gpt.model_dim if cfg.gpt is not None else 1280
        version = layout.version
        t0 = time.perf_counter()
        v20 = version == "2.0"
        models = cls(
            layout=layout,
            semantic_encoder=load_semantic_encoder(layout.require("w2v_bert"), layout.require("w2v_stats")),
            semantic_codec=load_semantic_codec(layout.require("semantic_codec"), cfg.semantic_codec) if v20 else None,
            campplus=_load_campplus(layout.require("campplus")),
            s2mel=load_s2mel(layout.require("s2mel"), cfg.s2mel, gpt_dim=gpt_dim,
                             parts=S2MEL_PARTS if v20 else S2MEL_PARTS_25),
            bigvgan=load_bigvgan(layout.require("bigvgan")),
            gpt=_load_gpt(layout) if with_gpt else None,
            semantic_decoder=None if v20 else load_semantic_decoder(layout.require("codec"), cfg.semantic_codec),
            version=version,
        )
        log.info("loaded IndexTTS2 %s models from %s in %.1f s", version, layout.root, time.perf_counter() - t0)
        return models


def _load_gpt(layout: CheckpointLayout) -> nn.Module:
    cfg = layout.config
    if cfg.gpt is None:
        raise CheckpointError(f"{layout.root / 'config.yaml'}: section 'gpt' is missing")
    assert cfg.semantic_codec is not None
    return load_gpt(layout.require("gpt"), cfg.gpt, semantic_dim=cfg.semantic_codec.hidden_size, version=layout.version)


def _load_campplus(path: Path) -> nn.Module:
    """CAMPPlus has no config file; its sizes are read off the weights (the real file gives the
    3D-Speaker defaults infer_v2 uses)."""
    cfg = campplus_config_from_state(as_state_dict(read_torch_file(path), path), path)
    return load_campplus(path, cfg)


@dataclass
class SpeakerPrompt:
    """What upstream caches per speaker reference (UPSTREAM §2.3 step 9)."""

    spk_cond_emb: torch.Tensor      # (1, T, D) normalized w2v-BERT layer-17 features
    style: torch.Tensor             # (1, 192) CAMPPlus embedding
    prompt_condition: torch.Tensor  # (1, T_ref, C) length-regulated quantized semantic features
    ref_mel: torch.Tensor           # (1, 80, T_ref) 22.05 kHz log-mel of the reference


def semantic_features(models: EagerModels, audio_16k: np.ndarray) -> torch.Tensor:
    """16 kHz audio (1, N) -> normalized layer-17 w2v-BERT features (1, T, D)."""
    feats, mask = seamless_features(audio_16k[0])
    return models.semantic_encoder(torch.from_numpy(feats), torch.from_numpy(mask.astype(np.int64)))


@torch.inference_mode()
def emotion_features(models: EagerModels, path: str | Path) -> torch.Tensor:
    """Emotion reference file -> (1, T, D): upstream loads it straight at 16 kHz (UPSTREAM §2.4)."""
    audio_16k = load_audio(path, SEMANTIC_SR)
    check_not_silent(audio_16k, path)
    return semantic_features(models, audio_16k)


@torch.inference_mode()
def prepare_speaker(models: EagerModels, path: str | Path) -> SpeakerPrompt:
    """Speaker reference file -> SpeakerPrompt, as upstream's infer_v2 prepares it."""
    audio_22k = load_audio(path, SPEAKER_SR)                                 # (1, N22)
    check_not_silent(audio_22k, path)
    audio_16k = resample_sinc(audio_22k, SPEAKER_SR, SEMANTIC_SR)           # (1, N16)
    spk_cond_emb = semantic_features(models, audio_16k)                     # (1, T, D)
    if models.semantic_codec is not None:                                   # 2.0: the quantized features
        _, s_ref = models.semantic_codec.quantize(spk_cond_emb)             # (1, T, D)
    else:                                                                   # 2.5: the raw features (I5:651-656)
        s_ref = spk_cond_emb
    ref_mel = torch.from_numpy(s2mel_mel(audio_22k))                        # (1, 80, T_ref)
    fbank = torch.from_numpy(campplus_features(audio_16k[0]))[None]         # (1, F, 80)
    style = models.campplus(fbank)                                          # (1, 192)
    t_ref = torch.tensor([ref_mel.shape[-1]], dtype=torch.int64)
    prompt_condition, _ = models.s2mel.length_regulator(s_ref, t_ref)       # (1, T_ref, C)
    return SpeakerPrompt(spk_cond_emb, style, prompt_condition, ref_mel)


@torch.inference_mode()
def codes_to_mel(models: EagerModels, prompt: SpeakerPrompt, codes: torch.Tensor, latent: torch.Tensor,
                 noise: torch.Tensor, steps: int = 25, cfg_rate: float = 0.7) -> torch.Tensor:
    """2.0: codes (1, N) int64, latent (1, N, gpt_dim), noise (1, 80, T_ref + T_gen) -> mel (1, 80, T_gen)."""
    s_infer = models.semantic_codec.vq2emb(codes).transpose(1, 2) + models.s2mel.gpt_layer(latent)  # (1, N, D)
    return s_infer_to_mel(models, prompt, s_infer, mel_length(codes.shape[1]), noise, steps, cfg_rate)


@torch.inference_mode()
def s_infer_to_mel(models: EagerModels, prompt: SpeakerPrompt, s_infer: torch.Tensor, frames: int,
                   noise: torch.Tensor, steps: int = 25, cfg_rate: float = 0.7) -> torch.Tensor:
    """S_infer (1, N', D) regulated to `frames` target frames, after the prompt, through the CFM -> the
    generated mel (1, 80, frames). 2.0's S_infer is vq2emb + gpt_layer(latent), 2.5's the codec decoder's."""
    s2mel = models.s2mel
    target = torch.tensor([frames], dtype=torch.int64)
    cond, _ = s2mel.length_regulator(s_infer, target)                       # (1, T_gen, C)
    cat_condition = torch.cat([prompt.prompt_condition, cond], dim=1)       # (1, T_ref + T_gen, C)
    x_lens = torch.tensor([cat_condition.shape[1]], dtype=torch.int64)
    mel = cfm_inference(s2mel.cfm, cat_condition, x_lens, prompt.ref_mel, prompt.style, noise,
                        n_timesteps=steps, cfg_rate=cfg_rate)               # (1, 80, T_ref + T_gen)
    return mel[:, :, prompt.ref_mel.shape[-1]:]                             # (1, 80, T_gen)


@torch.inference_mode()
def vocode(models: EagerModels, mel: torch.Tensor) -> np.ndarray:
    """mel (1, 80, T) -> float waveform (S,) in [-1, 1] at 22.05 kHz."""
    return models.bigvgan(mel.float())[0, 0].numpy()
