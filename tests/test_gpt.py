"""GPT family (UnifiedVoice v2): fixture parity, greedy decoding through EagerGptSteps, KV-cache
correctness against the full causal pass, demo round trip, bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.demo import tiny_spec
from export.fixtures.kind_gpt import build_gpt_from_fixture, upstream_prefill_inputs
from export.fixtures.runner import open_fixture
from export.gpt_executor import EagerGptSteps
from export.models.gpt2 import MASK_NEG
from export.models.unified_voice import UnifiedVoice, load_gpt, write_demo_gpt
from runtime.contracts import kv_cache_name
from runtime.errors import CheckpointError, ContractError
from tests.conftest import assert_rows_pass, run_fixture_calls

CFG = tiny_spec().config.gpt
SEMANTIC_DIM = 64
GPT_CALLS = {
    "gpt": {"get_conditioning", "get_conditioning_b2", "get_emo_conditioning", "get_emovec", "merge_emovec",
            "decode_manual", "forward_latent"},
    "gpt_beam": {"latent_ids01"},
}
ATOL = RTOL = 1e-5   # the fixtures' tolerance for these calls


@pytest.mark.parametrize("name", sorted(GPT_CALLS))
def test_fixture(fixtures_root: Path, name: str) -> None:
    """This family's kinds; the decode-loop kinds (gpt_inference_*) belong to the generation family."""
    rows = [r for r in run_fixture_calls(fixtures_root, name) if r.call in GPT_CALLS[name]]
    assert {r.call for r in rows} == GPT_CALLS[name]
    assert_rows_pass(rows)


def _greedy(steps: EagerGptSteps, spk: np.ndarray, emovec: np.ndarray, text_ids: np.ndarray,
            n: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding through the numpy step protocol with a host-grown cache."""
    out = steps.prefill({"spk_latent": spk, "emovec": emovec, "text_ids": text_ids})
    logits, cache = out["logits"], list(out["kv"])
    all_logits, codes = [], []
    for k in range(n):
        all_logits.append(logits)
        codes.append(logits.argmax(-1))
        if k + 1 == n:
            break
        feed = {"mel_ids": codes[-1][:, None].astype(np.int64), "mel_pos": np.full((1, 1), k + 2, np.int64),
                "kv_mask": np.ones((1, cache[0].shape[3]), np.float32)}
        feed.update({kv_cache_name(i): np.ascontiguousarray(c) for i, c in enumerate(cache)})
        out = steps.decode(feed)
        logits = out["logits"]
        cache = [np.concatenate([c, nw], axis=3) for c, nw in zip(cache, out["kv_new"])]
    return np.stack(all_logits), np.stack(codes, axis=1)


@pytest.mark.parametrize("fixture,call", [("gpt", "inference_speech"), ("gpt_beam", "greedy_ids01")])
def test_greedy_through_step_protocol(fixtures_root: Path, fixture: str, call: str) -> None:
    """Upstream greedy inference_speech reproduced by prefill/decode on numpy feeds. greedy_ids01 has text
    ids 0/1 that upstream drops and LEFT-pads (zero rows, attention_mask 0): dropping them on the host and
    prefilling without padding gives the same logits, and upstream's padded prefill is reproduced too."""
    fx = open_fixture(fixtures_root / fixture)
    try:
        model = build_gpt_from_fixture(fx)
        io = fx.io
        spk_in = io[f"{call}.in.speech_condition"]
        emovec = io[f"{call}.in.emo_vec"] if f"{call}.in.emo_vec" in io else io["merge_emovec.out.emovec"]
        text = io[f"{call}.in.text_inputs"].astype(np.int64)
        with torch.inference_mode():
            spk = model.speaker_conditioner(torch.from_numpy(spk_in), torch.from_numpy(io[f"{call}.in.cond_lengths"]))
            embeds, input_ids, mask = upstream_prefill_inputs(model, spk, torch.from_numpy(emovec),
                                                              torch.from_numpy(text))
        np.testing.assert_allclose(spk.numpy(), io[f"{call}.out.speech_conditioning_latent"], atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(embeds.numpy(), io[f"{call}.out.inputs_embeds"], atol=ATOL, rtol=RTOL)
        assert np.array_equal(input_ids.numpy(), io[f"{call}.out.input_ids"])
        assert np.array_equal(mask.numpy(), io[f"{call}.out.attention_mask"])

        want_logits, want_codes = io[f"{call}.out.step_logits"], io[f"{call}.out.codes"]
        with torch.inference_mode():    # upstream's own (possibly left-padded) prefill, padding masked out
            full = torch.cat([embeds, model.start_mel_embedding(1, embeds)], dim=1)
            h, _ = model.run_embeddings(full, key_valid=mask.bool())
            padded_logits = model.head(h[:, -1])
        np.testing.assert_allclose(padded_logits.numpy(), want_logits[0], atol=ATOL, rtol=RTOL)

        kept = text[:, (text[0] != CFG.start_text_token) & (text[0] != CFG.stop_text_token)]
        assert kept.shape[1] == text.shape[1] - int((mask == 0).sum())
        logits, codes = _greedy(EagerGptSteps(model), spk.numpy(), emovec, kept, want_codes.shape[1])
        np.testing.assert_allclose(logits, want_logits, atol=ATOL, rtol=RTOL)
        assert np.array_equal(codes, want_codes)
    finally:
        fx.close()


# ---------------------------------------------------------------------------------------------------
# Demo model: KV cache, round trip, bad checkpoints

@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt") / "gpt.pth"
    write_demo_gpt(path, CFG, SEMANTIC_DIM, torch.Generator().manual_seed(0))
    return path


@pytest.fixture(scope="module")
def demo_model(demo_file: Path) -> UnifiedVoice:
    return load_gpt(demo_file, CFG, semantic_dim=SEMANTIC_DIM)


def _conditioning(model: UnifiedVoice, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, 40, SEMANTIC_DIM, generator=g)
    lengths = torch.full((batch,), SEMANTIC_DIM)
    return model.speaker_conditioner(feats, lengths), model.emotion_conditioner(feats, lengths)


def test_decode_matches_full_causal_pass(demo_model: UnifiedVoice) -> None:
    """Beams (B=3) with a preallocated cache bucket (unused rows hold garbage under kv_mask 0) and
    some masked rows: every decode step equals the teacher-forced causal pass with the same masking."""
    m, B, L, steps, bucket = demo_model, 3, 7, 5, 64
    g = torch.Generator().manual_seed(3)
    text = torch.randint(2, CFG.number_text_tokens, (B, L), generator=g)
    tokens = torch.randint(0, CFG.start_mel_token, (B, steps), generator=g)
    with torch.inference_mode():
        spk, emovec = _conditioning(m, B, seed=4)
        _, kv = m.prefill(spk, emovec, text)
        P = kv.shape[4]
        cache = torch.randn(CFG.layers, 2, B, CFG.heads, bucket, CFG.model_dim // CFG.heads, generator=g) * 100
        cache[:, :, :, :, :P] = kv
        kv_mask = torch.zeros(B, bucket)
        kv_mask[:, :P] = 1
        kv_mask[1, [3, 40]] = 0          # a conditioning row and a text row of beam 1
        kv_mask[2, P - 1] = 0            # beam 2 no longer sees the start mel token
        got = []
        for k in range(steps):
            pos = torch.full((B, 1), k + 2)
            logits, kv_new = m.decode(tokens[:, k:k + 1], pos, list(cache.unbind(0)), kv_mask)
            cache[:, :, :, :, P + k] = kv_new[:, :, :, :, 0]
            kv_mask[:, P + k] = 1
            got.append(logits)

        mel = m.mel_embeddings(tokens, torch.arange(2, steps + 2)[None].expand(B, -1))
        embeds = torch.cat([m.prefill_embeddings(spk, emovec, text), mel], dim=1)
        T = embeds.shape[1]
        allowed = torch.ones(B, T, T, dtype=torch.bool).tril()
        allowed[:, P:, :P] &= kv_mask[:, None, :P].bool()      # the decode queries' view of the prefill rows
        h, _ = m.gpt(embeds, torch.where(allowed, 0.0, MASK_NEG)[:, None])
        want = m.head(h[:, P:])
    torch.testing.assert_close(torch.stack(got, dim=1), want, atol=1e-5, rtol=1e-5)


def test_prefill_logits_and_kv_match_full_pass(demo_model: UnifiedVoice) -> None:
    with torch.inference_mode():
        spk, emovec = _conditioning(demo_model, 2, seed=5)
        text = torch.randint(2, CFG.number_text_tokens, (2, 9))
        logits, kv = demo_model.prefill(spk, emovec, text)
        all_logits, kv2 = demo_model.prefill_all_logits(spk, emovec, text)
    assert kv.shape == (CFG.layers, 2, 2, CFG.heads, 9 + 37, CFG.model_dim // CFG.heads)
    torch.testing.assert_close(logits, all_logits[:, -1])
    torch.testing.assert_close(kv, kv2)


def test_demo_layout_and_round_trip(demo_file: Path, demo_model: UnifiedVoice) -> None:
    state = torch.load(demo_file, weights_only=True)
    assert {"text_head.weight", "text_head.bias", "conditioning_encoder.embed.pos_enc.pe",
            "emo_conditioning_encoder.embed.pos_enc.pe", "gpt.h.1.attn.c_attn.weight"} <= set(state)
    assert not any(k.startswith(("inference_model.", "gpt.wte", "gpt.wpe")) for k in state)
    assert state["gpt.h.0.attn.c_attn.weight"].shape == (CFG.model_dim, 3 * CFG.model_dim)   # HF Conv1D [in, out]
    assert not demo_model.training
    steps = EagerGptSteps(demo_model)
    with torch.inference_mode():
        spk, emovec = _conditioning(demo_model, 1, seed=6)
        codes = torch.randint(0, CFG.start_mel_token, (1, 12))
        latent = demo_model.latent(spk, emovec, torch.randint(2, 100, (1, 8)), codes)
    assert spk.shape == (1, 32, CFG.model_dim) and emovec.shape == (1, CFG.model_dim)
    assert latent.shape == (1, 12, CFG.model_dim)
    logits, _ = _greedy(steps, spk.numpy(), emovec.numpy(), np.arange(2, 10, dtype=np.int64)[None], 6)
    for t in (spk, emovec, latent, torch.from_numpy(logits)):
        assert torch.isfinite(t).all() and 0.1 < float(t.std()) < 10


def test_step_protocol_rejects_bad_feeds(demo_model: UnifiedVoice) -> None:
    steps = EagerGptSteps(demo_model)
    spk = np.zeros((1, 32, CFG.model_dim), np.float32)
    emovec = np.zeros((1, CFG.model_dim), np.float32)
    with pytest.raises(ContractError, match="text_ids.*int64"):
        steps.prefill({"spk_latent": spk, "emovec": emovec, "text_ids": np.zeros((1, 3), np.int32)})
    with pytest.raises(ContractError, match="kv_cache.0"):
        steps.decode({"mel_ids": np.zeros((1, 1), np.int64), "mel_pos": np.zeros((1, 1), np.int64),
                      "kv_mask": np.ones((1, 4), np.float32)})
    assert steps.geometry.layers == CFG.layers and steps.geometry.vocab_size == CFG.number_mel_codes


def _rewrite(src: Path, dst: Path, edit) -> Path:
    state = torch.load(src, weights_only=True)
    out = edit(state)
    torch.save(out if isinstance(out, dict) else state, dst)
    return dst


def test_accepted_variants(demo_file: Path, tmp_path: Path) -> None:
    """{'model': sd}, no text_head, and old attn.bias / masked_bias buffers all load."""
    def edit(state: dict) -> dict:
        state.pop("text_head.weight"), state.pop("text_head.bias")
        state["gpt.h.0.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
        state["gpt.h.0.attn.masked_bias"] = torch.tensor(-1e4)
        return {"model": state}
    load_gpt(_rewrite(demo_file, tmp_path / "g.pth", edit), CFG, semantic_dim=SEMANTIC_DIM)


def test_missing_key(demo_file: Path, tmp_path: Path) -> None:
    path = _rewrite(demo_file, tmp_path / "g.pth", lambda s: s.pop("gpt.h.1.mlp.c_fc.weight") is None)
    with pytest.raises(CheckpointError, match=r"missing keys.*gpt\.h\.1\.mlp\.c_fc\.weight"):
        load_gpt(path, CFG, semantic_dim=SEMANTIC_DIM)


def test_unexpected_key(demo_file: Path, tmp_path: Path) -> None:
    path = _rewrite(demo_file, tmp_path / "g.pth", lambda s: s.update({"gpt.h.9.ln_1.weight": torch.ones(4)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*gpt\.h\.9\.ln_1\.weight"):
        load_gpt(path, CFG, semantic_dim=SEMANTIC_DIM)


def test_wrong_shape_and_wrong_semantic_dim(demo_file: Path, tmp_path: Path) -> None:
    path = _rewrite(demo_file, tmp_path / "g.pth", lambda s: s.update({"mel_head.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"mel_head\.bias: checkpoint \(7,\), model \(258,\)"):
        load_gpt(path, CFG, semantic_dim=SEMANTIC_DIM)
    with pytest.raises(CheckpointError, match=r"conditioning_encoder\.embed\.out\.0\.weight"):
        load_gpt(demo_file, CFG, semantic_dim=1024)


def test_truncated_and_wrong_container(demo_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pth"
    data = demo_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_gpt(bad, CFG, semantic_dim=SEMANTIC_DIM)
    odd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], odd)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_gpt(odd, CFG, semantic_dim=SEMANTIC_DIM)
