"""MaskGCT RepCodec semantic codec: encoder + factorized VQ lookup (`quantize`) and code -> embedding (`vq2emb`).

upstream: indextts/utils/maskgct/models/codec/kmeans/repcodec_model.py:RepCodec.quantize and
indextts/utils/maskgct/models/codec/amphion_codec/quantize (ResidualVQ / FactorizedVectorQuantize
`vq2emb`), with the VocosBackbone of indextts/utils/maskgct/models/codec/amphion_codec/vocos.py
(UPSTREAM.md §2.0 item 3, §2.3 item 5, §3.3).

Inference builds only what `quantize` / `vq2emb` use: `encoder.*` and `quantizer.quantizers.0.*`.
The original `model.safetensors` also holds `decoder.*` (a mirror VocosBackbone + Linear used only in
training); the loader ignores it. With num_quantizers 1 the residual loop is a single step, so the
quantizer is written out directly (no Python loop, no `if indices.shape[0] == 1` squeeze).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


from ..checkpoint import fold_weight_norm, load_into, read_safetensors, unfold_weight_norm
from ..config import SemanticCodecConfig

log = logging.getLogger(__name__)

#: Every LayerNorm of the VocosBackbone (UPSTREAM §3.3).
VOCOS_LN_EPS = 1e-6
#: `F.normalize`'s default epsilon (the L2-normalized lookup).
L2_EPS = 1e-12
QUANTIZER = "quantizer.quantizers.0"


class ConvNeXtBlock(nn.Module):
    """`x + gamma * pw2(GELU_erf(pw1(LN(dwconv_k7(x)))))` on (B,C,T); LN over channels, eps 1e-6."""

    def __init__(self, dim: int, intermediate_dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=VOCOS_LN_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()  # exact (erf) GELU; the tanh approximation fails the fixture's encoder_out
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    """(B, C_in, T) -> (B, T, dim): Conv1d k7 -> LN -> ConvNeXt blocks -> final LN (no AdaLN)."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=VOCOS_LN_EPS)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=VOCOS_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


def build_coder(cfg: SemanticCodecConfig) -> nn.Sequential:
    """`encoder` (and the training-only `decoder` mirror): VocosBackbone(hidden -> vocos) + Linear(vocos -> hidden)."""
    return nn.Sequential(
        VocosBackbone(cfg.hidden_size, cfg.vocos_dim, cfg.vocos_intermediate_dim, cfg.vocos_num_layers),
        nn.Linear(cfg.vocos_dim, cfg.hidden_size),
    )


class FactorizedVQ(nn.Module):
    """FactorizedVectorQuantize at inference: 1x1 in/out projections (weight norm folded) + codebook.

    Lookup: `argmin ||e - c||^2` between the L2-normalized projection e and the L2-normalized codebook
    rows, computed in upstream's distance form `|e|^2 - 2 e.c + |c|^2`. The selected RAW (un-normalized)
    codebook row goes through `out_project`.
    """

    def __init__(self, hidden_size: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_project = nn.Conv1d(hidden_size, codebook_dim, kernel_size=1)
        self.out_project = nn.Conv1d(codebook_dim, hidden_size, kernel_size=1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        # Derived at load by `prepare()` (constants of the lookup; not in the checkpoint).
        self.register_buffer("codebook_unit", torch.zeros(codebook_size, codebook_dim), persistent=False)
        self.register_buffer("codebook_sq", torch.zeros(codebook_size), persistent=False)

    @torch.no_grad()
    def prepare(self) -> None:
        """Precompute the normalized codebook and its squared norms (what upstream recomputes per call)."""
        unit = F.normalize(self.codebook.weight, dim=1, eps=L2_EPS)
        self.codebook_unit.copy_(unit)
        self.codebook_sq.copy_(unit.pow(2).sum(1))

    def lookup(self, z_e: torch.Tensor) -> torch.Tensor:
        """z_e (B, D, T) -> indices (B, T) int64."""
        e = F.normalize(z_e.transpose(1, 2), dim=-1, eps=L2_EPS)             # (B,T,D)
        dist = e.pow(2).sum(-1, keepdim=True) - 2 * torch.matmul(e, self.codebook_unit.t()) + self.codebook_sq
        return torch.argmax(-dist, dim=-1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N) int64 -> out_project(raw codebook rows) (B, hidden, N)."""
        return self.out_project(F.embedding(codes, self.codebook.weight).transpose(1, 2))


class SemanticCodec(nn.Module):
    """RepCodec inference part. `forward(x)` = `quantize(x)`; `vq2emb(codes)` for any batch size."""

    def __init__(self, cfg: SemanticCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_coder(cfg)
        self.quantizer = nn.Module()
        self.quantizer.quantizers = nn.ModuleList(
            [FactorizedVQ(cfg.hidden_size, cfg.codebook_size, cfg.codebook_dim)])

    @property
    def vq(self) -> FactorizedVQ:
        return self.quantizer.quantizers[0]  # type: ignore[index,return-value]

    def quantize_parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B,T,H) -> indices (B,T), quantized (B,T,H), z_e (B,D,T), encoder_out (B,H,T)."""
        encoder_out = self.encoder(x.transpose(1, 2)).transpose(1, 2)      # (B,H,T)
        z_e = self.vq.in_project(encoder_out)                                # (B,D,T)
        indices = self.vq.lookup(z_e)
        quantized = self.vq.embed(indices).transpose(1, 2)                   # (B,T,H)
        return {"indices": indices, "quantized": quantized, "z_e": z_e, "encoder_out": encoder_out}

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,T,H) -> (codes (B,T) int64, quantized (B,T,H)), as upstream's `RepCodec.quantize`."""
        parts = self.quantize_parts(x)
        return parts["indices"], parts["quantized"]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(x)

    def vq2emb(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B,N) int64 -> (B,H,N).

        Upstream is called as `quantizer.vq2emb(codes.unsqueeze(1))`, which takes `vq[0]` = batch row 0
        as "quantizer 0's codes": right only for B = 1. Here every row is embedded (same numbers for B = 1).
        """
        return self.vq.embed(codes)


# ----------------------------------------------------------------------------------------------
# Loading


def _ignored_keys() -> list[str]:
    # `decoder.*`: RepCodec's reconstruction decoder (VocosBackbone + Linear), present in the file and
    # loaded strictly upstream, but only used in training; quantize / vq2emb never touch it.
    return ["decoder.*"]


def load_semantic_codec(path: str | Path, cfg: SemanticCodecConfig) -> SemanticCodec:
    """Read MaskGCT `semantic_codec/model.safetensors` (RepCodec keys, weight-normed projections), eval mode."""
    path = Path(path)
    state = fold_weight_norm(read_safetensors(path))
    model = SemanticCodec(cfg)
    load_into(model, state, str(path), ignore=_ignored_keys())
    model.vq.prepare()
    log.info("semantic codec: loaded %s (codebook %d x %d)", path, cfg.codebook_size, cfg.codebook_dim)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Demo checkpoint


def random_param(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Fixture-style init: W ~ N(0, 1/fan_in), biases N(0, 0.1), norm scales 1 + N(0, 0.1), codebook N(0, 0.3).

    The ConvNeXt layer scale `gamma` is drawn small (N(0.1, 0.02)) so that 12 residual blocks add up
    to a sane residual stream instead of growing with depth.
    """
    if name.endswith("codebook.weight"):
        return torch.randn(shape, generator=gen) * 0.3
    if name.endswith(".gamma"):
        return 0.1 + torch.randn(shape, generator=gen) * 0.02
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen) * 0.1
    if len(shape) == 1:  # LayerNorm scales
        return 1.0 + torch.randn(shape, generator=gen) * 0.1
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def demo_codec_state(cfg: SemanticCodecConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random state dict with the full original key set (encoder, decoder mirror, weight-normed quantizer)."""
    shapes = {k: tuple(v.shape) for k, v in SemanticCodec(cfg).state_dict().items()}
    shapes.update({f"decoder.{k}": tuple(v.shape) for k, v in build_coder(cfg).state_dict().items()})
    state = {name: random_param(name, shapes[name], generator).float().contiguous() for name in sorted(shapes)}
    return unfold_weight_norm(state, [f"{QUANTIZER}.in_project.weight", f"{QUANTIZER}.out_project.weight"])


def write_demo_semantic_codec(path: str | Path, cfg: SemanticCodecConfig, generator: torch.Generator) -> Path:
    """Write MaskGCT's `semantic_codec/model.safetensors` layout with seeded random weights."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in demo_codec_state(cfg, generator).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path
