"""w2v-BERT 2.0 semantic encoder, truncated at hidden layer 17, with the stats normalization baked in.

upstream: indextts/infer_v2.py:IndexTTS2.get_emb (which runs transformers'
`Wav2Vec2BertModel(..., output_hidden_states=True).hidden_states[17]` and then
`(feat - mean) / sqrt(var)` with `wav2vec2bert_stats.pt`), UPSTREAM.md §2.3 items 3-4 and §3.6.

Why our own conformer layers instead of a truncated HF model: the HF module computes the
relative-key term with an einsum that materializes a (T, T, head) tensor, builds an additive
`finfo.min` mask (an FP16 engine turns it into -inf / NaN) and takes Python branches on its config
at every call. Here the same numbers are computed with export-friendly ops: a finite additive mask
(-1e4: `exp(-1e4)` is 0 in float32 just like `exp(finfo.min)`, so the softmax is identical while the
mask stays finite in FP16), and the relative-position term built from T with tensor ops (dynamic T).
The parameter names are HF's, so the original `model.safetensors` loads as-is.

Only the feature projection and layers 0..16 are built: `hidden_states[17]` is the output of layer
index 16; layers 17..23 are wasted compute upstream (their keys are ignored at load).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import CheckpointError

from ..checkpoint import as_state_dict, load_into, read_safetensors, read_torch_file, strip_prefix

log = logging.getLogger(__name__)

#: `hidden_states[HIDDEN_STATE_INDEX]` is what IndexTTS2 uses (UPSTREAM §2.3 item 4).
HIDDEN_STATE_INDEX = 17
#: Finite additive attention mask for padded keys (see module docstring; FP16-safe).
MASK_NEG = -1.0e4


@dataclass(frozen=True)
class W2VBertConfig:
    """The fields of HF's Wav2Vec2BertConfig that the truncated encoder needs (w2v-bert-2.0 defaults)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    feature_projection_input_dim: int = 160
    hidden_act: str = "swish"
    layer_norm_eps: float = 1e-5
    conv_depthwise_kernel_size: int = 31
    position_embeddings_type: str = "relative_key"
    left_max_position_embeddings: int = 64
    right_max_position_embeddings: int = 8

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"w2v-bert config: hidden_act {name!r} is not supported ({sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]()


class FeatureProjection(nn.Module):
    """LayerNorm(160) -> Linear(160, H) (HF `Wav2Vec2BertFeatureProjection`, dropout 0 at inference)."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.feature_projection_input_dim, eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.feature_projection_input_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class FeedForward(nn.Module):
    """Linear(H, I) -> swish -> Linear(I, H) (HF key names `intermediate_dense`, `output_dense`)."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class ConvModule(nn.Module):
    """Conformer convolution: LN -> zero padded frames -> pw conv (2H) -> GLU -> causal dw conv -> LN
    -> swish -> pw conv.

    The padded frames are zeroed after the first LayerNorm as HF does, so that they do not leak into
    the (causal, left-padded) depthwise convolution.
    """

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        h, k = cfg.hidden_size, cfg.conv_depthwise_kernel_size
        self.layer_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.pointwise_conv1 = nn.Conv1d(h, 2 * h, kernel_size=1, bias=False)
        self.depthwise_conv = nn.Conv1d(h, h, kernel_size=k, groups=h, bias=False)
        self.depthwise_layer_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _activation(cfg.hidden_act)
        self.pointwise_conv2 = nn.Conv1d(h, h, kernel_size=1, bias=False)
        self.left_pad = k - 1

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B,T,H), valid (B,T,1) bool -> (B,T,H)."""
        x = torch.where(valid, self.layer_norm(x), torch.zeros((), dtype=x.dtype, device=x.device))
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = self.depthwise_conv(F.pad(x, (self.left_pad, 0)))
        x = self.depthwise_layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return self.pointwise_conv2(self.act(x)).transpose(1, 2)


def relative_index(seq_len: int | torch.SymInt, left: int, right: int, device: torch.device) -> torch.Tensor:
    """Distance-embedding row for every relative distance d = j - i in [-(T-1), T-1], shape (2T-1,).

    Row `clamp(d, -left, right) + left`, ordered by d ascending. Built from T with tensor ops so the
    exported graph keeps T dynamic.
    """
    d = torch.arange(2 * seq_len - 1, device=device) - (seq_len - 1)
    return torch.clamp(d, -left, right) + left


def skew_relative(rel: torch.Tensor) -> torch.Tensor:
    """(B,H,T,2T-1) scores by distance -> (B,H,T,T) scores by key: out[i, j] = rel[i, j - i + T - 1].

    The pad-flatten-slice trick (Transformer-XL): after padding one column, row i of the flat tensor
    starts at i*2T; dropping the first T-1 elements and reading rows of 2T-1 shifts row i left by i.
    Memory stays O(T^2) like the scores, instead of HF's (T, T, head) embedding tensor.
    """
    b, h, t, w = rel.shape
    flat = F.pad(rel, (0, 1)).reshape(b, h, t * (w + 1))
    flat = flat[:, :, t - 1: t - 1 + t * w]
    return flat.reshape(b, h, t, w)[:, :, :, :t]


class SelfAttention(nn.Module):
    """Multi-head attention with HF's `relative_key` term: qk/sqrt(d) + q·E[clamp(j-i)]/sqrt(d) + mask."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_size = cfg.num_attention_heads, cfg.head_size
        self.scale = math.sqrt(self.head_size)
        self.linear_q = nn.Linear(h, h)
        self.linear_k = nn.Linear(h, h)
        self.linear_v = nn.Linear(h, h)
        self.linear_out = nn.Linear(h, h)
        num_pos = cfg.left_max_position_embeddings + cfg.right_max_position_embeddings + 1
        self.distance_embedding = nn.Embedding(num_pos, self.head_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor, rel_idx: torch.Tensor) -> torch.Tensor:
        """x (B,T,H), mask_add (B,1,1,T) additive, rel_idx (2T-1,) -> (B,T,H)."""
        b, t, _ = x.shape
        q, k, v = self._heads(self.linear_q(x)), self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / self.scale
        pos = F.embedding(rel_idx, self.distance_embedding.weight)          # (2T-1, d)
        rel = skew_relative(torch.matmul(q, pos.transpose(0, 1)))          # (B,h,T,T)
        scores = scores + rel / self.scale
        probs = torch.softmax(scores + mask_add, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_size)
        return self.linear_out(out)


class ConformerLayer(nn.Module):
    """HF `Wav2Vec2BertEncoderLayer`: half FFN, attention, conv, half FFN, final LayerNorm."""

    def __init__(self, cfg: W2VBertConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.ffn1_layer_norm = nn.LayerNorm(h, eps=eps)
        self.ffn1 = FeedForward(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=eps)
        self.self_attn = SelfAttention(cfg)
        self.conv_module = ConvModule(cfg)
        self.ffn2_layer_norm = nn.LayerNorm(h, eps=eps)
        self.ffn2 = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, mask_add: torch.Tensor,
                rel_idx: torch.Tensor) -> torch.Tensor:
        x = self.ffn1(self.ffn1_layer_norm(x)) * 0.5 + x
        x = self.self_attn(self.self_attn_layer_norm(x), mask_add, rel_idx) + x
        x = x + self.conv_module(x, valid)
        x = self.ffn2(self.ffn2_layer_norm(x)) * 0.5 + x
        return self.final_layer_norm(x)


class Encoder(nn.Module):
    """Holds the first `num_layers` conformer layers under HF's `encoder.layers.N` names."""

    def __init__(self, cfg: W2VBertConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(num_layers))


class SemanticEncoder(nn.Module):
    """`(input_features (B,T,160), attention_mask (B,T)) -> (hidden_states[17] - mean) / std` (B,T,H).

    Masking as HF applies it: padded frames are zeroed after the feature projection, padded keys get
    an additive mask in every attention, and padded frames are zeroed before every depthwise conv.
    Padded query rows are still computed (HF returns them too; the fixture compares them).
    """

    def __init__(self, cfg: W2VBertConfig, num_layers: int = HIDDEN_STATE_INDEX) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg, num_layers)
        # Stats from wav2vec2bert_stats.pt; not part of the HF state dict, so not persistent.
        self.register_buffer("mean", torch.zeros(cfg.hidden_size), persistent=False)
        self.register_buffer("std", torch.ones(cfg.hidden_size), persistent=False)

    def hidden_state(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw `hidden_states[17]` (before the stats normalization), (B,T,H)."""
        valid = (attention_mask != 0).unsqueeze(-1)                          # (B,T,1)
        mask_add = (1.0 - attention_mask.to(input_features.dtype))[:, None, None, :] * MASK_NEG
        x = self.feature_projection(input_features)
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        cfg = self.cfg
        rel_idx = relative_index(x.shape[1], cfg.left_max_position_embeddings,
                                 cfg.right_max_position_embeddings, x.device)
        for layer in self.encoder.layers:
            x = layer(x, valid, mask_add, rel_idx)
        return x

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(h - mean) / std` with std = sqrt(var), as upstream divides (not a folded affine)."""
        return (hidden - self.mean) / self.std

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.hidden_state(input_features, attention_mask))


# ----------------------------------------------------------------------------------------------
# Loading


def read_w2v_config(w2v_dir: str | Path) -> W2VBertConfig:
    """Read `config.json` of a HF w2v-bert directory through transformers' Wav2Vec2BertConfig."""
    from transformers import Wav2Vec2BertConfig

    path = Path(w2v_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: w2v-bert config.json not found")
    try:
        hf = Wav2Vec2BertConfig.from_json_file(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as a Wav2Vec2BertConfig: {err}") from err
    if hf.position_embeddings_type != "relative_key":
        raise CheckpointError(f"{path}: position_embeddings_type {hf.position_embeddings_type!r} is not supported "
                              "(w2v-bert-2.0 uses 'relative_key')")
    if hf.num_hidden_layers < HIDDEN_STATE_INDEX:
        raise CheckpointError(f"{path}: num_hidden_layers {hf.num_hidden_layers} < {HIDDEN_STATE_INDEX}: "
                              f"hidden_states[{HIDDEN_STATE_INDEX}] does not exist")
    if hf.hidden_size % hf.num_attention_heads:
        raise CheckpointError(f"{path}: hidden_size {hf.hidden_size} not divisible by "
                              f"num_attention_heads {hf.num_attention_heads}")
    return W2VBertConfig(
        hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
        feature_projection_input_dim=hf.feature_projection_input_dim, hidden_act=hf.hidden_act,
        layer_norm_eps=float(hf.layer_norm_eps), conv_depthwise_kernel_size=hf.conv_depthwise_kernel_size,
        position_embeddings_type=hf.position_embeddings_type,
        left_max_position_embeddings=hf.left_max_position_embeddings,
        right_max_position_embeddings=hf.right_max_position_embeddings,
    )


def _read_w2v_weights(w2v_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """`model.safetensors`, else `pytorch_model.bin` (older HF snapshots)."""
    st, pt = w2v_dir / "model.safetensors", w2v_dir / "pytorch_model.bin"
    if st.is_file():
        return read_safetensors(st), st
    if pt.is_file():
        return as_state_dict(read_torch_file(pt), pt), pt
    raise CheckpointError(f"{w2v_dir}: no w2v-bert weights (looked for model.safetensors, pytorch_model.bin)")


def ignored_keys(cfg: W2VBertConfig) -> list[str]:
    """Checkpoint keys HF loads but `hidden_states[17]` never uses (fnmatch patterns)."""
    patterns = [f"encoder.layers.{i}.*" for i in range(HIDDEN_STATE_INDEX, cfg.num_hidden_layers)]
    patterns += [
        "masked_spec_embed",    # SpecAugment vector, only used in training (`_mask_hidden_states`)
        "adapter.*",            # optional adapter runs after the encoder; hidden_states are taken before it
        "intermediate_ffn.*",   # optional FFN before the adapter; same reason
    ]
    return patterns


def read_w2v_stats(stats_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`wav2vec2bert_stats.pt` -> (mean, std = sqrt(var)), float32."""
    obj = read_torch_file(stats_path)
    if not isinstance(obj, dict) or not {"mean", "var"} <= obj.keys():
        raise CheckpointError(f"{stats_path}: expected a dict with 'mean' and 'var' tensors")
    mean, var = obj["mean"], obj["var"]
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        raise CheckpointError(f"{stats_path}: 'mean' and 'var' must be tensors")
    return mean.float(), torch.sqrt(var.float())


def load_semantic_encoder(w2v_dir: str | Path, stats_path: str | Path) -> SemanticEncoder:
    """Build the truncated encoder from a HF w2v-bert directory and the stats file (eval mode)."""
    w2v_dir = Path(w2v_dir)
    cfg = read_w2v_config(w2v_dir)
    state, source = _read_w2v_weights(w2v_dir)
    # HF's from_pretrained accepts a checkpoint saved from a head model (keys under the base prefix).
    state = strip_prefix(state, "wav2vec2_bert.")
    model = SemanticEncoder(cfg)
    load_into(model, state, str(source), ignore=ignored_keys(cfg))
    mean, std = read_w2v_stats(stats_path)
    if mean.shape != (cfg.hidden_size,) or std.shape != (cfg.hidden_size,):
        raise CheckpointError(f"{stats_path}: mean/var shape {tuple(mean.shape)}/{tuple(std.shape)}, "
                              f"expected ({cfg.hidden_size},) for hidden_size {cfg.hidden_size}")
    with torch.no_grad():
        model.mean.copy_(mean)
        model.std.copy_(std)
    log.info("w2v-bert: %d of %d layers loaded from %s", HIDDEN_STATE_INDEX, cfg.num_hidden_layers, source)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Demo checkpoint (seeded random weights in the HF w2v-bert-2.0 directory layout)

#: `preprocessor_config.json` of facebook/w2v-bert-2.0 (SeamlessM4TFeatureExtractor).
PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "SeamlessM4TFeatureExtractor",
    "feature_size": 80,
    "num_mel_bins": 80,
    "padding_side": "right",
    "padding_value": 1.0,
    "processor_class": "Wav2Vec2BertProcessor",
    "return_attention_mask": True,
    "sampling_rate": 16000,
    "stride": 2,
}


def _random_param(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """The fixture generator's rule: W ~ N(0, 1/fan_in), biases N(0, 0.1), norm scales 1 + N(0, 0.1),
    embeddings N(0, 0.3)."""
    if name.endswith("distance_embedding.weight") or name == "masked_spec_embed":
        return torch.randn(shape, generator=gen) * 0.3
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen) * 0.1
    if "layer_norm" in name:  # every LayerNorm of the model has 'layer_norm' in its name
        return 1.0 + torch.randn(shape, generator=gen) * 0.1
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def demo_w2v_state(cfg: W2VBertConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random HF state dict with ALL `cfg.num_hidden_layers` layers (like the real 24-layer file).

    q/k are sharpened (x1.5) and the attention output damped (x0.5), as in the fixture: a plain random
    init averages the time axis away through 17 layers; this keeps time variation while staying
    well conditioned.
    """
    shapes = {k: tuple(v.shape) for k, v in SemanticEncoder(cfg, cfg.num_hidden_layers).state_dict().items()}
    shapes["masked_spec_embed"] = (cfg.hidden_size,)
    state = {}
    for name in sorted(shapes):
        value = _random_param(name, shapes[name], generator)
        if name.endswith(("self_attn.linear_q.weight", "self_attn.linear_k.weight")):
            value = value * 1.5
        elif name.endswith("self_attn.linear_out.weight"):
            value = value * 0.5
        state[name] = value.float().contiguous()
    return state


def write_demo_w2v_bert(directory: str | Path, hidden_size: int, num_layers: int, num_heads: int,
                        intermediate_size: int, generator: torch.Generator) -> Path:
    """Write a HF-style w2v-bert directory: config.json, model.safetensors, preprocessor_config.json."""
    import json

    from safetensors.torch import save_file
    from transformers import Wav2Vec2BertConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if num_layers < HIDDEN_STATE_INDEX:
        raise ValueError(f"num_layers must be >= {HIDDEN_STATE_INDEX} (hidden_states[{HIDDEN_STATE_INDEX}] is used)")
    cfg = W2VBertConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        intermediate_size=intermediate_size)
    hf = Wav2Vec2BertConfig(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, feature_projection_input_dim=cfg.feature_projection_input_dim,
        hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
        conv_depthwise_kernel_size=cfg.conv_depthwise_kernel_size, position_embeddings_type="relative_key",
        left_max_position_embeddings=cfg.left_max_position_embeddings,
        right_max_position_embeddings=cfg.right_max_position_embeddings, max_source_positions=5000,
        add_adapter=False, output_hidden_size=hidden_size, architectures=["Wav2Vec2BertModel"],
    )
    hf.to_json_file(str(directory / "config.json"))
    save_file(demo_w2v_state(cfg, generator), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    return directory


def write_demo_w2v_stats(path: str | Path, hidden_size: int, generator: torch.Generator) -> Path:
    """Write `wav2vec2bert_stats.pt` = {'mean': (H,), 'var': (H,)} (plain dict of float32 tensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mean = torch.randn(hidden_size, generator=generator) * 0.1
    var = 0.5 + 1.5 * torch.rand(hidden_size, generator=generator)
    torch.save({"mean": mean.float(), "var": var.float()}, path)
    return path
