"""Export wrappers of the audio-side graphs: semantic_encoder, semantic_codec, campplus, length_regulator,
dit_step, bigvgan (DESIGN.md §3, contracts in runtime/contracts.py).

Each wrapper is a thin `nn.Module` around an eager module of `export/models/` whose forward takes the
contract's inputs in contract order and returns the contract's outputs as a tuple; no model code is
re-implemented here. Each feed rule makes inputs that are VALID for the graph (the values the runtime
would feed: masks with at least one valid frame, lengths consistent with the axis sizes), because parity
on invalid inputs (e.g. an all-padded row) tests nothing the runtime relies on.

Exporter: every graph here uses the dynamo exporter (opset 18, `dynamic_shapes` from the contract),
chosen by measurement on the tiny and the full-size demo checkpoints: all six export with every contract
axis dynamic and match eager to ~1e-5 or better at the contract's min / typical / max shapes (codes
exactly). length_regulator's output length max(ylens) is data: the graph computes it (ReduceMax ->
Range), and the float32 nearest-index rule survives as Cast/Div/Mul/Floor/Clip/Gather (checked
against F.interpolate for 1581 (T_in, T_out) pairs, 40 of which differ from exact integer floor). The
legacy exporter gives the same numbers for length_regulator (it decomposes Mish into
Softplus/Tanh/Mul) but is deprecated; nothing here needs it.

BigVGAN is exported with its anti-aliased activations in phase-separated form
(export/models/alias_free.py:PhaseSeparatedActivation1d; the eager model keeps upstream's structure and
export.verify holds the two equal): in ONNX Runtime on CPU the interleaving Transpose, the long replicate
pad and the strided down-sampling conv of the polyphase form cost ~20 % of the vocoder.

TensorRT notes: bigvgan keeps its 6 stage ConvTranspose1d (the anti-alias up-sampler is a polyphase Conv); length_regulator's output shape is data-dependent (an engine needs an output
allocator or a max-size buffer) and its index arithmetic must stay float32 in an FP16 engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import nn

from runtime.contracts import GraphContract, ModelDims

from ..models.alias_free import phase_separated
from .base import Feed, WrapperSpec

if TYPE_CHECKING:
    from export.eager import EagerModels

#: Euler step of the 25-step solve (upstream t_span = linspace(0, 1, 26)); any small dt is valid.
DIT_DT = 1.0 / 25
DIT_CFG_RATE = 0.7


# ---------------------------------------------------------------------------------------------------
# Wrappers


class SemanticEncoderGraph(nn.Module):
    """(input_features (B,T,160), attention_mask (B,T) int64) -> (features (B,T,sem_dim),).

    The eager SemanticEncoder already ends with the stats normalization and builds the relative-position
    term from T, so the wrapper only fixes the I/O tuple.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(input_features, attention_mask),)


class SemanticCodecGraph(nn.Module):
    """(features (B,T,sem_dim),) -> (codes (B,T) int64, quantized (B,T,sem_dim)) = RepCodec.quantize."""

    def __init__(self, codec: nn.Module) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, quantized = self.codec.quantize(features)
        return codes, quantized


class CAMPPlusGraph(nn.Module):
    """(fbank (B,T,80),) -> (style (B,192),); BatchNorms after convs are already folded at load."""

    def __init__(self, campplus: nn.Module) -> None:
        super().__init__()
        self.campplus = campplus

    def forward(self, fbank: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.campplus(fbank),)


class LengthRegulatorGraph(nn.Module):
    """(s (B,T_in,sem_dim), ylens (B,) int64) -> (cond (B,max(ylens),content_dim),).

    The output length is data: the graph computes max(ylens) itself (the runtime does not pass it).
    """

    def __init__(self, regulator: nn.Module) -> None:
        super().__init__()
        self.regulator = regulator

    def forward(self, s: torch.Tensor, ylens: torch.Tensor) -> tuple[torch.Tensor]:
        cond, _ = self.regulator(s, ylens)
        return (cond,)


class DiTStepGraph(nn.Module):
    """One Euler/CFG step; the eager `CFM` module's forward already is the dit_step contract, with each row
    computed as alone (`rows_alone`: a row padded into a batch of requests equals its own batch-1 step)."""

    def __init__(self, cfm: nn.Module) -> None:
        super().__init__()
        self.cfm = cfm

    def forward(self, x: torch.Tensor, prompt_x: torch.Tensor, x_lens: torch.Tensor, prompt_lens: torch.Tensor,
                t: torch.Tensor, dt: torch.Tensor, style: torch.Tensor, cond: torch.Tensor,
                cfg_rate: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.cfm(x, prompt_x, x_lens, prompt_lens, t, dt, style, cond, cfg_rate, rows_alone=True),)


class BigVGANGraph(nn.Module):
    """(mel (B,80,T),) -> (wav (B,256T),): the generator's (B,1,S) output with the channel axis dropped."""

    def __init__(self, bigvgan: nn.Module) -> None:
        super().__init__()
        self.bigvgan = bigvgan

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.bigvgan(mel).squeeze(1),)


def _s2mel_part(models: "EagerModels", part: str) -> nn.Module:
    module = getattr(models.s2mel, part, None)
    if module is None:
        raise ValueError(f"the loaded s2mel model has no '{part}' part")
    return module


# ---------------------------------------------------------------------------------------------------
# Feed rules (valid inputs of exactly the requested axis sizes)


def _shape(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int], name: str) -> tuple[int, ...]:
    spec = next(s for s in contract.inputs if s.name == name)
    return spec.concrete(dims, sizes)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0, loc: float = 0.0) -> np.ndarray:
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def row_lengths(batch: int, full: int, rng: np.random.Generator, minimum: int = 1) -> np.ndarray:
    """Per-row valid lengths: row 0 is `full` (so the padded axis is exactly as long as the longest row),
    the other rows random in [minimum, full]. -> (B,) int64."""
    minimum = min(minimum, full)
    lens = rng.integers(minimum, full + 1, size=batch).astype(np.int64)
    lens[0] = full
    return lens


def _prefix_mask(lens: np.ndarray, length: int) -> np.ndarray:
    """(B,) lengths -> (B, length) bool, True on the first lens[b] frames."""
    return np.arange(length)[None, :] < lens[:, None]


def feed_semantic_encoder(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                          rng: np.random.Generator) -> Feed:
    """SeamlessM4T-like features; attention mask all ones for row 0, zeros at the tail of rows > 0
    (each row keeps >= 3 valid frames, the smallest clip the contract allows)."""
    b, t, _ = shape = _shape(contract, dims, sizes, "input_features")
    lens = row_lengths(b, t, rng, minimum=3)
    return {"input_features": _normal(rng, shape),
            "attention_mask": _prefix_mask(lens, t).astype(np.int64)}


def feed_semantic_codec(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                        rng: np.random.Generator) -> Feed:
    """Stats-normalized w2v-BERT features are ~N(0, 1) per channel."""
    return {"features": _normal(rng, _shape(contract, dims, sizes, "features"))}


def feed_campplus(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                  rng: np.random.Generator) -> Feed:
    """Log-fbank-like values with the per-row time mean removed (what the runtime front end feeds)."""
    fbank = _normal(rng, _shape(contract, dims, sizes, "fbank"), scale=2.0)
    return {"fbank": (fbank - fbank.mean(axis=1, keepdims=True)).astype(np.float32)}


def feed_length_regulator(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                          rng: np.random.Generator) -> Feed:
    """ylens with max(ylens) == sizes['mel_len'] (the output length) and every ylens >= 1."""
    s = _normal(rng, _shape(contract, dims, sizes, "s"))
    return {"s": s, "ylens": row_lengths(s.shape[0], int(sizes["mel_len"]), rng)}


def feed_dit_step(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                  rng: np.random.Generator) -> Feed:
    """A mid-solve state: x_lens <= T (max == T), 0 <= prompt_lens < x_lens, prompt_x zero after the
    prompt, x zero on the prompt frames (as after any step), t in [0, 1), dt = 1/25, cfg_rate 0.7."""
    b, _, t = shape = _shape(contract, dims, sizes, "x")
    x_lens = row_lengths(b, t, rng, minimum=min(3, t))
    prompt_lens = np.array([rng.integers(0, n) for n in x_lens], dtype=np.int64)
    prompt = _prefix_mask(prompt_lens, t)[:, None, :]                         # (B, 1, T)
    return {
        "x": _normal(rng, shape) * ~prompt,
        "prompt_x": _normal(rng, shape, scale=2.0, loc=-4.0) * prompt,
        "x_lens": x_lens,
        "prompt_lens": prompt_lens,
        "t": rng.uniform(0.0, 1.0, size=b).astype(np.float32),
        "dt": np.full(b, DIT_DT, dtype=np.float32),
        "style": _normal(rng, _shape(contract, dims, sizes, "style")),
        "cond": _normal(rng, _shape(contract, dims, sizes, "cond")),
        "cfg_rate": np.array([DIT_CFG_RATE], dtype=np.float32),
    }


def feed_bigvgan(contract: GraphContract, dims: ModelDims, sizes: Mapping[str, int],
                 rng: np.random.Generator) -> Feed:
    """Log-mel-like values (natural-log magnitudes, mostly in [-11, 2])."""
    return {"mel": _normal(rng, _shape(contract, dims, sizes, "mel"), scale=2.0, loc=-5.0)}


# ---------------------------------------------------------------------------------------------------
# Registry

WRAPPERS: dict[str, WrapperSpec] = {
    "semantic_encoder": WrapperSpec(
        build=lambda m: SemanticEncoderGraph(m.semantic_encoder), feed=feed_semantic_encoder,
        export_sizes={"batch": 2, "feat_len": 16},
        notes="relative-position term built from T in the graph; additive key mask -1e4"),
    "semantic_codec": WrapperSpec(
        build=lambda m: SemanticCodecGraph(m.semantic_codec), feed=feed_semantic_codec,
        export_sizes={"batch": 2, "feat_len": 16},
        notes="codes = ArgMax over the normalized-codebook distance; exact in ORT"),
    "campplus": WrapperSpec(
        build=lambda m: CAMPPlusGraph(m.campplus), feed=feed_campplus,
        export_sizes={"batch": 2, "fbank_len": 240},
        notes="segment pooling as a (T,S) membership matmul + Gather; conv->BN pairs folded at load"),
    "length_regulator": WrapperSpec(
        build=lambda m: LengthRegulatorGraph(_s2mel_part(m, "length_regulator")), feed=feed_length_regulator,
        export_sizes={"batch": 2, "seq_len": 16, "mel_len": 27},
        notes="output length max(ylens) computed in the graph (data-dependent shape); float32 nearest index "
              "as Floor + Gather; GroupNorm(1) as InstanceNormalization; ONNX Mish op (in onnx-tensorrt's "
              "operator list for TRT 10.15, unverified for older 10.x)"),
    "dit_step": WrapperSpec(
        build=lambda m: DiTStepGraph(_s2mel_part(m, "cfm")), feed=feed_dit_step,
        export_sizes={"batch": 2, "mel_len": 16},
        notes="CFG batch stacked inside; additive -1e4 key mask; prompt re-zeroing by mask multiply"),
    "bigvgan": WrapperSpec(
        build=lambda m: BigVGANGraph(m.bigvgan), feed=feed_bigvgan,
        export_build=lambda m: BigVGANGraph(phase_separated(m.bigvgan)),
        export_sizes={"batch": 2, "mel_len": 8},
        notes="anti-aliased activations exported phase-separated (PhaseSeparatedActivation1d: no interleave "
              "Transpose, no strided down-sampling); the 6 stage up-samplers remain ConvTranspose; "
              "replicate padding as Pad(edge)"),
}
