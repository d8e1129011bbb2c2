"""IndexTTS-2.5's semantic decoder: codes -> S_infer, what replaces 2.0's GPT latent pass.

upstream: indextts/codec/models.py:EnhancedCodec.decode (CM:205-231; UPSTREAM-2.5 §1, "semantic_decoder math"):
`vq2emb` (the raw codebook row through the weight-normed 1x1 `out_project`) -> `decoder` (VocosBackbone +
Linear, the same blocks as 2.0's RepCodec, export/models/semantic_codec.py) -> nearest x2 in time -> `up`
(Conv1d k3 p1): (B, N) -> (B, 2N, hidden). Batch-correct (unlike 2.0's `vq2emb(codes.unsqueeze(1))`).

The file (`codec.pth`, `{'model': state_dict}`) also holds the encoder, the quantizer's `in_project` and `down`,
used only to make codes from features (training): the loader ignores them by name and refuses anything else
missing or mis-shaped (upstream keeps the random init of such keys with a warning only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import CheckpointError

from ..checkpoint import as_state_dict, fold_weight_norm, load_into, read_torch_file
from ..config import SemanticCodecConfig
from .semantic_codec import FactorizedVQ, random_param, build_coder, demo_codec_state

log = logging.getLogger(__name__)


class SemanticDecoder(nn.Module):
    """`forward(codes (B, N) int64) -> S_infer (B, 2N, hidden)`; `parts` also gives emb and decoder_out."""

    def __init__(self, cfg: SemanticCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = build_coder(cfg)
        self.quantizer = nn.Module()
        self.quantizer.quantizers = nn.ModuleList(
            [FactorizedVQ(cfg.hidden_size, cfg.codebook_size, cfg.codebook_dim)])
        self.up = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, kernel_size=3, padding=1)

    @property
    def vq(self) -> FactorizedVQ:
        return self.quantizer.quantizers[0]  # type: ignore[index,return-value]

    def parts(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.vq.embed(codes)                                             # (B, H, N)
        decoder_out = self.decoder(emb)                                        # (B, N, H)
        doubled = F.interpolate(decoder_out.transpose(1, 2), scale_factor=2, mode="nearest")   # (B, H, 2N)
        return {"emb": emb, "decoder_out": decoder_out, "S_infer": self.up(doubled).transpose(1, 2)}

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.parts(codes)["S_infer"]


#: what decode never reads (encoder side, training only)
IGNORED = ["encoder.*", "down.*", "quantizer.quantizers.0.in_project.*"]


def load_semantic_decoder(path: str | Path, cfg: SemanticCodecConfig) -> SemanticDecoder:
    """Read 2.5's `codec.pth` strictly (decode part), eval mode."""
    path = Path(path)
    blob = read_torch_file(path)
    if not (isinstance(blob, dict) and isinstance(blob.get("model"), dict)):
        raise CheckpointError(f"{path}: expected IndexTTS-2.5's codec checkpoint {{'model': state dict}}, got "
                              f"{type(blob).__name__}{' with keys ' + str(sorted(blob)[:5]) if isinstance(blob, dict) else ''}")
    state = as_state_dict(blob["model"], path, "['model']")
    model = SemanticDecoder(cfg)
    load_into(model, fold_weight_norm(state), str(path), ignore=IGNORED)
    log.info("semantic decoder: loaded %s", path)
    return model.eval()


def write_demo_semantic_decoder(path: str | Path, cfg: SemanticCodecConfig, generator: torch.Generator) -> Path:
    """Write a seeded random `codec.pth` in 2.5's layout ({'model': state dict}): the MaskGCT codec's keys
    (encoder, quantizer, decoder) plus `down` / `up` (Conv1d k3), as the real file holds."""
    state = demo_codec_state(cfg, generator)
    h = cfg.hidden_size
    for name in ("down", "up"):
        state[f"{name}.weight"] = random_param(f"{name}.weight", (h, h, 3), generator).float().contiguous()
        state[f"{name}.bias"] = random_param(f"{name}.bias", (h,), generator).float().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path
