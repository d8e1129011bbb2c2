"""Where the files of an IndexTTS2 checkpoint directory are.

The original layout (UPSTREAM §1.1): `config.yaml`, `gpt.pth`, `s2mel.pth`, `bpe.model`,
`wav2vec2bert_stats.pt`, `feat1.pt`, `feat2.pt` at the top (names from config.yaml), and the auxiliary
models under `hf_cache/` (as upstream's `ensure_models_available` puts them) or beside the others.
Several spellings of the auxiliary locations are accepted, including a Hugging Face cache snapshot
folder, so that a user's real directory works unchanged. Nothing is downloaded: a file that is not
found is a `CheckpointError` that names every place that was looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from runtime.errors import CheckpointError

from .config import IndexTTS2Config, load_config

VERSION_20, VERSION_25 = "2.0", "2.5"
#: IndexTTS-2.5's top-level files that 2.0 does not have (upstream hard-codes both names; UPSTREAM-2.5 §2).
CODEC_FILE = "codec.pth"
TIKTOKEN_FILE = "multilingual_zh_ja_yue_char_del.tiktoken"

# Candidate locations of the auxiliary models, relative to the checkpoint directory, in search order.
# `*` is a glob (Hugging Face cache snapshots). The first entry is what the demo generator writes.
AUX_CANDIDATES: dict[str, tuple[str, ...]] = {
    "w2v_bert": (
        "hf_cache/w2v-bert-2.0",
        "w2v-bert-2.0",
        "hf_cache/models--facebook--w2v-bert-2.0/snapshots/*",
    ),
    "semantic_codec": (
        "hf_cache/semantic_codec/model.safetensors",
        "hf_cache/semantic_codec_model.safetensors",
        "semantic_codec/model.safetensors",
        "hf_cache/models--amphion--MaskGCT/snapshots/*/semantic_codec/model.safetensors",
    ),
    "campplus": (
        "hf_cache/campplus_cn_common.bin",
        "campplus_cn_common.bin",
        "hf_cache/models--funasr--campplus/snapshots/*/campplus_cn_common.bin",
    ),
    "bigvgan": (
        "hf_cache/bigvgan",
        "bigvgan",
        "hf_cache/models--nvidia--bigvgan_v2_22khz_80band_256x/snapshots/*",
    ),
}


def _find(root: Path, candidates: tuple[str, ...]) -> Path | None:
    for rel in candidates:
        if "*" in rel:
            hits = sorted(root.glob(rel))
            if hits:
                return hits[-1]
        elif (root / rel).exists():
            return root / rel
    return None


@dataclass(frozen=True)
class CheckpointLayout:
    """Resolved paths of one checkpoint directory. Paths may not exist; `require` checks."""

    root: Path
    config: IndexTTS2Config

    @classmethod
    def open(cls, root: str | Path) -> "CheckpointLayout":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"{root}: checkpoint directory not found")
        return cls(root=root, config=load_config(root / "config.yaml"))

    @cached_property
    def version(self) -> str:
        """"2.0" or "2.5", from the GPT's keys (read without loading the tensors). Upstream loads with
        strict=False, and a 2.5 download's root config.yaml was reported to be another model's (#739), so the
        config is not trusted: when it states a version, it must agree, else the error names both."""
        from .checkpoint import read_torch_keys
        from .models.unified_voice import gpt_version_of

        gpt = self.require("gpt")
        version = gpt_version_of(dict.fromkeys(read_torch_keys(gpt)), str(gpt))
        stated = self.config.version
        if stated is not None and str(stated) != version:
            raise CheckpointError(f"{self.root}: gpt.pth is IndexTTS-{version}'s (its keys) but config.yaml says "
                                  f"version {stated}: use the config.yaml that belongs to these weights")
        return version

    def main_file(self, role: str) -> Path:
        """A top-level file: gpt, s2mel, bpe, w2v_stats, feat1, feat2, qwen_emo (named by config.yaml), and
        IndexTTS-2.5's codec and tiktoken (fixed names upstream)."""
        names = {
            "codec": CODEC_FILE,
            "tiktoken": TIKTOKEN_FILE,
            "gpt": self.config.gpt_checkpoint,
            "s2mel": self.config.s2mel_checkpoint,
            "bpe": self.config.bpe_model,
            "w2v_stats": self.config.w2v_stat,
            "feat1": self.config.spk_matrix,
            "feat2": self.config.emo_matrix,
            "qwen_emo": self.config.qwen_emo_path,
        }
        if role not in names:
            raise KeyError(role)
        return self.root / names[role]

    def aux(self, role: str) -> Path:
        """An auxiliary model (w2v_bert dir, semantic_codec file, campplus file, bigvgan dir); must exist."""
        found = _find(self.root, AUX_CANDIDATES[role])
        if found is None:
            looked = ", ".join(str(self.root / c) for c in AUX_CANDIDATES[role])
            raise CheckpointError(f"{role}: not found in the checkpoint directory; looked for {looked}")
        return found

    def require(self, role: str) -> Path:
        """The path of `role` (main file or auxiliary model), which must exist."""
        if role in AUX_CANDIDATES:
            return self.aux(role)
        path = self.main_file(role)
        if not path.exists():
            raise CheckpointError(f"{path}: required checkpoint file ({role}) not found")
        return path
