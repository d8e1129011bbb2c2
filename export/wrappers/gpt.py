"""Export wrappers of the GPT-side graphs: speaker_conditioner, emotion_conditioner, gpt_prefill, gpt_decode,
gpt_latent (DESIGN.md §3), each a thin shell over the eager modules of export/models/.

upstream: indextts/gpt/model_v2.py:UnifiedVoice (get_conditioning, get_emovec, inference_speech's prefill and
KV-cached steps, forward(return_latent)) and indextts/infer_v2.py's `gpt_layer(latent) + vq2emb(codes)` —
UPSTREAM.md §3.1.3-§3.1.7, §3.2.1. The math lives in UnifiedVoice; the wrappers only fix the graph interface:

- the conditioners take `features` alone: every frame is valid, so the length input is `T` built inside the
  graph (upstream passes lengths = 1024 >= T at B = 1, which masks nothing either);
- `gpt_decode` takes one cache input per layer (`kv_cache.<i>`), never one stacked cache sliced inside the
  graph: the runtime binds each layer's contiguous slice of its own allocation, and a slice in the graph
  would cost a full-cache copy per step (DESIGN.md §3). Its forward has a flat, layer-count-dependent
  signature (`decode_wrapper_class`), so torch.export sees one named input per contract input;
- `gpt_latent` composes the teacher-forced pass, s2mel `gpt_layer` and the codec's `vq2emb`; its text ids
  are NOT filtered (upstream keeps ids 0 / 1 in the latent pass, unlike the prefill).

Feed rules make inputs the real pipeline could produce: text ids inside the text vocabulary (without 0 / 1
for the prefill), codes inside the codebook, a decode cache whose first rows are valid (kv_mask 1) and
whose padding rows at the end hold random values under kv_mask 0, with mel positions consistent with the
filled length (the k-th code sits in cache row P + k - 1 and is fed at mel position k + 1).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import nn

from runtime.contracts import GraphContract, ModelDims, kv_cache_name
from runtime.errors import CheckpointError
from runtime.contracts import PREFILL_EXTRA_ROWS

from ..models.unified_voice import UnifiedVoice
from .base import Feed, WrapperSpec

if TYPE_CHECKING:
    from export.eager import EagerModels

#: Scale of the synthetic `spk_latent` / `emovec` / feature inputs: the real ones are O(1) per element
#: (perceiver RMSNorm output, normalized w2v-BERT features).
FEED_STD = 1.0


# ---------------------------------------------------------------------------------------------------
# What a checkpoint can take (sizes the contracts do not carry)


@dataclass(frozen=True)
class GptLimits:
    """Vocabulary and position-table sizes of one GPT checkpoint that bound valid inputs."""

    text_vocab: int          # valid text ids are < this (config number_text_tokens; the table has one more row)
    max_text_tokens: int     # text_len <= this (text position table: max_text_tokens + 2 rows)
    max_mel_tokens: int      # mel positions < max_mel_tokens + 3; code_len <= max_mel_tokens + 1
    codebook: int            # codes are < this (number_mel_codes - 2 = the semantic codec's codebook)

    @classmethod
    def of(cls, model: UnifiedVoice) -> "GptLimits":
        cfg = model.cfg
        return cls(cfg.number_text_tokens, cfg.max_text_tokens, cfg.max_mel_tokens, cfg.number_mel_codes - 2)

    @classmethod
    def from_dims(cls, dims: ModelDims) -> "GptLimits":
        return cls(dims.text_vocab, dims.max_text_tokens, dims.max_mel_tokens, dims.vocab - 2)


def _gpt(models: "EagerModels") -> UnifiedVoice:
    if models.gpt is None:
        raise CheckpointError("the GPT graphs need the GPT: load the models with with_gpt=True")
    return models.gpt  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Wrapper modules


def _all_frames(features: torch.Tensor) -> torch.Tensor:
    """lengths (B,) = T for every row: the conditioners' contract says every frame is valid."""
    b, t = features.shape[0], features.shape[1]
    return torch.full((b,), t, dtype=torch.int64, device=features.device)


class SpeakerConditioner(nn.Module):
    """features (B,T,sem) -> (spk_latent (B,32,D),): conformer A + perceiver A."""

    def __init__(self, gpt: UnifiedVoice) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.gpt.speaker_conditioner(features, _all_frames(features)),)


class EmotionConditioner(nn.Module):
    """features (B,T,sem) -> (emovec (B,D),): conformer B + perceiver B + emovec_layer + emo_layer."""

    def __init__(self, gpt: UnifiedVoice) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.gpt.emotion_conditioner(features, _all_frames(features)),)


class GptPrefill(nn.Module):
    """(spk_latent, emovec, text_ids without 0/1) -> (logits (B,V), kv (layers,2,B,H,L+37,hd))."""

    def __init__(self, gpt: UnifiedVoice) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, spk_latent: torch.Tensor, emovec: torch.Tensor, text_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gpt.prefill(spk_latent, emovec, text_ids)


class GptDecode(nn.Module):
    """(mel_ids, mel_pos, kv_cache.0 .. kv_cache.<layers-1>, kv_mask) -> (logits (B,V), kv_new).

    Built through `decode_wrapper_class`, which gives `forward` the flat named signature of the contract.
    """

    def __init__(self, gpt: UnifiedVoice) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = len(self.gpt.gpt.h)
        if len(inputs) != layers + 3:
            raise TypeError(f"gpt_decode takes {layers + 3} inputs (mel_ids, mel_pos, {layers} caches, kv_mask), "
                            f"got {len(inputs)}")
        mel_ids, mel_pos, caches, kv_mask = inputs[0], inputs[1], list(inputs[2:-1]), inputs[-1]
        return self.gpt.decode(mel_ids, mel_pos, caches, kv_mask)


def _identifier(name: str) -> str:
    return name.replace(".", "_")


def decode_wrapper_class(input_names: tuple[str, ...]) -> type[GptDecode]:
    """A GptDecode subclass whose `forward` signature lists `input_names` one by one.

    torch.export binds inputs and `dynamic_shapes` through `inspect.signature(forward)`; with a bare
    `*inputs` it sees one tuple argument and rejects the contract's flat per-input dynamic shapes.
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", kind)] + [inspect.Parameter(_identifier(n), kind) for n in input_names]

    def forward(self: GptDecode, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return GptDecode.forward(self, *inputs)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return type(f"GptDecode{len(input_names) - 3}", (GptDecode,), {"forward": forward})


class GptLatent(nn.Module):
    """(spk_latent, emovec, text_ids (unfiltered), codes) -> (s_infer (B,N,sem),):
    gpt_layer(latent) + vq2emb(codes)ᵀ, as infer_v2 builds S_infer."""

    def __init__(self, gpt: UnifiedVoice, gpt_layer: nn.Module, codec: nn.Module) -> None:
        super().__init__()
        self.gpt, self.gpt_layer, self.codec = gpt, gpt_layer, codec

    def forward(self, spk_latent: torch.Tensor, emovec: torch.Tensor, text_ids: torch.Tensor,
                codes: torch.Tensor) -> tuple[torch.Tensor]:
        latent = self.gpt.latent(spk_latent, emovec, text_ids, codes)             # (B,N,D)
        return (self.codec.vq2emb(codes).transpose(1, 2) + self.gpt_layer(latent),)


def _build_decode(models: "EagerModels") -> nn.Module:
    gpt = _gpt(models)
    caches = tuple(kv_cache_name(i) for i in range(len(gpt.gpt.h)))
    return decode_wrapper_class(("mel_ids", "mel_pos") + caches + ("kv_mask",))(gpt).eval()


def _build_latent(models: "EagerModels") -> nn.Module:
    gpt_layer = models.s2mel.gpt_layer
    if gpt_layer is None:
        raise CheckpointError("gpt_latent needs s2mel's gpt_layer, which was not loaded")
    return GptLatent(_gpt(models), gpt_layer, models.semantic_codec).eval()


# ---------------------------------------------------------------------------------------------------
# Feed rules


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (FEED_STD * rng.standard_normal(shape)).astype(np.float32)


def _feed_features(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                   rng: np.random.Generator) -> Feed:
    return {"features": _normal(rng, contract.inputs[0].concrete(dims, sizes))}


def _conditioning(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                  rng: np.random.Generator) -> Feed:
    spec = {t.name: t for t in contract.inputs}
    return {name: _normal(rng, spec[name].concrete(dims, sizes)) for name in ("spk_latent", "emovec")}


def _feed_prefill(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                  rng: np.random.Generator) -> Feed:
    """Text ids in [2, text_vocab): the host has removed 0 / 1 (the start / stop text ids)."""
    limits = GptLimits.from_dims(dims)
    ids = rng.integers(2, limits.text_vocab, (sizes["batch"], sizes["text_len"]), dtype=np.int64)
    return {**_conditioning(contract, dims, sizes, rng), "text_ids": ids}


def _feed_latent(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                 rng: np.random.Generator) -> Feed:
    """Text ids in [0, text_vocab) with a 0 and a 1 planted (the latent pass keeps them); codes in the codebook."""
    limits = GptLimits.from_dims(dims)
    b = sizes["batch"]
    ids = rng.integers(2, limits.text_vocab, (b, sizes["text_len"]), dtype=np.int64)
    ids[:, rng.integers(0, ids.shape[1])] = rng.integers(0, 2)
    codes = rng.integers(0, limits.codebook, (b, sizes["code_len"]), dtype=np.int64)
    return {**_conditioning(contract, dims, sizes, rng), "text_ids": ids, "codes": codes}


def _feed_decode(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                 rng: np.random.Generator) -> Feed:
    """Row b of the cache holds n_b valid rows (row 0: all S; the others between the smallest prefill and S),
    then padding rows of random values under kv_mask 0. The fed code's mel position is n_b - P_b + 2 for
    some prefill length P_b >= 38, kept inside the checkpoint's mel position table."""
    limits = GptLimits.from_dims(dims)
    b, s = sizes["batch"], sizes["cache_len"]
    smallest = PREFILL_EXTRA_ROWS + 1                       # a one-token text: P = 38
    filled = rng.integers(min(smallest, s), s + 1, b)
    filled[0] = s
    max_pos = np.minimum(filled - smallest + 2, limits.max_mel_tokens + 2)
    mel_pos = np.array([rng.integers(2, max(hi, 2) + 1) for hi in max_pos], np.int64)[:, None]
    kv_mask = (np.arange(s)[None, :] < filled[:, None]).astype(np.float32)
    feed: Feed = {"mel_ids": rng.integers(0, limits.codebook, (b, 1), dtype=np.int64), "mel_pos": mel_pos}
    for spec in contract.inputs[2:-1]:
        feed[spec.name] = _normal(rng, spec.concrete(dims, sizes))
    feed["kv_mask"] = kv_mask
    return feed


# ---------------------------------------------------------------------------------------------------
# Registry

_NOTES_COND = "every frame valid: lengths = T inside the graph"
WRAPPERS: dict[str, WrapperSpec] = {
    "speaker_conditioner": WrapperSpec(
        build=lambda models: SpeakerConditioner(_gpt(models)).eval(), feed=_feed_features,
        export_sizes={"batch": 2, "feat_len": 37}, notes=_NOTES_COND),
    "emotion_conditioner": WrapperSpec(
        build=lambda models: EmotionConditioner(_gpt(models)).eval(), feed=_feed_features,
        export_sizes={"batch": 2, "feat_len": 37}, notes=_NOTES_COND),
    "gpt_prefill": WrapperSpec(
        build=lambda models: GptPrefill(_gpt(models)).eval(), feed=_feed_prefill,
        export_sizes={"batch": 2, "text_len": 7}, notes="text ids 0/1 removed by the host"),
    "gpt_decode": WrapperSpec(
        build=_build_decode, feed=_feed_decode, export_sizes={"batch": 3, "cache_len": 45},
        notes="per-layer cache inputs, read only; padding rows under kv_mask 0 are ignored"),
    "gpt_latent": WrapperSpec(
        build=_build_latent, feed=_feed_latent, export_sizes={"batch": 2, "text_len": 7, "code_len": 11},
        notes="text ids unfiltered (0/1 kept), as upstream's latent pass"),
}
