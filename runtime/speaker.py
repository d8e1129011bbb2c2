"""Reference audio -> what synthesis conditions on, through the graphs.

upstream: indextts/infer_v2.py:IndexTTS2.infer_generator, the speaker-prompt block (UPSTREAM.md §2.3)
and the emotion-prompt block (§2.4); the eager counterpart is export/eager.py:prepare_speaker.

Speaker: the file is loaded at 22.05 kHz (librosa's way), resampled to 16 kHz with torchaudio's sinc
filter; SeamlessM4T features -> `semantic_encoder` -> normalized layer-17 features; `semantic_codec`
quantizes them; the reference log-mel at 22.05 kHz; Kaldi fbank -> `campplus` -> style; the quantized
features are length-regulated to the mel's frame count (`length_regulator`) -> the prompt condition.
Upstream recomputes the conditioners per segment; their inputs depend only on the reference, so the
speaker latent (`speaker_conditioner`) and the speaker's own emotion vector (`emotion_conditioner`)
are computed once here and cached with the rest.

IndexTTS-2.5 (UPSTREAM-2.5 §1, I5:651-656): no codec quantization and no speaker latent; the prompt condition
is the length regulator over the RAW features, and the GPT reads the style instead.

Emotion audio: loaded directly at 16 kHz (not resampled from 22.05 kHz, as upstream), features,
`semantic_encoder`, `emotion_conditioner`. Without an emotion reference upstream uses the speaker file
through this same 16 kHz path, so the "target" emotion vector of a plain voice clone is computed from
slightly different samples than the "base" one — reproduced, not simplified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from runtime.errors import InputError
from runtime.executors.base import Executor
from runtime.frontend.audio import AudioSource, check_not_silent, load_audio
from runtime.frontend.features import campplus_features, seamless_features
from runtime.frontend.mel import s2mel_mel
from runtime.frontend.resample import resample_sinc

SPEAKER_SR = 22050      # librosa.load default rate for the speaker prompt
SEMANTIC_SR = 16000     # w2v-BERT and CAMPPlus rate
MIN_FEATURE_FRAMES = 3  # the conformers' subsampling needs 3 frames (about 65 ms of audio)


@dataclass(frozen=True)
class SpeakerPrompt:
    """Everything synthesis needs from one speaker reference (arrays are never written to)."""

    features: np.ndarray          # (1, T, sem_dim) normalized w2v-BERT layer-17 features (spk_cond_emb)
    style: np.ndarray             # (1, 192) CAMPPlus embedding
    prompt_condition: np.ndarray  # (1, T_ref, content_dim) length-regulated quantized (2.5: raw) features
    ref_mel: np.ndarray           # (1, 80, T_ref) 22.05 kHz log-mel of the reference
    spk_latent: np.ndarray | None  # (1, 32, model_dim) speaker_conditioner(features); None for 2.5
    base_emovec: np.ndarray       # (1, model_dim) emotion_conditioner(features)


def semantic_features(graphs: Mapping[str, Executor], audio_16k: np.ndarray, path: AudioSource) -> np.ndarray:
    """16 kHz audio (1, N) -> normalized layer-17 w2v-BERT features (1, T, sem_dim)."""
    feats, mask = seamless_features(audio_16k[0])
    if feats.shape[1] < MIN_FEATURE_FRAMES:
        raise InputError(f"{path}: the reference is too short ({audio_16k.shape[-1] / SEMANTIC_SR:.3f} s); "
                         f"it needs at least {MIN_FEATURE_FRAMES} feature frames (about 65 ms of audio)")
    out = graphs["semantic_encoder"].run({"input_features": feats, "attention_mask": mask.astype(np.int64)})
    return out["features"]


def prepare_speaker(graphs: Mapping[str, Executor], path: AudioSource, version: str = "2.0") -> SpeakerPrompt:
    """Speaker reference file -> SpeakerPrompt (the graphs of an IndexTTS2 `version` export)."""
    audio_22k = load_audio(path, SPEAKER_SR)                                  # (1, N22)
    check_not_silent(audio_22k, path)
    audio_16k = resample_sinc(audio_22k, SPEAKER_SR, SEMANTIC_SR)            # (1, N16)
    features = semantic_features(graphs, audio_16k, path)                    # (1, T, D)
    v20 = version == "2.0"
    s_ref = graphs["semantic_codec"].run({"features": features})["quantized"] if v20 else features   # (1, T, D)
    ref_mel = s2mel_mel(audio_22k)                                           # (1, 80, T_ref)
    fbank = np.ascontiguousarray(campplus_features(audio_16k[0])[None])      # (1, F, 80)
    style = graphs["campplus"].run({"fbank": fbank})["style"]                # (1, 192)
    t_ref = np.array([ref_mel.shape[-1]], np.int64)
    prompt_condition = graphs["length_regulator"].run({"s": s_ref, "ylens": t_ref})["cond"]   # (1, T_ref, C)
    spk_latent = graphs["speaker_conditioner"].run({"features": features})["spk_latent"] if v20 else None
    base_emovec = emotion_vector(graphs, features)                           # (1, D)
    return SpeakerPrompt(features, style, prompt_condition, ref_mel, spk_latent, base_emovec)


def emotion_vector(graphs: Mapping[str, Executor], features: np.ndarray) -> np.ndarray:
    """Semantic features (1, T, D) -> emovec (1, model_dim) (conformer B + perceiver B + emo layers)."""
    return graphs["emotion_conditioner"].run({"features": features})["emovec"]


def prepare_emotion(graphs: Mapping[str, Executor], path: AudioSource) -> np.ndarray:
    """Emotion reference file -> its emovec (1, model_dim); the audio is read straight at 16 kHz."""
    audio_16k = load_audio(path, SEMANTIC_SR)
    check_not_silent(audio_16k, path)
    return emotion_vector(graphs, semantic_features(graphs, audio_16k, path))
