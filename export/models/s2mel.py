"""The s2mel family: `gpt_layer`, the length regulator and the CFM/DiT decoder, loaded from `s2mel.pth`.

upstream: indextts/s2mel/modules/commons.py:MyModel (+ load_checkpoint2) as built by
indextts/infer_v2.py:IndexTTS2.__init__ — UPSTREAM.md §3.2.

`s2mel.pth` is `{'net': {'cfm': sd, 'length_regulator': sd, 'gpt_layer': sd}, ...}`, keys optionally
prefixed `module.`. Upstream loads it shape-filtered with strict=False; we load strictly (missing,
unexpected or mis-shaped keys are a CheckpointError) except for the keys listed in `IGNORED`, which the
real checkpoint holds but inference never reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from runtime.errors import CheckpointError

from ..checkpoint import as_state_dict, fold_weight_norm, load_into, read_torch_file, strip_prefix
from ..config import S2MelConfig
from .cfm import CFM
from .dit import RMSNorm
from .length_regulator import LengthRegulator

log = logging.getLogger(__name__)

PARTS = ("cfm", "length_regulator", "gpt_layer")

# Checkpoint keys upstream holds but never uses at inference (patterns are matched after weight-norm folding).
IGNORED: dict[str, tuple[str, ...]] = {
    "cfm": (
        "estimator.x_embedder.*",             # weight-normed Linear(80, H): built, never called by DiT.forward
        "estimator.cond_embedder.weight",     # Embedding for discrete content; inference feeds continuous cond
        "estimator.content_mask_embedder.weight",  # training-time content masking token
        "estimator.input_pos",                # int64 arange(16384); positions are built from arange(T) instead
    ),
    "length_regulator": (
        "embedding.weight",                   # codebook for discrete input (is_discrete false)
        "mask_token",                         # training-time masking token
    ),
    "gpt_layer": (),
}

# Sizes of the unused-but-stored tensors, needed only to write demo files in the original layout.
DIT_INPUT_POS = 16384            # upstream ModelArgs.block_size


def build_gpt_layer(gpt_dim: int, out_dim: int) -> nn.Sequential:
    """upstream MyModel.models['gpt_layer']: three Linears, NO activations (GPT latent -> codec width).

    Upstream hard-codes Linear(1280,256), Linear(256,128), Linear(128,1024); `gpt_dim` and `out_dim`
    (= length_regulator.in_channels) generalise it for small demo models.
    """
    return nn.Sequential(nn.Linear(gpt_dim, 256), nn.Linear(256, 128), nn.Linear(128, out_dim))


class S2Mel(nn.Module):
    """Container of the parts that were asked for; absent parts are None.

    - `gpt_layer(latent (B,N,gpt_dim)) -> (B,N,in_channels)`
    - `length_regulator(x (B,T_in,in_channels), ylens (B,)) -> (cond (B,max(ylens),C), olens)`
    - `cfm(...)` = one Euler/CFG step (the dit_step contract); `cfm.estimator` = the DiT.
    """

    def __init__(self, cfg: S2MelConfig, gpt_dim: int = 1280, parts: Iterable[str] = PARTS) -> None:
        super().__init__()
        parts = tuple(parts)
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown s2mel parts {unknown}; expected a subset of {PARTS}")
        self.cfg = cfg
        self.parts = parts
        self.cfm = CFM(cfg) if "cfm" in parts else None
        self.length_regulator = LengthRegulator(cfg.length_regulator) if "length_regulator" in parts else None
        self.gpt_layer = (build_gpt_layer(gpt_dim, cfg.length_regulator.in_channels)
                          if "gpt_layer" in parts else None)


def _net_dict(path: Path) -> dict:
    obj = read_torch_file(path)
    net = obj.get("net") if isinstance(obj, dict) else None
    if not isinstance(net, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'net' entry ({{'net': {{'cfm': ..., "
                              f"'length_regulator': ..., 'gpt_layer': ...}}}}), got "
                              f"{type(obj).__name__} with keys {list(obj)[:10] if isinstance(obj, dict) else '-'}")
    return net


def load_s2mel(path: str | Path, cfg: S2MelConfig, gpt_dim: int = 1280,
               parts: Iterable[str] = PARTS) -> S2Mel:
    """Read `s2mel.pth` and return the requested parts loaded strictly, in eval mode."""
    path = Path(path)
    model = S2Mel(cfg, gpt_dim=gpt_dim, parts=parts)
    net = _net_dict(path)
    for part in model.parts:
        if part not in net:
            raise CheckpointError(f"{path}: net['{part}'] not found (the file holds {sorted(net)})")
        state = strip_prefix(as_state_dict(net[part], path, f"net['{part}']"), "module.")
        try:
            state = fold_weight_norm(state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}:net['{part}']: {err}") from err
        load_into(getattr(model, part), state, f"{path}:net['{part}']", ignore=IGNORED[part])
    log.debug("%s: loaded s2mel parts %s", path, model.parts)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Demo weights

def _gain(name: str, depth: int, wn_layers: int) -> float:
    """Weight std multiplier (on 1/sqrt(fan_in)) keeping every stage O(1) through a 25-step solve.

    Residual-branch outputs are shrunk with depth so the residual streams do not grow; modulation
    layers are small so AdaLN weights sit near 1 (their bias) and FinalLayer's shift/scale near 0.
    """
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return (2 * depth) ** -0.5
    if name.endswith("project_layer.weight") or "adaLN_modulation" in name:
        return 0.1
    if ".res_skip_layers." in name or name.endswith("cond_layer.conv.conv.weight"):
        return wn_layers ** -0.5
    return 1.0


def _randomize(model: S2Mel, generator: torch.Generator) -> None:
    """Seeded random weights in place: N(0, gain/sqrt(fan_in)) matrices, small biases, norms ~1."""
    depth, wn_layers = model.cfg.DiT.depth, model.cfg.wavenet.num_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(noise * _gain(name, depth, wn_layers) / fan_in**0.5)
            elif name.endswith("project_layer.bias"):     # [w | b] of AdaLN: w ≈ 1, b ≈ 0
                half = p.shape[0] // 2
                p.copy_(0.02 * noise)
                p[:half] += 1.0
            else:                                             # biases
                p.copy_(0.02 * noise)
        for module in model.modules():                        # RMSNorm / GroupNorm scales ≈ 1
            if isinstance(module, (RMSNorm, nn.GroupNorm)):
                module.weight.copy_(1.0 + 0.05 * torch.randn(module.weight.shape, generator=generator))


def _original_cfm_state(cfm: CFM, cfg: S2MelConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The CFM state dict in upstream's layout: weight norm unfolded, unused tensors added."""
    from ..checkpoint import unfold_weight_norm

    state = {k: v.clone() for k, v in cfm.state_dict().items()}
    wn = [k for k in state if k.endswith(".conv.conv.weight") and ".wavenet." in k]
    state = unfold_weight_norm(state, wn + ["estimator.final_layer.linear.weight"])
    hid, n_in = cfg.DiT.hidden_dim, cfg.DiT.in_channels
    state["estimator.x_embedder.weight_g"] = 0.6 + 0.8 * torch.rand((hid, 1), generator=generator)
    state["estimator.x_embedder.weight_v"] = torch.randn((hid, n_in), generator=generator)
    state["estimator.x_embedder.bias"] = 0.02 * torch.randn((hid,), generator=generator)
    state["estimator.cond_embedder.weight"] = 0.3 * torch.randn((cfg.DiT.content_codebook_size, hid), generator=generator)
    state["estimator.content_mask_embedder.weight"] = 0.3 * torch.randn((1, hid), generator=generator)
    state["estimator.input_pos"] = torch.arange(DIT_INPUT_POS, dtype=torch.int64)
    return state


def write_demo_s2mel(path: str | Path, cfg: S2MelConfig, gpt_dim: int, generator: torch.Generator) -> None:
    """Write a random-weight `s2mel.pth` in the original layout (all three parts) that `load_s2mel` reads.

    Random weights make noise, not speech; they are scaled so a 25-step CFG solve on random inputs
    stays finite with std O(1).
    """
    model = S2Mel(cfg, gpt_dim=gpt_dim)
    _randomize(model, generator)
    lr_cfg = cfg.length_regulator
    lr_state = {k: v.clone() for k, v in model.length_regulator.state_dict().items()}
    lr_state["embedding.weight"] = 0.3 * torch.randn((lr_cfg.content_codebook_size, lr_cfg.channels),
                                                     generator=generator)
    lr_state["mask_token"] = 0.3 * torch.randn((1, lr_cfg.channels), generator=generator)
    net = {
        "cfm": _original_cfm_state(model.cfm, cfg, generator),
        "length_regulator": lr_state,
        "gpt_layer": {k: v.clone() for k, v in model.gpt_layer.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net": net}, path)
    log.info("wrote demo s2mel weights to %s", path)
