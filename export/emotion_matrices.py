"""Reading the emotion-vector matrices `feat1.pt` / `feat2.pt` into the runtime's `EmotionMatrices`.

upstream: indextts/infer_v2.py:IndexTTS2.__init__ (`torch.load(feat2.pt)` / `torch.load(feat1.pt)`, then
`torch.split(..., cfg.emo_num)`); UPSTREAM.md §1.1, §2.0 step 8. `feat1.pt` is the speaker-space
prototype matrix (sum(emo_num), 192) (CAMPPlus style space), `feat2.pt` the GPT-space emotion matrix
(sum(emo_num), model_dim); both are plain tensors (no dict around them).

The matrices are handed to the runtime as float32 numpy arrays: upstream compares them with the style in
float32 (`find_most_similar_cosine` calls `.float()`) and mixes them with float32 weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from runtime.emotion import DEFAULT_EMO_NUM, EmotionMatrices
from runtime.errors import CheckpointError

from .checkpoint import read_torch_file

log = logging.getLogger(__name__)

STYLE_DIM = 192  # CAMPPlus embedding size: the width of feat1.pt


def read_matrix(path: str | Path, rows: int, cols: int | None, role: str) -> np.ndarray:
    """One plain-tensor `.pt` file as a float32 (rows, cols) array; anything else is a CheckpointError."""
    obj = read_torch_file(path)
    if not isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{path}: expected a plain tensor ({role}), got {type(obj).__name__}")
    if not obj.is_floating_point():
        raise CheckpointError(f"{path}: {role} must be a floating-point tensor, got {obj.dtype}")
    want = f"({rows}, {cols if cols is not None else 'any'})"
    if obj.dim() != 2 or obj.shape[0] != rows or (cols is not None and obj.shape[1] != cols):
        raise CheckpointError(f"{path}: {role} has shape {tuple(obj.shape)}, expected {want} "
                              f"(rows = sum(emo_num); is config.yaml for another checkpoint?)")
    array = obj.detach().to(torch.float32).contiguous().numpy()
    if not np.all(np.isfinite(array)):
        raise CheckpointError(f"{path}: {role} contains NaN or infinite values")
    return array


def load_emotion_matrices(
    feat1_path: str | Path,
    feat2_path: str | Path,
    emo_num: Sequence[int] = DEFAULT_EMO_NUM,
    model_dim: int | None = None,
    style_dim: int | None = STYLE_DIM,
) -> EmotionMatrices:
    """Read feat1.pt (spk_matrix) and feat2.pt (emo_matrix) and split them by emo_num.

    `model_dim` (the GPT width, 1280 for the real model) and `style_dim` (192) are checked when given;
    the row count must equal sum(emo_num).
    """
    rows = sum(int(n) for n in emo_num)
    feat1 = read_matrix(feat1_path, rows, style_dim, "spk_matrix (feat1)")
    feat2 = read_matrix(feat2_path, rows, model_dim, "emo_matrix (feat2)")
    matrices = EmotionMatrices.from_arrays(feat1, feat2, emo_num, source=f"{feat1_path} / {feat2_path}")
    log.info("loaded emotion matrices %s %s and %s %s", feat1_path, feat1.shape, feat2_path, feat2.shape)
    return matrices


def write_demo_emotion_matrices(
    feat1_path: str | Path,
    feat2_path: str | Path,
    generator: torch.Generator,
    emo_num: Sequence[int] = DEFAULT_EMO_NUM,
    model_dim: int = 1280,
    style_dim: int = STYLE_DIM,
) -> None:
    """Seeded random matrices in the original layout (plain tensors).

    feat1 rows are N(0, 1) (only their directions matter: cosine argmax against the style); feat2 rows
    are N(0, 0.3^2), the scale of an emovec, so that the mixed emovec stays in the range the GPT sees.
    """
    rows = sum(int(n) for n in emo_num)
    torch.save(torch.randn(rows, style_dim, generator=generator), Path(feat1_path))
    torch.save(0.3 * torch.randn(rows, model_dim, generator=generator), Path(feat2_path))
