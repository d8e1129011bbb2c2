"""The 2.5 GPT: version read from the checkpoint keys (not the config), refused when the keys or the config
contradict; batched rows equal each row alone (upstream cannot run B > 1: quirk 1); no latent pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from export.config import load_config
from export.gpt_executor import EagerGptSteps
from export.models.unified_voice import (VERSION_20, VERSION_25, gpt_version_of, load_gpt, read_gpt_version,
                                         write_demo_gpt)
from runtime.errors import CheckpointError


@pytest.fixture(scope="module")
def gpt25_file(fixtures25_root: Path, tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("gpt25") / "gpt.pth"
    torch.save(load_file(str(fixtures25_root / "gpt25" / "weights.safetensors")), path)
    return path, load_config(fixtures25_root / "gpt25" / "config.yaml")


def test_version_comes_from_the_keys(gpt25_file, tmp_path: Path) -> None:
    path, cfg = gpt25_file
    assert read_gpt_version(path) == VERSION_25
    assert load_gpt(path, cfg.gpt, version="2.5").version == VERSION_25
    assert load_gpt(path, cfg.gpt).version == VERSION_25            # the config need not say
    demo = tmp_path / "gpt20.pth"
    write_demo_gpt(demo, cfg.gpt, 32, torch.Generator().manual_seed(0))
    assert read_gpt_version(demo) == VERSION_20


def test_a_config_of_the_other_version_is_refused_naming_both(gpt25_file) -> None:
    path, cfg = gpt25_file
    with pytest.raises(CheckpointError, match=r"IndexTTS-2\.5's .*spk_emb_proj.*config says version 2\.0"):
        load_gpt(path, cfg.gpt, version="2.0")


def test_keys_of_both_or_neither_version_are_refused() -> None:
    both = {"spk_emb_proj.weight": torch.zeros(1), "conditioning_encoder.x": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="2.0: conditioning_encoder; 2.5: spk_emb_proj"):
        gpt_version_of(both, "gpt.pth")
    with pytest.raises(CheckpointError, match="cannot tell the IndexTTS2 version"):
        gpt_version_of({"gpt.h.0.ln_1.weight": torch.zeros(1)}, "gpt.pth")


def test_rows_of_a_batched_prefill_are_each_row_alone(gpt25_file) -> None:
    """Upstream's campplus path crashes for B > 1; here each row gets what B = 1 gives (the scheduler shares
    prefill calls between requests)."""
    path, cfg = gpt25_file
    steps = EagerGptSteps(load_gpt(path, cfg.gpt))
    rng = np.random.default_rng(0)
    d = cfg.gpt.model_dim
    feeds = [{"style": rng.standard_normal((1, 192)).astype(np.float32),
              "lang_id": np.array([lang], np.int64),
              "emovec": rng.standard_normal((1, d)).astype(np.float32),
              "text_ids": rng.integers(2, 300, (1, 7)).astype(np.int64)} for lang in (0, 1, 105)]
    batched = steps.prefill({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    assert batched["kv"].shape[4] == 7 + 6                          # P = L + 6 (3 conditioning rows)
    for b, feed in enumerate(feeds):
        alone = steps.prefill(feed)
        np.testing.assert_allclose(batched["logits"][b:b + 1], alone["logits"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(batched["kv"][:, :, b:b + 1], alone["kv"], rtol=0, atol=1e-5)


def test_the_2_5_gpt_has_no_latent_pass_and_needs_its_language(gpt25_file) -> None:
    path, cfg = gpt25_file
    model = load_gpt(path, cfg.gpt)
    d = cfg.gpt.model_dim
    with pytest.raises(ValueError, match="no GPT latent pass"):
        model.latent(torch.zeros(1, 192), torch.zeros(1, d), torch.ones(1, 3, dtype=torch.long),
                     torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="needs its lang_id"):
        model.prefill(torch.zeros(1, 192), torch.zeros(1, d), torch.ones(1, 3, dtype=torch.long))


def test_contracts_per_version() -> None:
    """2.5's graph set (UPSTREAM-2.5 §4): no conformer/perceiver speaker path, no latent pass; gpt_prefill takes
    the style and the language, P = L + 6; the codec decoder doubles the code rate; longer mel axes."""
    from runtime.contracts import ModelDims, build_contracts, graph_names

    assert graph_names("2.5") == ("semantic_encoder", "campplus", "emotion_conditioner", "gpt_prefill",
                                  "gpt_decode", "semantic_decoder", "length_regulator", "dit_step", "bigvgan")
    c20, c25 = build_contracts(version="2.0"), build_contracts(version="2.5")
    assert c25["gpt_prefill"].input_names == ("style", "lang_id", "emovec", "text_ids")
    dims = ModelDims()
    assert c25["gpt_prefill"].outputs[1].concrete(dims, {"batch": 1, "text_len": 10})[4] == 16
    assert c20["gpt_prefill"].outputs[1].concrete(dims, {"batch": 1, "text_len": 10})[4] == 47
    assert c25["semantic_decoder"].outputs[0].concrete(dims, {"batch": 2, "code_len": 7}) == (2, 14, 1024)
    assert c25["dit_step"].ranges["mel_len"].max > 12487 >= c20["dit_step"].ranges["mel_len"].max
    assert c25["gpt_decode"] == c20["gpt_decode"]
    with pytest.raises(ValueError, match="version '3.0'"):
        build_contracts(version="3.0")
