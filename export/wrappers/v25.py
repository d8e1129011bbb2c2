"""Export wrappers of IndexTTS-2.5's own graphs: gpt_prefill (style + language) and semantic_decoder.

upstream: indextts/gpt/model_v2.py (spk_cond_mode="campplus": inference_speech's prefill, MV2:674-768) and
indextts/codec/models.py:EnhancedCodec.decode (CM:205-231) — UPSTREAM-2.5 §4. The other graphs 2.5 runs are
2.0's wrappers unchanged (export/wrappers/audio.py, gpt.py); `all_wrappers("2.5")` assembles the set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import nn

from runtime.contracts import GraphContract, ModelDims
from runtime.errors import CheckpointError

from ..models.unified_voice import LANGUAGE_ROWS, UnifiedVoice
from .base import Feed, WrapperSpec
from .gpt import FEED_STD, GptLimits, _gpt

if TYPE_CHECKING:
    from export.eager import EagerModels


class GptPrefill25(nn.Module):
    """(style (B,192), lang_id (B,), emovec, text_ids without 0/1) -> (logits (B,V), kv (layers,2,B,H,L+6,hd))."""

    def __init__(self, gpt: UnifiedVoice) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, style: torch.Tensor, lang_id: torch.Tensor, emovec: torch.Tensor, text_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gpt.prefill(style, emovec, text_ids, lang_id)


class SemanticDecoderGraph(nn.Module):
    """codes (B,N) -> (s_infer (B,2N,sem),)."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.decoder(codes),)


def _build_prefill(models: "EagerModels") -> nn.Module:
    gpt = _gpt(models)
    if gpt.version != "2.5":
        raise CheckpointError(f"IndexTTS-2.5's gpt_prefill needs a 2.5 GPT, this one is {gpt.version}")
    return GptPrefill25(gpt).eval()


def _build_decoder(models: "EagerModels") -> nn.Module:
    if models.semantic_decoder is None:
        raise CheckpointError("semantic_decoder needs IndexTTS-2.5's codec.pth, which was not loaded")
    return SemanticDecoderGraph(models.semantic_decoder).eval()


def _feed_prefill(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                  rng: np.random.Generator) -> Feed:
    """A CAMPPlus-like style (O(1)), a language id of the table, an emotion vector, text ids in [2, vocab)."""
    b = sizes["batch"]
    limits = GptLimits.from_dims(dims)
    return {"style": (FEED_STD * rng.standard_normal((b, dims.style_dim))).astype(np.float32),
            "lang_id": rng.integers(0, LANGUAGE_ROWS, b, dtype=np.int64),
            "emovec": (FEED_STD * rng.standard_normal((b, dims.model_dim))).astype(np.float32),
            "text_ids": rng.integers(2, limits.text_vocab, (b, sizes["text_len"]), dtype=np.int64)}


def _feed_decoder(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                  rng: np.random.Generator) -> Feed:
    limits = GptLimits.from_dims(dims)
    return {"codes": rng.integers(0, limits.codebook, (sizes["batch"], sizes["code_len"]), dtype=np.int64)}


WRAPPERS_25: dict[str, WrapperSpec] = {
    "gpt_prefill": WrapperSpec(
        build=_build_prefill, feed=_feed_prefill, export_sizes={"batch": 2, "text_len": 7},
        notes="text ids 0/1 removed by the host; language embedding on every text row"),
    "semantic_decoder": WrapperSpec(
        build=_build_decoder, feed=_feed_decoder, export_sizes={"batch": 2, "code_len": 9},
        notes="batch-correct (upstream decodes one sequence)"),
}
