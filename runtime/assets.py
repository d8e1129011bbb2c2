"""Reading the runtime's non-graph files of an export directory (written by export/assets.py).

Why a module: the tokenizer, the glossary and the emotion matrices are read from the export directory,
never from the checkpoint, so a deployment ships one directory and needs no torch. A directory exported
before these files existed is refused with the command that adds them (a re-run of export.build reuses
every graph and only writes the assets).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.emotion import EmotionMatrices
from runtime.errors import CheckpointError
from runtime.frontend.text.normalize import TextNormalizer
from runtime.frontend.text.tokenizer import TextTokenizer
from runtime.manifest import AssetFile, Manifest

if TYPE_CHECKING:
    from runtime.frontend.text25.frontend import TextFrontend25

REBUILD = "re-run python -m export.build --checkpoints CKPT --out DIR (graphs are reused, the assets written)"


def asset_path(manifest: Manifest, root: str | Path, role: str) -> Path:
    asset: AssetFile | None = manifest.assets.files().get(role)
    if asset is None:
        raise CheckpointError(f"{root}: the manifest records no runtime asset '{role}'; {REBUILD}")
    path = Path(root) / asset.file
    if not path.is_file():
        raise CheckpointError(f"{path}: runtime asset '{role}' is missing; {REBUILD}")
    return path


def load_tokenizer(manifest: Manifest, root: str | Path, normalizer: str = "auto") -> "TextTokenizer | TextFrontend25":
    """The export's text front-end: 2.0's SentencePiece model, or 2.5's tiktoken ranks with its front-end; both
    with the text normalizer (and the checkpoint's glossary when it has one)."""
    text_normalizer = TextNormalizer(enable_glossary=True, backend=normalizer)
    if manifest.assets.glossary is not None:
        text_normalizer.load_glossary_from_yaml(asset_path(manifest, root, "glossary"))
    if manifest.version == "2.5":
        from runtime.frontend.text25.bpe import BpeTokenizer
        from runtime.frontend.text25.frontend import TextFrontend25

        bpe = BpeTokenizer(asset_path(manifest, root, "tiktoken"))
        if bpe.vocab_size > manifest.dims.text_vocab:
            raise CheckpointError(f"{root}: the tokenizer has {bpe.vocab_size} ids, the GPT's text table "
                                  f"{manifest.dims.text_vocab}: the assets come from another checkpoint. {REBUILD}")
        return TextFrontend25(bpe, text_normalizer, manifest.dims.max_text_tokens)
    return TextTokenizer(asset_path(manifest, root, "bpe"), normalizer=text_normalizer)


def load_emotion_matrices(manifest: Manifest, root: str | Path) -> EmotionMatrices:
    """feat1 / feat2 from `emotion_matrices.npz`, split by the checkpoint's emo_num."""
    path = asset_path(manifest, root, "emotion_matrices")
    try:
        with np.load(path, allow_pickle=False) as data:
            feat1, feat2 = data["feat1"], data["feat2"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: unreadable emotion matrices ({err}); {REBUILD}") from err
    if feat2.shape[1:] != (manifest.dims.model_dim,):
        raise CheckpointError(f"{path}: feat2 is {feat2.shape}, the GPT width is {manifest.dims.model_dim}; "
                              f"the assets come from another checkpoint. {REBUILD}")
    return EmotionMatrices.from_arrays(feat1, feat2, manifest.assets.emo_num, source=str(path))
