"""The graph contracts of DESIGN.md §3, declared once, as data: IndexTTS2 2.0's 11 graphs and IndexTTS-2.5's
9 (UPSTREAM-2.5 §4: no semantic_codec / speaker_conditioner / gpt_latent; gpt_prefill takes the CAMPPlus style
and the language id; a new semantic_decoder; longer mel axes at 25 codes/s and duration factors up to 2).

Every other part reads these: the export wrappers (names and order of their inputs and outputs), the ONNX
exporter (dynamic axes), the dummy-input generator and `export.verify` (shapes to test at), the engine
builder (optimization profiles from the axis ranges) and the runtime executors (feeds are checked
against them). Nothing here depends on torch.

A dimension is an int, a *static* name resolved from the checkpoint's sizes (`ModelDims`: `sem_dim`,
`model_dim`, ...), a *dynamic* axis name from `DYNAMIC_AXES` (batch, lengths), or a derived expression
of one dynamic axis (`prefill_len` = text_len + 37, `wav_len` = 256 * mel_len) that is not a free axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

CONTRACT_VERSION = 1
OPSET = 18

# Dynamic axes: the free symbolic dimensions of the graphs, one vocabulary for all of them.
DYNAMIC_AXES = ("batch", "feat_len", "fbank_len", "text_len", "code_len", "seq_len", "mel_len", "cache_len")
# The GPT's prefix in front of the text rows: 32 perceiver latents + 2 speed embeddings (conditioning),
# and the prefill's extra rows, P = L + 37: conditioning (34) + start/stop text (2) + start mel (1).
CONDITIONING_ROWS = 34
PREFILL_EXTRA_ROWS = CONDITIONING_ROWS + 3
# IndexTTS-2.5: 3 conditioning rows ([proj(style) + emovec, 0, 0]), so P = L + 6.
CONDITIONING_ROWS_25 = 3
PREFILL_EXTRA_ROWS_25 = CONDITIONING_ROWS_25 + 3
VERSIONS = ("2.0", "2.5")
# The decode cache's sizes (cache_len): the host and device caches grow through these, and the TensorRT
# engine has one static profile per bucket (plus the contract maximum).
KV_BUCKETS: tuple[int, ...] = (256, 512, 1024, 2048)

# Derived axes: name -> (free axis, scale, offset): value = scale * free + offset.
DERIVED_AXES: dict[str, tuple[str, int, int]] = {
    "prefill_len": ("text_len", 1, PREFILL_EXTRA_ROWS),
    "prefill25_len": ("text_len", 1, PREFILL_EXTRA_ROWS_25),
    "s_infer_len": ("code_len", 2, 0),      # 2.5's codec decoder doubles the code rate (nearest x2)
    "wav_len": ("mel_len", 256, 0),         # BigVGAN hop
}
STATIC_DIMS = ("sem_dim", "model_dim", "content_dim", "vocab", "layers", "heads", "head_dim", "style_dim",
               "n_latents", "mel_bins", "feat_dim", "fbank_bins")

Dim = int | str


@dataclass(frozen=True)
class ModelDims:
    """The static sizes of one checkpoint (the real IndexTTS2 values as defaults)."""

    sem_dim: int = 1024          # w2v-BERT hidden = codec width
    model_dim: int = 1280        # GPT width
    content_dim: int = 512       # length-regulator channels (DiT content)
    vocab: int = 8194            # mel codes incl. start/stop
    layers: int = 24
    heads: int = 20
    head_dim: int = 64
    style_dim: int = 192
    n_latents: int = 32
    mel_bins: int = 80
    feat_dim: int = 160          # stacked SeamlessM4T features
    fbank_bins: int = 80
    # Not tensor dimensions, but bounds on valid inputs: the GPT's text vocabulary and position tables.
    text_vocab: int = 12000      # number_text_tokens (text ids are < this)
    max_text_tokens: int = 600   # text position table: max_text_tokens + 2 rows
    max_mel_tokens: int = 1815   # mel position table: max_mel_tokens + 3 rows

    def resolve(self, name: str) -> int:
        if name not in STATIC_DIMS:
            raise KeyError(f"not a static dimension: {name}")
        return int(getattr(self, name))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                   # numpy dtype name: float32, int64
    shape: tuple[Dim, ...]

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> free dynamic axis name (derived axes excluded)."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str) and d in DYNAMIC_AXES}

    def concrete(self, dims: ModelDims, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape for given static sizes and dynamic axis values."""
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif d in DYNAMIC_AXES:
                out.append(int(sizes[d]))
            elif d in DERIVED_AXES:
                free, scale, offset = DERIVED_AXES[d]
                out.append(scale * int(sizes[free]) + offset)
            else:
                out.append(dims.resolve(d))
        return tuple(out)


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of a dynamic axis: the TensorRT profile and the shapes `export.verify` tests."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"bad axis range {self}")


@dataclass(frozen=True)
class GraphContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranges: Mapping[str, AxisRange]
    atol: float = 1e-4           # ONNX Runtime fp32 vs eager: |got - want| <= atol + rtol * |want|
    rtol: float = 1e-4
    output_tolerance: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    doc: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def axes(self) -> tuple[str, ...]:
        """Free dynamic axes this graph uses, in first-seen order."""
        seen: list[str] = []
        for spec in self.inputs + self.outputs:
            for name in spec.dynamic_axes().values():
                if name not in seen:
                    seen.append(name)
            for d in spec.shape:
                if isinstance(d, str) and d in DERIVED_AXES and DERIVED_AXES[d][0] not in seen:
                    seen.append(DERIVED_AXES[d][0])
        return tuple(seen)

    def tolerance(self, output: str) -> tuple[float, float]:
        return tuple(self.output_tolerance.get(output, (self.atol, self.rtol)))  # type: ignore[return-value]


def f32(name: str, *shape: Dim) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(shape))


def i64(name: str, *shape: Dim) -> TensorSpec:
    return TensorSpec(name, "int64", tuple(shape))


def kv_cache_name(layer: int) -> str:
    """Layer `layer`'s cache input of gpt_decode (one template everywhere)."""
    return f"kv_cache.{layer}"


BATCH = AxisRange(1, 1, 4)
BEAMS = AxisRange(1, 3, 4)
FEAT = AxisRange(3, 250, 1024)          # w2v-BERT frames at 50 Hz; 15 s -> 750 (conformer needs >= 3)
TEXT = AxisRange(1, 40, 600)            # max_text_tokens
CODE = AxisRange(1, 300, 1815)          # max_mel_tokens
MEL = AxisRange(3, 800, 4500)           # prompt (<= 15 s = 1292) + generated (<= 1815 * 1.72)
# 2.5: generated mel = int(2N * 1.72 * duration_factor), N <= 1815 codes, duration_factor <= 2 (the runtime's
# bound): <= 12 487 frames, + the prompt's 1 292; the DiT's RoPE table holds 16 384 positions.
MAX_DURATION_FACTOR_25 = 2.0
GEN_MEL_25 = int(2 * 1815 * 1.72 * MAX_DURATION_FACTOR_25)
MEL25 = AxisRange(3, 800, GEN_MEL_25 + 1292)


def _decode_inputs(layers: int) -> tuple[TensorSpec, ...]:
    caches = tuple(f32(kv_cache_name(i), 2, "batch", "heads", "cache_len", "head_dim") for i in range(layers))
    return (i64("mel_ids", "batch", 1), i64("mel_pos", "batch", 1)) + caches + (f32("kv_mask", "batch", "cache_len"),)


def build_contracts(dims: ModelDims = ModelDims(), version: str = "2.0") -> dict[str, GraphContract]:
    """The contracts of one IndexTTS2 version for one checkpoint's sizes (gpt_decode's input count depends on
    `layers`): 11 for 2.0, 9 for 2.5."""
    if version not in VERSIONS:
        raise ValueError(f"IndexTTS2 version {version!r}: expected one of {VERSIONS}")
    contracts = _contracts_20(dims) if version == "2.0" else _contracts_25(dims)
    out = {c.name: c for c in contracts}
    for c in out.values():
        missing = [a for a in c.axes() if a not in c.ranges]
        if missing:
            raise ValueError(f"contract {c.name}: no range for axes {missing}")
    return out


def graph_names(version: str = "2.0") -> tuple[str, ...]:
    """The graphs an export of `version` holds, in contract order."""
    return tuple(build_contracts(version=version))


def _contracts_25(dims: ModelDims) -> list[GraphContract]:
    """2.5: the 2.0 graphs it runs unchanged (longer mel axes), gpt_prefill with style + lang_id, and the codec
    decoder; nothing of the conformer / perceiver speaker path or the latent pass."""
    same = {c.name: c for c in _contracts_20(dims)}
    seq = AxisRange(1, 300, 2 * CODE.max)                          # S_infer (2N frames) or the prompt's features
    mel = AxisRange(1, 516, GEN_MEL_25)
    return [
        same["semantic_encoder"],
        same["campplus"],
        same["emotion_conditioner"],
        GraphContract(
            "gpt_prefill",
            (f32("style", "batch", "style_dim"), i64("lang_id", "batch"), f32("emovec", "batch", "model_dim"),
             i64("text_ids", "batch", "text_len")),
            (f32("logits", "batch", "vocab"),
             f32("kv", "layers", 2, "batch", "heads", "prefill25_len", "head_dim")),
            {"batch": BATCH, "text_len": TEXT},
            doc="[spk_emb_proj(style) + emovec, 0, 0] + text (+ lang_embedding) + start mel; P = L + 6"),
        same["gpt_decode"],
        GraphContract(
            "semantic_decoder",
            (i64("codes", "batch", "code_len"),),
            (f32("s_infer", "batch", "s_infer_len", "sem_dim"),),
            {"batch": BATCH, "code_len": CODE},
            doc="codec vq2emb -> Vocos decoder -> Linear -> nearest x2 -> Conv1d k3: (B, N) -> (B, 2N, sem_dim)"),
        GraphContract(
            "length_regulator", same["length_regulator"].inputs, same["length_regulator"].outputs,
            {"batch": BATCH, "seq_len": seq, "mel_len": mel}, doc=same["length_regulator"].doc),
        GraphContract(
            "dit_step", same["dit_step"].inputs, same["dit_step"].outputs, {"batch": BATCH, "mel_len": MEL25},
            doc=same["dit_step"].doc),
        GraphContract(
            "bigvgan", same["bigvgan"].inputs, same["bigvgan"].outputs,
            {"batch": BATCH, "mel_len": AxisRange(1, 500, GEN_MEL_25)}, doc=same["bigvgan"].doc),
    ]


def _contracts_20(dims: ModelDims) -> list[GraphContract]:
    return [
        GraphContract(
            "semantic_encoder",
            (f32("input_features", "batch", "feat_len", "feat_dim"), i64("attention_mask", "batch", "feat_len")),
            (f32("features", "batch", "feat_len", "sem_dim"),),
            {"batch": BATCH, "feat_len": FEAT},
            doc="w2v-BERT feature projection + first 17 layers, stats normalization baked in"),
        GraphContract(
            "semantic_codec",
            (f32("features", "batch", "feat_len", "sem_dim"),),
            (i64("codes", "batch", "feat_len"), f32("quantized", "batch", "feat_len", "sem_dim")),
            {"batch": BATCH, "feat_len": AxisRange(1, 250, 1024)},
            doc="RepCodec encoder + quantizer"),
        GraphContract(
            "campplus",
            (f32("fbank", "batch", "fbank_len", "fbank_bins"),),
            (f32("style", "batch", "style_dim"),),
            {"batch": BATCH, "fbank_len": AxisRange(3, 500, 1500)},
            doc="CAMPPlus on mean-normalized Kaldi fbank"),
        GraphContract(
            "speaker_conditioner",
            (f32("features", "batch", "feat_len", "sem_dim"),),
            (f32("spk_latent", "batch", "n_latents", "model_dim"),),
            {"batch": BATCH, "feat_len": FEAT},
            doc="conformer A + perceiver A (every frame valid)"),
        GraphContract(
            "emotion_conditioner",
            (f32("features", "batch", "feat_len", "sem_dim"),),
            (f32("emovec", "batch", "model_dim"),),
            {"batch": BATCH, "feat_len": FEAT},
            doc="conformer B + perceiver B + emovec_layer + emo_layer (every frame valid)"),
        GraphContract(
            "gpt_prefill",
            (f32("spk_latent", "batch", "n_latents", "model_dim"), f32("emovec", "batch", "model_dim"),
             i64("text_ids", "batch", "text_len")),
            (f32("logits", "batch", "vocab"), f32("kv", "layers", 2, "batch", "heads", "prefill_len", "head_dim")),
            {"batch": BATCH, "text_len": TEXT},
            doc="conditioning + text + start mel token; logits of the last position; P = L + 37"),
        GraphContract(
            "gpt_decode",
            _decode_inputs(dims.layers),
            (f32("logits", "batch", "vocab"), f32("kv_new", "layers", 2, "batch", "heads", 1, "head_dim")),
            {"batch": BEAMS, "cache_len": AxisRange(38, 256, 2048 + 640)},
            doc="one token at an explicit mel position; attends to cache rows where kv_mask is 1, plus itself"),
        GraphContract(
            "gpt_latent",
            (f32("spk_latent", "batch", "n_latents", "model_dim"), f32("emovec", "batch", "model_dim"),
             i64("text_ids", "batch", "text_len"), i64("codes", "batch", "code_len")),
            (f32("s_infer", "batch", "code_len", "sem_dim"),),
            {"batch": BATCH, "text_len": TEXT, "code_len": CODE},
            doc="teacher-forced GPT pass -> latent -> gpt_layer, plus codec vq2emb(codes)"),
        GraphContract(
            "length_regulator",
            (f32("s", "batch", "seq_len", "sem_dim"), i64("ylens", "batch")),
            (f32("cond", "batch", "mel_len", "content_dim"),),
            {"batch": BATCH, "seq_len": AxisRange(1, 300, 1815), "mel_len": AxisRange(1, 516, 3200)},
            doc="nearest interpolation to max(ylens) + conv stack + mask (mel_len = max(ylens) is data)"),
        GraphContract(
            "dit_step",
            (f32("x", "batch", "mel_bins", "mel_len"), f32("prompt_x", "batch", "mel_bins", "mel_len"),
             i64("x_lens", "batch"), i64("prompt_lens", "batch"), f32("t", "batch"), f32("dt", "batch"),
             f32("style", "batch", "style_dim"), f32("cond", "batch", "mel_len", "content_dim"),
             f32("cfg_rate", 1)),
            (f32("x_next", "batch", "mel_bins", "mel_len"),),
            {"batch": BATCH, "mel_len": MEL},
            doc="one Euler step with classifier-free guidance (CFG batch stacked inside) and prompt re-zeroing"),
        GraphContract(
            "bigvgan",
            (f32("mel", "batch", "mel_bins", "mel_len"),),
            (f32("wav", "batch", "wav_len"),),
            {"batch": BATCH, "mel_len": AxisRange(1, 500, 3200)},
            doc="BigVGAN v2, weight norm folded"),
    ]


GRAPH_NAMES = tuple(build_contracts().keys())
