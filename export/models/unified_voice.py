"""UnifiedVoice v2, the IndexTTS2 GPT: conditioning encoders, prefill / decode steps, teacher-forced latent.

upstream: indextts/gpt/model_v2.py:UnifiedVoice (get_conditioning, get_emo_conditioning, get_emovec,
merge_emovec, inference_speech's prepare_gpt_inputs + GPT2InferenceModel.forward, forward with
return_latent) — UPSTREAM.md §3.1, §2.7 steps 1-4.

Two versions share this module (the GPT core, the emotion path and the decode step are identical):
- 2.0 (`spk_cond_mode` conformer_perceiver): 34 conditioning rows = [perceiver(conformer(features)) (32)
  + emovec, speed_emb[1], speed_emb[0]].
- 2.5 (`spk_cond_mode="campplus"`, UPSTREAM-2.5 §1, MV2:352-353, 680-681, 740-768): 3 rows =
  [spk_emb_proj(style) + emovec, 0, 0], and `lang_embedding(lang_id)` added to every text row. The
  2.0-only modules are absent from the module and from the 2.5 file. Upstream's B > 1 bug
  (`unsqueeze(0)` of (B, D)) is not copied: every row gets what B = 1 gives.
The version is read from the checkpoint's keys (`gpt_version_of`), never trusted from config.yaml.

Entry points (the future ONNX graphs; DESIGN.md §3):
- `speaker_conditioner(features (B,T,F), lengths) -> spk_latent (B,32,D)`: conformer A + perceiver A.
- `emotion_conditioner(features, lengths) -> emovec (B,D)`: emo_layer(emovec_layer(perceiver B(conformer B))).
- `prefill(speaker, emovec, text_ids, lang_id=None) -> (logits (B,V), kv (layers,2,B,H,P,hd))`, P = L+37
  (2.0; speaker = spk_latent (B,32,D)) or L+6 (2.5; speaker = style (B,192), lang_id (B,) required); text_ids
  have ids 0 / 1 removed already (upstream drops them; with its left padding masked out that is the same numbers).
- `decode(mel_ids, mel_pos, kv_cache, kv_mask) -> (logits (B,V), kv_new (layers,2,B,H,1,hd))`.
- `latent(spk_latent, emovec, text_ids, codes) -> (B,N,D)`: the teacher-forced pass (text NOT filtered).

The output head is `mel_head(final_norm(ln_f(h)))` everywhere; `ln_f` is inside `GPT2Core`.

`load_gpt` reads `gpt.pth` (plain state dict or {'model': sd}) strictly; `text_head.*` (training-only) and
a few alias/buffer keys are ignored (`IGNORED`), so the module does not allocate the unused text head.
Generalisation: upstream hard-codes the conformer input width 1024; here it is `semantic_dim`
(`semantic_codec.hidden_size` of config.yaml, 1024 for the real config). `write_demo_gpt` writes a
seeded random `gpt.pth` in the original layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from runtime.errors import CheckpointError

from ..checkpoint import as_state_dict, load_into, read_torch_file
from ..config import GPTConfig
from .conformer import ConformerEncoder
from .gpt2 import GPT2Core, causal_bias
from .perceiver import PerceiverResampler

log = logging.getLogger(__name__)

#: Width of the emotion perceiver: a literal upstream (independent of model_dim; emovec_layer reads it).
EMO_PERCEIVER_DIM = 1024
#: Speaker perceiver latents (`condition_num_latent`, a constructor default not in config.yaml).
CONDITION_LATENTS = 32
#: `max_conditioning_inputs` (constructor default); the mel position table has max_mel_tokens + 2 + this rows.
MAX_CONDITIONING_INPUTS = 1
#: Rows in front of the text: 32 latents + speed_emb[1] + speed_emb[0].
CONDITIONING_ROWS = CONDITION_LATENTS + 2

VERSION_20, VERSION_25 = "2.0", "2.5"
#: 2.5: the CAMPPlus style width `spk_emb_proj` reads (upstream's literal 192).
STYLE_DIM = 192
#: 2.5: rows of `lang_embedding` (upstream `len(LANGUAGES)`).
LANGUAGE_ROWS = 107
#: 2.5: conditioning rows in front of the text: proj(style) + emovec, then two zero rows.
CONDITIONING_ROWS_25 = 3
#: Keys only a 2.0 / only a 2.5 gpt.pth holds (prefixes), the evidence `gpt_version_of` reads.
VERSION_MARKERS = {
    VERSION_20: ("conditioning_encoder.", "perceiver_encoder.", "speed_emb."),
    VERSION_25: ("spk_emb_proj.", "lang_embedding."),
}


class LearnedPositionEmbeddings(nn.Module):
    """A learned position table (checkpoint key `<name>.emb.weight`)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, dim)


class UnifiedVoice(nn.Module):
    def __init__(self, cfg: GPTConfig, semantic_dim: int = 1024, version: str = VERSION_20) -> None:
        super().__init__()
        if version not in VERSION_MARKERS:
            raise ValueError(f"GPT version {version!r}: expected one of {sorted(VERSION_MARKERS)}")
        if cfg.condition_type != "conformer_perceiver":
            raise ValueError(f"gpt.condition_type {cfg.condition_type!r}: only 'conformer_perceiver' (IndexTTS2) "
                             "is supported")
        modules = (("condition_module", cfg.condition_module), ("emo_condition_module", cfg.emo_condition_module))
        for name, cm in modules:
            if cm.input_layer != "conv2d2":
                raise ValueError(f"gpt.{name}.input_layer {cm.input_layer!r}: only 'conv2d2' is supported")
        self.cfg, self.semantic_dim, self.version = cfg, semantic_dim, version
        dim, a, b = cfg.model_dim, cfg.condition_module, cfg.emo_condition_module
        if version == VERSION_20:
            self.conditioning_encoder = ConformerEncoder(semantic_dim, a.output_size, a.attention_heads,
                                                         a.linear_units, a.num_blocks)
            self.perceiver_encoder = PerceiverResampler(dim, a.output_size, a.attention_heads, a.perceiver_mult,
                                                        CONDITION_LATENTS)
        else:
            self.spk_emb_proj = nn.Linear(STYLE_DIM, dim)
            self.lang_embedding = nn.Embedding(LANGUAGE_ROWS, dim)
        self.emo_conditioning_encoder = ConformerEncoder(semantic_dim, b.output_size, b.attention_heads,
                                                         b.linear_units, b.num_blocks)
        self.emo_perceiver_encoder = PerceiverResampler(EMO_PERCEIVER_DIM, b.output_size, b.attention_heads,
                                                        b.perceiver_mult, 1)
        self.emovec_layer = nn.Linear(EMO_PERCEIVER_DIM, dim)
        self.emo_layer = nn.Linear(dim, dim)
        if version == VERSION_20:
            self.speed_emb = nn.Embedding(2, dim)
        self.text_embedding = nn.Embedding(cfg.number_text_tokens + 1, dim)
        self.text_pos_embedding = LearnedPositionEmbeddings(cfg.max_text_tokens + 2, dim)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, dim)
        self.mel_pos_embedding = LearnedPositionEmbeddings(cfg.max_mel_tokens + 2 + MAX_CONDITIONING_INPUTS, dim)
        self.gpt = GPT2Core(dim, cfg.heads, cfg.layers)
        self.final_norm = nn.LayerNorm(dim)
        self.mel_head = nn.Linear(dim, cfg.number_mel_codes)

    # -- conditioning ---------------------------------------------------------------------------------

    def speaker_conditioner(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """upstream get_conditioning on (B,T,F) features (it takes (B,F,T) and transposes) -> (B,32,D)."""
        x, mask = self.conditioning_encoder(features, lengths)
        return self.perceiver_encoder(x, mask)

    def emotion_latent(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """upstream get_emo_conditioning -> (B,1024)."""
        x, mask = self.emo_conditioning_encoder(features, lengths)
        return self.emo_perceiver_encoder(x, mask)[:, 0]

    def emotion_conditioner(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """upstream get_emovec -> (B,D)."""
        return self.emo_layer(self.emovec_layer(self.emotion_latent(features, lengths)))

    @property
    def conditioning_rows(self) -> int:
        """Rows in front of the text: 34 (2.0) or 3 (2.5)."""
        return CONDITIONING_ROWS if self.version == VERSION_20 else CONDITIONING_ROWS_25

    def speaker_rows(self, speaker: torch.Tensor) -> torch.Tensor:
        """The speaker part of the conditioning: spk_latent (B,32,D) as given (2.0), or
        spk_emb_proj(style) (B,1,D) (2.5, MV2:740-755 per row)."""
        if self.version == VERSION_20:
            return speaker
        return self.spk_emb_proj(speaker)[:, None]

    def conditioning(self, speaker: torch.Tensor, emovec: torch.Tensor) -> torch.Tensor:
        """2.0: [spk_latent + emovec, speed_emb[1], speed_emb[0]] -> (B,34,D) (UPSTREAM §3.1.5);
        2.5: [spk_emb_proj(style) + emovec, 0, 0] -> (B,3,D) (MV2:767-768)."""
        spk = self.speaker_rows(speaker)
        b = spk.shape[0]
        if self.version == VERSION_20:
            speed = self.speed_emb.weight
            rows = torch.stack([speed[1], speed[0]])[None].expand(b, -1, -1)
        else:
            rows = spk.new_zeros(b, CONDITIONING_ROWS_25 - 1, spk.shape[-1])
        return torch.cat([spk + emovec[:, None], rows], dim=1)

    # -- embeddings -----------------------------------------------------------------------------------

    def text_embeddings(self, text_ids: torch.Tensor, lang_id: torch.Tensor | None = None) -> torch.Tensor:
        """[start_text] + ids + [stop_text] embedded at text positions 0..L+1 (+ lang_embedding(lang_id) on
        every row in 2.5, MV2:680-681) -> (B,L+2,D)."""
        b = text_ids.shape[0]
        start = torch.full((b, 1), self.cfg.start_text_token, dtype=text_ids.dtype, device=text_ids.device)
        stop = torch.full((b, 1), self.cfg.stop_text_token, dtype=text_ids.dtype, device=text_ids.device)
        ids = torch.cat([start, text_ids, stop], dim=1)
        pos = self.text_pos_embedding.emb.weight[: ids.shape[1]]
        emb = self.text_embedding(ids) + pos[None]
        if self.version == VERSION_25:
            if lang_id is None:
                raise ValueError("IndexTTS-2.5 GPT: the text needs its lang_id")
            emb = emb + self.lang_embedding(lang_id.reshape(b))[:, None]
        elif lang_id is not None:
            raise ValueError("IndexTTS2 2.0 GPT: lang_id is a 2.5 input")
        return emb

    def mel_embeddings(self, mel_ids: torch.Tensor, mel_pos: torch.Tensor) -> torch.Tensor:
        return self.mel_embedding(mel_ids) + self.mel_pos_embedding.emb(mel_pos)

    def start_mel_embedding(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The start_mel_token at mel position 0 -> (B,1,D)."""
        row = self.mel_embedding.weight[self.cfg.start_mel_token] + self.mel_pos_embedding.emb.weight[0]
        return row.to(like.dtype)[None, None].expand(batch, 1, -1)

    def prefill_embeddings(self, speaker: torch.Tensor, emovec: torch.Tensor, text_ids: torch.Tensor,
                           lang_id: torch.Tensor | None = None) -> torch.Tensor:
        """conds (34 | 3) + text (L+2) + start mel (1) -> (B,L+37,D) (2.0) or (B,L+6,D) (2.5)."""
        conds = self.conditioning(speaker, emovec)
        return torch.cat([conds, self.text_embeddings(text_ids, lang_id),
                          self.start_mel_embedding(conds.shape[0], conds)], dim=1)

    # -- GPT passes -----------------------------------------------------------------------------------

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """mel logits from GPT outputs (already through ln_f)."""
        return self.mel_head(self.final_norm(h))

    def run_embeddings(self, embeds: torch.Tensor, key_valid: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal pass over given input embeddings (optionally key-padded) -> (h (B,T,D), kv)."""
        bias = causal_bias(embeds.shape[1], key_valid, device=embeds.device).to(embeds.dtype)
        return self.gpt(embeds, bias)

    def prefill(self, speaker: torch.Tensor, emovec: torch.Tensor, text_ids: torch.Tensor,
                lang_id: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits of the last position (B,V), kv (layers,2,B,H,P,hd))."""
        h, kv = self.run_embeddings(self.prefill_embeddings(speaker, emovec, text_ids, lang_id))
        return self.head(h[:, -1]), kv

    def prefill_all_logits(self, speaker: torch.Tensor, emovec: torch.Tensor, text_ids: torch.Tensor,
                           lang_id: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `prefill`, but logits at every position (B,P,V) (fixture `gpt_decode_manual`)."""
        h, kv = self.run_embeddings(self.prefill_embeddings(speaker, emovec, text_ids, lang_id))
        return self.head(h), kv

    def decode(self, mel_ids: torch.Tensor, mel_pos: torch.Tensor, kv_cache: list[torch.Tensor],
               kv_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row at its explicit mel position; attends to cache rows where kv_mask is 1 and to
        itself -> (logits (B,V), kv_new (layers,2,B,H,1,hd))."""
        h, kv_new = self.gpt.step(self.mel_embeddings(mel_ids, mel_pos), kv_cache, kv_mask)
        return self.head(h[:, 0]), kv_new

    def latent(self, spk_latent: torch.Tensor, emovec: torch.Tensor, text_ids: torch.Tensor,
               codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass (UPSTREAM §3.1.7): text embedded as given (no 0/1 filtering), mel ids
        [start] + codes + [stop] at mel positions 0..N+1; rows [:-2] of final_norm(h) of the mel part.
        2.0 only: 2.5 has no latent pass (its S_infer comes from the codec decoder)."""
        if self.version != VERSION_20:
            raise ValueError("IndexTTS-2.5 has no GPT latent pass (S_infer = semantic_decoder(codes))")
        b, n = codes.shape
        start = torch.full((b, 1), self.cfg.start_mel_token, dtype=codes.dtype, device=codes.device)
        stop = torch.full((b, 1), self.cfg.stop_mel_token, dtype=codes.dtype, device=codes.device)
        mel_ids = torch.cat([start, codes, stop], dim=1)
        mel = self.mel_embedding(mel_ids) + self.mel_pos_embedding.emb.weight[: n + 2][None]
        embeds = torch.cat([self.conditioning(spk_latent, emovec), self.text_embeddings(text_ids), mel], dim=1)
        h, _ = self.run_embeddings(embeds)
        return self.final_norm(h[:, h.shape[1] - (n + 2): h.shape[1] - 2])


def merge_emovec(base: torch.Tensor, emo: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """upstream merge_emovec's arithmetic: base + alpha * (emo - base) (host side in the runtime)."""
    return base + alpha * (emo - base)


# ---------------------------------------------------------------------------------------------------
# Loading

#: gpt.pth keys upstream's strict=False load drops and inference never reads.
IGNORED = (
    "text_head.*",             # text-prediction head: present in the real file, used only by the training loss
    "gpt.h.*.attn.bias",       # causal-mask buffers older transformers saved (non-persistent now)
    "gpt.h.*.attn.masked_bias",
    "gpt.wte.weight",          # only in files saved after post_init_gpt2_config: an alias of mel_embedding
    "inference_model.*",       # likewise: GPT2InferenceModel's references to gpt / heads / embeddings
)


def _gpt_state(path: Path) -> dict[str, torch.Tensor]:
    """gpt.pth is the UnifiedVoice state dict, or {'model': state dict} (upstream load_checkpoint accepts both)."""
    obj = read_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return as_state_dict(obj["model"], path, "['model']")
    return as_state_dict(obj, path)


def gpt_version_of(state: dict[str, torch.Tensor], source: str) -> str:
    """2.0 or 2.5, from the keys only a 2.0 / 2.5 gpt.pth holds (VERSION_MARKERS). Upstream loads with
    strict=False, so a file of the other version would load silently with random parts; here a file with
    the marks of both or of neither is refused."""
    found = {v: sorted({m for m in marks for k in state if k.startswith(m)}) for v, marks in VERSION_MARKERS.items()}
    hits = [v for v, keys in found.items() if keys]
    if len(hits) != 1:
        what = "; ".join(f"{v}: {', '.join(k.rstrip('.') for k in keys) or 'none'}" for v, keys in found.items())
        raise CheckpointError(f"{source}: cannot tell the IndexTTS2 version from the GPT keys ({what}): expected "
                              "the marks of exactly one version")
    return hits[0]


def read_gpt_version(path: str | Path) -> str:
    """The version of a gpt.pth file (`gpt_version_of` over its keys)."""
    return gpt_version_of(_gpt_state(Path(path)), str(path))


def load_gpt(path: str | Path, cfg: GPTConfig, semantic_dim: int = 1024, version: str | None = None) -> UnifiedVoice:
    """Read `gpt.pth` strictly (except `IGNORED`) into a UnifiedVoice in eval mode.

    The version comes from the file's keys; `version` (what config.yaml says, if anything) must agree, or the
    error names both. `semantic_dim` is the conformer input width (`semantic_codec.hidden_size`, 1024 for the
    real config; upstream hard-codes 1024).
    """
    path = Path(path)
    state = _gpt_state(path)
    found = gpt_version_of(state, str(path))
    if version is not None and str(version) != found:
        raise CheckpointError(f"{path}: the GPT keys are IndexTTS-{found}'s "
                              f"({', '.join(m.rstrip('.') for m in VERSION_MARKERS[found])}) but the config says "
                              f"version {version}: use the config.yaml that belongs to this checkpoint")
    model = UnifiedVoice(cfg, semantic_dim=semantic_dim, version=found)
    load_into(model, state, str(path), ignore=IGNORED)
    log.debug("%s: loaded UnifiedVoice %s (%d layers, dim %d)", path, found, cfg.layers, cfg.model_dim)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Demo weights

_HF_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
#: Residual-branch output projections, shrunk so the residual streams do not grow with depth.
_GPT_RESIDUAL_OUT = ("attn.c_proj.weight", "mlp.c_proj.weight")
_PERCEIVER_RESIDUAL_OUT = (".0.to_out.weight", ".1.2.weight")
EMBEDDING_STD = 0.3


def _matrix_std(name: str, p: torch.Tensor, cfg: GPTConfig) -> float:
    """N(0, gain / sqrt(fan_in)); HF Conv1D weights are [in, out], everything else [out, in, ...]."""
    fan_in = p.shape[0] if name.endswith(_HF_CONV1D) else p[0].numel()
    gain = 1.0
    if name.startswith("gpt.") and name.endswith(_GPT_RESIDUAL_OUT):
        gain = (2 * cfg.layers) ** -0.5
    elif "perceiver_encoder.layers." in name and name.endswith(_PERCEIVER_RESIDUAL_OUT):
        gain = 0.5
    return gain / fan_in**0.5


def _randomize(model: UnifiedVoice, generator: torch.Generator) -> None:
    """Seeded weights keeping a full 24-layer model's activations O(1) and its logits spread (std ~1)."""
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    norm_params |= {id(m.gamma) for m in model.modules() if hasattr(m, "gamma")}
    embed_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if id(p) in norm_params:
                p.copy_(1.0 + 0.05 * noise)
            elif id(p) in embed_params or name.endswith(("pos_bias_u", "pos_bias_v")):
                p.copy_(EMBEDDING_STD * noise)
            elif name.endswith("latents"):
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise * _matrix_std(name, p, model.cfg))
            else:
                p.copy_(0.02 * noise)


def write_demo_gpt(path: str | Path, cfg: GPTConfig, semantic_dim: int, generator: torch.Generator,
                   version: str = VERSION_20) -> None:
    """Write a random-weight `gpt.pth` that `load_gpt` reads: a plain state dict in upstream's key layout
    (2.0 or 2.5), with the unused `text_head.*` and the conformers' `embed.pos_enc.pe` sinusoid tables, no
    `inference_model.*`. Random weights make noise codes, not speech (and rarely emit stop)."""
    model = UnifiedVoice(cfg, semantic_dim=semantic_dim, version=version)
    _randomize(model, generator)
    state = dict(model.state_dict())
    n_text = cfg.number_text_tokens + 1
    state["text_head.weight"] = torch.randn((n_text, cfg.model_dim), generator=generator) / cfg.model_dim**0.5
    state["text_head.bias"] = 0.02 * torch.randn((n_text,), generator=generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    log.info("wrote demo GPT weights to %s", path)
