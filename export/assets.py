"""The runtime's non-graph files, written into the export directory by `export.build`.

The runtime reads neither the checkpoint directory nor `.pt` files (it has no torch), so everything it
needs besides the graphs is copied or converted here, once, and recorded in the manifest with its sha256
(runtime.manifest.RuntimeAssets): the SentencePiece model, the glossary (when the checkpoint has one),
and feat1.pt / feat2.pt as one float32 `.npz`. The emotion LLM is referenced by path, not copied.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from runtime.manifest import ASSETS_DIR, AssetFile, RuntimeAssets, sha256_file

from .emotion_matrices import load_emotion_matrices
from .layout import CheckpointLayout

log = logging.getLogger(__name__)

BPE_FILE = "bpe.model"
TIKTOKEN_ASSET = "text.tiktoken"
GLOSSARY_FILE = "glossary.yaml"
MATRICES_FILE = "emotion_matrices.npz"


def write_assets(layout: CheckpointLayout, out: str | Path) -> RuntimeAssets:
    """Copy / convert the runtime assets of `layout` into `out/assets/`; -> their manifest record."""
    cfg = layout.config
    folder = Path(out) / ASSETS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if layout.version == "2.0":
        bpe, tiktoken = _copy(layout.require("bpe"), folder / BPE_FILE, out), None
    else:                                   # IndexTTS-2.5: the tiktoken ranks file instead of bpe.model
        bpe, tiktoken = None, _copy(layout.require("tiktoken"), folder / TIKTOKEN_ASSET, out)
    glossary_src = layout.root / GLOSSARY_FILE
    glossary = _copy(glossary_src, folder / GLOSSARY_FILE, out) if glossary_src.is_file() else None
    model_dim = cfg.gpt.model_dim if cfg.gpt is not None else None
    matrices = load_emotion_matrices(layout.require("feat1"), layout.require("feat2"), cfg.emo_num,
                                     model_dim=model_dim)
    buf = io.BytesIO()
    np.savez(buf, feat1=np.concatenate(matrices.spk), feat2=np.concatenate(matrices.emo),
             emo_num=np.asarray(cfg.emo_num, np.int64))
    emotion = _write(buf.getvalue(), folder / MATRICES_FILE, out)
    llm = layout.main_file("qwen_emo")
    record = RuntimeAssets(bpe=bpe, tiktoken=tiktoken, glossary=glossary, emotion_matrices=emotion,
                           emo_num=tuple(int(n) for n in cfg.emo_num),
                           emotion_llm=str(llm.resolve()) if llm.is_dir() else "")
    log.info("runtime assets written to %s (emotion LLM: %s)", folder, record.emotion_llm or "none")
    return record


def _copy(src: Path, dst: Path, out: str | Path) -> AssetFile:
    tmp = _temp_next_to(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return AssetFile(dst.relative_to(out).as_posix(), sha256_file(dst))


def _write(data: bytes, dst: Path, out: str | Path) -> AssetFile:
    tmp = _temp_next_to(dst)
    try:
        Path(tmp).write_bytes(data)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return AssetFile(dst.relative_to(out).as_posix(), sha256_file(dst))


def _temp_next_to(dst: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    return tmp
