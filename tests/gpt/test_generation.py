"""The GPT decode loop (runtime/gpt/generate.py), its sampling, beam scorer and KV cache.

Fixtures: the logits processors, upstream's greedy / beam decodes over the eager GPT. Without any
model: torch's multinomial / topk reproduced from the same Exp(1) draws (ties included), the beam
fixtures' recorded logits replayed through the loop, the cache's reorder / growth, and a tiny numpy
attention model whose cached decode is checked row by row against a recompute without cache.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export.fixtures.kind_generation import beam_outputs, greedy_outputs
from export.fixtures.kinds import all_handlers
from export.fixtures.runner import compare, open_fixture, run_fixture
from runtime.contracts import kv_cache_name
from runtime.errors import InputError
from runtime.gpt import sampling
from runtime.gpt.beam import BeamScorer, FinishedSet, Hypothesis
from runtime.gpt.generate import GenerationConfig, generate, prefill_text_ids
from runtime.gpt.kv_cache import KVCache, bucket_for
from runtime.gpt.steps import GptGeometry
from tests.conftest import assert_rows_pass, run_fixture_calls

# ---------------------------------------------------------------------------------------------------
# Golden fixtures


@pytest.mark.parametrize("name", ["logits_processing", "gpt_beam"])
def test_fixture(fixtures_root: Path, name: str) -> None:
    assert_rows_pass(run_fixture_calls(fixtures_root, name))


def test_fixture_gpt_inference_speech(fixtures_root: Path) -> None:
    assert_rows_pass(list(run_fixture(fixtures_root / "gpt", all_handlers(), {"inference_speech"})))


# ---------------------------------------------------------------------------------------------------
# Sampling: torch's draws reproduced


def _torch_draws(shape: tuple[int, ...], seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return torch.empty(shape).exponential_().numpy().copy()


@pytest.mark.parametrize("n", [390, 3 * 8194])
def test_multinomial_matches_torch_including_zero_probabilities(n: int) -> None:
    rng = np.random.default_rng(n)
    for trial in range(60):
        probs = np.zeros(n, np.float32)
        count = int(rng.integers(1, 12))                        # often fewer than 6 drawable entries
        probs[rng.choice(n, count, replace=False)] = rng.random(count).astype(np.float32)
        probs /= probs.sum()
        torch.manual_seed(trial)
        want = torch.multinomial(torch.from_numpy(probs)[None], 6)[0].numpy()
        got = sampling.multinomial_without_replacement(probs, 6, _torch_draws((1, n), trial)[0])
        assert np.array_equal(got, want), (trial, got, want)


def test_topk_matches_torch_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(60):
        v = rng.normal(size=390).astype(np.float32)
        v[rng.random(390) < 0.6] = -np.inf
        v[130:] = np.round(v[130:]) - 1e9                      # float32 rounding at 1e9 makes many ties
        assert np.array_equal(sampling.topk_indices(v, 6), torch.topk(torch.from_numpy(v), 6).indices.numpy())


def _torch_beam_candidates(scores: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The statements of upstream's `_beam_search` (do_sample branch) on the same scores."""
    flat = torch.from_numpy(scores).view(1, -1)
    torch.manual_seed(seed)
    tokens = torch.multinomial(torch.softmax(flat, dim=-1), n)
    picked = torch.gather(flat, -1, tokens)
    _, order = torch.sort(picked, descending=True, dim=1)
    return torch.gather(tokens, -1, order)[0].numpy()


@pytest.mark.parametrize("peaked", [False, True])
def test_beam_sampling_candidates_match_torch(fixtures_root: Path, peaked: bool) -> None:
    """Step 0 (beams 1, 2 at -1e9): with a peaked row beam 0 keeps 2 tokens, the other 4 are zero-probability picks."""
    io = open_fixture(fixtures_root / "logits_processing").io
    logits = io["beam_sample.in.logits"].copy()
    if peaked:
        logits[:, 5] += 30.0
    settings = GenerationConfig().processors
    seen = sampling.seen_mask(io["beam_sample.in.input_ids"], logits.shape[1])
    for beam_scores in (io["beam_sample_step0.in.beam_scores"], io["beam_sample.in.beam_scores"]):
        scores = sampling.process_scores_(sampling.log_softmax(logits), seen, settings) + beam_scores[:, None]
        for seed in range(5):
            draws = sampling.ReplayDraws([_torch_draws((1, scores.size), seed)])
            got = sampling.beam_candidates(scores, 6, draws)
            assert np.array_equal(got, _torch_beam_candidates(scores, 6, seed)), (seed, peaked)


def test_rng_draws_are_seeded() -> None:
    a, b = np.empty((2, 50), np.float32), np.empty((2, 50), np.float32)
    sampling.RngDraws(7).exponential(a)
    sampling.RngDraws(7).exponential(b)
    assert np.array_equal(a, b) and a.min() > 0


# ---------------------------------------------------------------------------------------------------
# Beam fixtures replayed without the model: the recorded logits drive the loop


class ReplaySteps:
    """GptSteps that returns a fixture's recorded per-step logits (valid only if the loop picks upstream's beams)."""

    def __init__(self, step_logits: np.ndarray, vocab: int, prompt_rows: int) -> None:
        self.geometry = GptGeometry(1, 1, 1, vocab, vocab - 2, vocab - 1, 100)
        self.step_logits, self.prompt_rows, self.calls = step_logits, prompt_rows, 0

    def prefill(self, feed: dict) -> dict:
        return {"logits": self.step_logits[0][:1], "kv": np.zeros((1, 2, 1, 1, self.prompt_rows, 1), np.float32)}

    def decode(self, feed: dict) -> dict:
        self.calls += 1
        b = feed["mel_ids"].shape[0]
        return {"logits": self.step_logits[self.calls], "kv_new": np.zeros((1, 2, b, 1, 1, 1), np.float32)}

    def new_cache(self, kv, beams, max_rows, buckets):
        return KVCache.from_prefill(kv, beams, max_rows, buckets)

    def new_batch_cache(self, max_rows, buckets):
        return None

    def close(self) -> None:
        pass


@pytest.mark.parametrize("call", ["beam", "beam_evict", "beam_maxlen", "greedy"])
def test_replay_recorded_logits(fixtures_root: Path, call: str) -> None:
    fx = open_fixture(fixtures_root / "gpt_beam")
    raw = next(c for c in fx.manifest["calls"] if c["call"] == call)
    s = raw["scalars"]
    logits = fx.io[raw["outputs"]["step_logits"]]
    prompt = 34 + 2 + fx.io[raw["inputs"]["text_inputs"]].shape[1] + 1
    steps = ReplaySteps(logits, logits.shape[-1], prompt)
    cfg = GenerationConfig(do_sample=False, num_beams=s["num_beams"], repetition_penalty=s["repetition_penalty"],
                           length_penalty=s.get("length_penalty", 0.0), max_mel_tokens=s["max_generate_length"])
    result = generate(steps, {"spk_latent": np.zeros((1, 32, 4))}, np.zeros((1, 4)), np.arange(2, 12), cfg, record=True)
    got = beam_outputs(result, prompt) if cfg.num_beams > 1 else greedy_outputs(result)
    tol = raw["tolerance"]
    for name, io_name in raw["outputs"].items():
        if name in got:
            ok, err, _, detail = compare(got[name], fx.io[io_name], name in raw["exact_outputs"],
                                         tol["atol"], tol["rtol"])
            assert ok, f"{call}/{name}: max_abs {err} {detail}"
    assert steps.calls == len(logits) - 1                      # no GPT call after the last token


def test_scorer_offer_eviction_and_done_rule() -> None:
    scorer = BeamScorer(num_beams=2, eos_token=9, max_steps=4)
    # step 0: the rank-0 EOS is offered (admitted: the set is not full); the rank-2 EOS is skipped
    scorer.process(np.array([-1.0, -2.0, -3.0, -4.0], np.float32), np.array([9, 1, 9, 2]), np.array([0, 0, 1, 1]))
    assert [h.score for h in scorer.finished.items] == [-1.0] and not scorer.done
    # step 1: EOS at rank 1 admitted; worst -2.5 < best candidate -2.0: not done
    scorer.process(np.array([-2.0, -2.5, -5.0, -6.0], np.float32), np.array([3, 9, 4, 5]), np.array([0, 1, 1, 0]))
    assert scorer.finished.worst == -2.5 and not scorer.done
    # step 2: -2.25 > worst -2.5 evicts it; worst -2.25 >= best candidate -2.25: done (>=)
    scorer.process(np.array([-2.25, -2.3125, -2.375, -7.0], np.float32), np.array([9, 3, 4, 5]), np.array([0, 1, 1, 0]))
    assert sorted(h.score for h in scorer.finished.items) == [-2.25, -1.0] and scorer.finished.worst == -2.25
    assert scorer.done
    hyp = next(h for h in scorer.finished.items if h.score == -2.25)
    assert hyp.tokens.tolist() == [1, 3] and hyp.path.tolist() == [0, 0, 0]
    best = scorer.finalize()                                   # done: the running beams are not offered
    assert best.score == -1.0 and best.eos and best.tokens.tolist() == [] and best.path.tolist() == [0]


def test_finished_set_ties() -> None:
    fs = FinishedSet(capacity=2, length_penalty=0.0)
    for tag in range(3):                                       # equal scores: admitted? only if > worst
        if fs.admits(-1.0):
            fs.add(Hypothesis(-1.0, np.array([tag]), np.array([0]), True))
    assert [h.tokens[0] for h in fs.items] == [0, 1]          # the third is not strictly better
    fs.add(Hypothesis(-0.5, np.array([3]), np.array([0]), True))
    assert [h.tokens[0] for h in fs.items] == [1, 3]          # the earliest of the lowest is evicted
    fs.add(Hypothesis(-0.5, np.array([4]), np.array([0]), True))
    assert fs.best().tokens[0] == 4                            # the latest added among the best


# ---------------------------------------------------------------------------------------------------
# KV cache


def test_bucket_for() -> None:
    assert bucket_for(10, (256, 512), 2000) == 256
    assert bucket_for(300, (256, 512), 2000) == 512
    assert bucket_for(600, (256, 512), 2000) == 2000


def _filled_cache(batch: int, rows: int, buckets: tuple[int, ...] = (16, 32)) -> KVCache:
    cache = KVCache(2, 3, 4, batch, max_rows=40, buckets=buckets, rows=rows)
    cache.load_prefill(np.random.default_rng(0).normal(size=(2, 2, batch, 3, rows, 4)).astype(np.float32))
    return cache


def test_reorder_equals_gather_for_every_index_vector() -> None:
    for idx in itertools.product(range(3), repeat=3):
        cache = _filled_cache(3, 10)
        before = cache.buffer.copy()
        cache.reorder(np.array(idx))
        assert np.array_equal(cache.buffer[..., :10, :], np.take(before, idx, axis=2)[..., :10, :]), idx
        assert np.array_equal(cache.buffer[..., 10:, :], before[..., 10:, :])


def test_prefill_tiles_write_and_growth() -> None:
    cache = KVCache.from_prefill(np.ones((2, 2, 1, 3, 14, 4), np.float32), batch=3, max_rows=40, buckets=(16, 32))
    assert cache.capacity == 16 and cache.length == 14 and np.all(cache.buffer[..., :14, :] == 1)
    views = cache.feeds()
    assert all(views[kv_cache_name(i)].flags.c_contiguous for i in range(2))
    assert np.shares_memory(views[kv_cache_name(1)], cache.buffer)
    for step in range(20):
        cache.append(np.full((2, 2, 3, 3, 1, 4), step + 2, np.float32))
    assert cache.capacity == 40 and cache.version == 3          # 16 -> 32 -> 40 (the request's maximum)
    assert np.all(cache.buffer[..., :14, :] == 1) and np.all(cache.buffer[..., 33, :] == 21)
    assert np.array_equal(cache.mask[0], (np.arange(40) < 34).astype(np.float32))
    with pytest.raises(ValueError):
        for _ in range(10):
            cache.append(np.zeros((2, 2, 3, 3, 1, 4), np.float32))


# ---------------------------------------------------------------------------------------------------
# A tiny attention "GPT": cached decode vs recompute without cache


class FakeSteps:
    """Numpy GptSteps whose logits depend on every attended cache row (one attention per layer/head).

    Row features: 34 conditioning rows, [0] + text + [1] with text positions, start mel at position 0,
    the k-th code at mel position k + 1; an EOS bias growing with the mel position ends decodes.
    """

    def __init__(self, seed: int = 0, vocab: int = 24, feat: int = 8, layers: int = 2, heads: int = 2,
                 head_dim: int = 4) -> None:
        rng = np.random.default_rng(seed)
        self.geometry = GptGeometry(layers, heads, head_dim, vocab, vocab - 2, vocab - 1, max_mel_tokens=60)
        self.text_emb, self.text_pos = rng.normal(size=(40, feat)), 0.5 * rng.normal(size=(64, feat))
        self.mel_emb, self.mel_pos = rng.normal(size=(vocab, feat)), 0.5 * rng.normal(size=(64, feat))
        self.speed = rng.normal(size=(2, feat))
        self.w = rng.normal(size=(3, layers, heads, feat, head_dim)) / math.sqrt(feat)
        self.wo = 1.5 * rng.normal(size=(layers * heads * head_dim, vocab)) / math.sqrt(layers * heads * head_dim)
        self.attended: list[list[np.ndarray]] = []              # per decode call, per beam: attended K rows

    def prompt_rows(self, spk: np.ndarray, emovec: np.ndarray, text: np.ndarray) -> np.ndarray:
        t = np.concatenate([[0], text, [1]])
        return np.concatenate([spk[0] + emovec[0], self.speed[::-1], self.text_emb[t] + self.text_pos[:len(t)],
                               self.mel_row(self.geometry.start_mel_token, 0)[None]])

    def mel_row(self, token: int, pos: int) -> np.ndarray:
        return self.mel_emb[token] + self.mel_pos[pos]

    def kv(self, rows: np.ndarray) -> np.ndarray:
        """(layers, 2, heads, N, head_dim) float32, row by row (the same arithmetic however rows are batched)."""
        per_row = [np.einsum("f,clhfd->lchd", row, self.w[1:]) for row in rows]
        return np.stack(per_row, axis=3).astype(np.float32)

    def attend(self, row: np.ndarray, kv: np.ndarray, valid: np.ndarray, pos: int) -> np.ndarray:
        q = np.einsum("f,lhfd->lhd", row, self.w[0])
        s = np.einsum("lhd,lhnd->lhn", q, kv[:, 0].astype(np.float64)) / math.sqrt(q.shape[-1])
        s = np.where(valid, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("lhn,lhnd->lhd", p / p.sum(-1, keepdims=True), kv[:, 1].astype(np.float64))
        logits = o.reshape(-1) @ self.wo
        logits[-1] += 0.25 * (pos - 10)
        return logits.astype(np.float32)

    def prefill(self, feed: dict) -> dict:
        rows = self.prompt_rows(feed["spk_latent"], feed["emovec"], feed["text_ids"][0])
        kv = self.kv(rows)
        logits = self.attend(rows[-1], kv, np.ones(len(rows), bool), 0)
        return {"logits": logits[None], "kv": kv[:, :, None]}

    def decode(self, feed: dict) -> dict:
        beams, pos = feed["mel_ids"].shape[0], int(feed["mel_pos"][0, 0])
        out_logits, out_kv, attended = [], [], []
        for b in range(beams):
            valid_rows = feed["kv_mask"][b] == 1
            n = int(valid_rows.sum())
            assert valid_rows[:n].all(), "attended rows must be the filled prefix"
            new = self.kv(self.mel_row(int(feed["mel_ids"][b, 0]), pos)[None])
            cache = np.stack([feed[kv_cache_name(i)][:, b, :, :n] for i in range(self.geometry.layers)])
            full = np.concatenate([cache, new], axis=3)
            attended.append(full[:, 0].copy())
            out_logits.append(self.attend(self.mel_row(int(feed["mel_ids"][b, 0]), pos), full,
                                          np.ones(n + 1, bool), pos))
            out_kv.append(new)
        self.attended.append(attended)
        return {"logits": np.stack(out_logits), "kv_new": np.stack(out_kv, axis=2)}

    def new_cache(self, kv, beams, max_rows, buckets):
        return KVCache.from_prefill(kv, beams, max_rows, buckets)

    def new_batch_cache(self, max_rows, buckets):
        return None

    def close(self) -> None:
        pass

    def reference_logits(self, prompt: np.ndarray, history: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Logits after `history` recomputed from scratch, and every K row the last position attends to."""
        rows = np.concatenate([prompt] + [self.mel_row(c, i + 2)[None] for i, c in enumerate(history)])
        kv = self.kv(rows)
        return self.attend(rows[-1], kv, np.ones(len(rows), bool), len(history) + 1 if history else 0), kv[:, 0]


def _reference_generate(fake: FakeSteps, spk, emovec, text, cfg: GenerationConfig, draws) -> tuple[np.ndarray, list]:
    """Upstream's loops written plainly over token histories, every step recomputed without a cache."""
    prompt = fake.prompt_rows(spk, emovec, prefill_text_ids(text)[0])
    vocab, eos, beams = fake.geometry.vocab_size, fake.geometry.stop_mel_token, cfg.num_beams
    histories, beam_scores, step_logits = [[] for _ in range(beams)], None, []
    scorer = BeamScorer(beams, eos, cfg.max_mel_tokens, cfg.length_penalty)
    for k in range(cfg.max_mel_tokens):
        computed = [fake.reference_logits(prompt, h) for h in histories]
        if k > 0:       # the rows the cached decode attended to are the recomputed ones
            for b, (_, keys) in enumerate(computed):
                np.testing.assert_array_equal(fake.attended[k - 1][b], keys)
        logits = np.stack([c[0] for c in computed])
        step_logits.append(logits)
        seen = sampling.seen_mask(np.array([[1, fake.geometry.start_mel_token] + h for h in histories]), vocab)
        if beams == 1:
            scores = sampling.process_scores_(logits.copy(), seen, cfg.processors)
            if cfg.do_sample:
                q = draws.exponential(np.empty_like(scores))
                token = int(sampling.multinomial_without_replacement(sampling.softmax(scores)[0], 1, q[0])[0])
            else:
                token = int(np.argmax(scores[0]))
            histories[0].append(token)
            if token == eos:
                break
            continue
        scores = sampling.process_scores_(sampling.log_softmax(logits), seen, cfg.processors)
        if beam_scores is None:
            beam_scores = np.array([0.0] + [-1e9] * (beams - 1), np.float32)
        scores += beam_scores[:, None]
        idx = sampling.beam_candidates(scores, 2 * beams, draws if cfg.do_sample else None)
        new_scores, tokens, parents = scorer.process(scores.reshape(-1)[idx], idx % vocab, idx // vocab)
        if scorer.done:
            break
        histories = [histories[p] + [t] for p, t in zip(parents.tolist(), tokens.tolist())]
        beam_scores = new_scores.copy()
    if beams == 1:
        return np.array(histories[0]), step_logits
    best = scorer.finalize()
    return (best.tokens if len(best.tokens) == cfg.max_mel_tokens else np.append(best.tokens, eos)), step_logits


@pytest.mark.parametrize("cfg", [
    GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=30),
    GenerationConfig(do_sample=True, num_beams=1, max_mel_tokens=30),
    GenerationConfig(do_sample=False, num_beams=3, max_mel_tokens=30),
    GenerationConfig(max_mel_tokens=30),                                   # infer_v2's beam sampling
    GenerationConfig(max_mel_tokens=30, length_penalty=1.0, num_beams=2),
    GenerationConfig(do_sample=False, num_beams=3, max_mel_tokens=8),      # ends at max_length: finalize
    GenerationConfig(num_beams=1, max_mel_tokens=8),
], ids=["greedy", "sample", "beam", "beam_sample", "beam_sample_lp", "beam_maxlen", "sample_maxlen"])
def test_cached_loop_matches_recompute(cfg: GenerationConfig) -> None:
    rng = np.random.default_rng(3)
    spk, emovec = rng.normal(size=(1, 32, 8)).astype(np.float32), rng.normal(size=(1, 8)).astype(np.float32)
    text = np.array([5, 0, 9, 1, 12, 7, 30])
    fake = FakeSteps()
    got = generate(fake, {"spk_latent": spk}, emovec, text, cfg, sampling.RngDraws(11), record=True, cache_buckets=(40, 48, 56))
    ref_codes, ref_logits = _reference_generate(fake, spk, emovec, text, cfg, sampling.RngDraws(11))
    assert np.array_equal(got.codes, ref_codes)
    np.testing.assert_allclose(got.trace.arrays()["logits"], np.stack(ref_logits), atol=1e-5, rtol=1e-5)
    assert got.stopped == (got.codes[-1] == fake.geometry.stop_mel_token)
    assert got.stopped or len(got.codes) == cfg.max_mel_tokens
    assert 3 <= len(got.codes) and got.prompt_rows == 5 + 37


def test_config_defaults_and_validation() -> None:
    cfg = GenerationConfig()
    assert (cfg.do_sample, cfg.num_beams, cfg.top_k, cfg.top_p, cfg.temperature, cfg.repetition_penalty,
            cfg.length_penalty, cfg.max_mel_tokens) == (True, 3, 30, 0.8, 0.8, 10.0, 0.0, 1500)
    assert cfg.processors.min_tokens_to_keep == 2
    assert GenerationConfig(num_beams=1).processors.min_tokens_to_keep == 1
    for bad in ({"num_beams": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"max_mel_tokens": 0}):
        with pytest.raises(InputError):
            GenerationConfig(**bad)
    assert prefill_text_ids(np.array([[0, 4, 1, 1, 9]])).tolist() == [[4, 9]]


# ---------------------------------------------------------------------------------------------------
# Sampling modes over the eager GPT vs upstream's loop statements with HF's own processors and scorer


class TorchDraws:
    """The Exp(1) variates torch.multinomial(probs, n, generator=g) draws: one `exponential_` per call."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def exponential(self, out: np.ndarray) -> np.ndarray:
        out[...] = torch.empty(out.shape).exponential_(generator=self.generator).numpy()
        return out


def _upstream_sampling_loop(model, spk, emovec, text, cfg: GenerationConfig, seed: int) -> tuple[np.ndarray, float | None]:
    """The vendored `_sample` / `_beam_search` statements (UPSTREAM.md §3.1.6) with transformers' processors and
    BeamSearchScorer, torch.multinomial on a seeded generator, the eager model with a concatenated cache."""
    from transformers.generation import logits_process as lp
    from transformers.generation.beam_search import BeamSearchScorer

    g = model.cfg
    beams, vocab, eos, keep = cfg.num_beams, g.number_mel_codes, g.stop_mel_token, cfg.processors.min_tokens_to_keep
    procs = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty),
                                    lp.TemperatureLogitsWarper(cfg.temperature),
                                    lp.TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=keep),
                                    lp.TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=keep)])
    gen = torch.Generator().manual_seed(seed)
    logits, kv = model.prefill(spk, emovec, torch.from_numpy(prefill_text_ids(text)))
    prompt = kv.shape[4]
    max_length = prompt + cfg.max_mel_tokens
    input_ids = torch.ones(beams, prompt, dtype=torch.int64)
    input_ids[:, -1] = g.start_mel_token
    cache, mask = [c.repeat(1, beams, 1, 1, 1) for c in kv.unbind(0)], torch.ones(beams, prompt)
    logits = logits.repeat(beams, 1)
    scorer = BeamSearchScorer(1, beams, torch.device("cpu"), cfg.length_penalty, False, 1, max_length=max_length) \
        if beams > 1 else None
    beam_scores = torch.tensor([0.0] + [-1e9] * (beams - 1))
    while True:
        if beams == 1:
            probs = torch.softmax(procs(input_ids, logits.float()), dim=-1)
            tokens, parents = torch.multinomial(probs, 1, generator=gen)[:, 0], torch.zeros(1, dtype=torch.int64)
        else:
            scores = procs(input_ids, torch.log_softmax(logits.float(), dim=-1)) + beam_scores[:, None]
            scores = scores.view(1, beams * vocab)
            drawn = torch.multinomial(torch.softmax(scores, dim=-1), 2 * beams, generator=gen)
            picked, order = torch.sort(torch.gather(scores, -1, drawn), descending=True, dim=1)
            drawn = torch.gather(drawn, -1, order)
            out = scorer.process(input_ids, picked, drawn % vocab, torch.div(drawn, vocab, rounding_mode="floor"),
                                 pad_token_id=eos, eos_token_id=eos, decoder_prompt_len=prompt)
            beam_scores, tokens, parents = out["next_beam_scores"], out["next_beam_tokens"], out["next_beam_indices"]
        input_ids = torch.cat([input_ids[parents], tokens[:, None]], dim=-1)
        if input_ids.shape[1] >= max_length or (scorer.is_done if beams > 1 else bool(tokens[0] == eos)):
            break
        cache = [c.index_select(1, parents) for c in cache]
        mel_pos = torch.full((beams, 1), input_ids.shape[1] - prompt + 1)
        logits, kv_new = model.decode(tokens[:, None], mel_pos, cache, mask)
        cache = [torch.cat([c, n], dim=3) for c, n in zip(cache, kv_new.unbind(0))]
        mask = torch.cat([mask, torch.ones(beams, 1)], dim=1)
    if beams == 1:
        return input_ids[0, prompt:].numpy(), None
    done = scorer.finalize(input_ids, beam_scores, tokens, parents, max_length=max_length, pad_token_id=eos,
                           eos_token_id=eos, decoder_prompt_len=prompt)
    return done["sequences"][0, prompt:].numpy(), float(done["sequence_scores"][0])


@pytest.mark.parametrize("cfg", [
    GenerationConfig(max_mel_tokens=40),                                   # infer_v2's defaults (beam sampling)
    GenerationConfig(max_mel_tokens=40, top_k=1),                          # beam 0 keeps 2 tokens: zero-probability draws
    GenerationConfig(max_mel_tokens=40, num_beams=1),
], ids=["beam_sample", "beam_sample_topk1", "sample"])
def test_sampling_matches_upstream_statements(fixtures_root: Path, cfg: GenerationConfig) -> None:
    from export.fixtures.kind_gpt import build_gpt_from_fixture
    from export.gpt_executor import EagerGptSteps

    fx = open_fixture(fixtures_root / "gpt_beam")
    try:
        model = build_gpt_from_fixture(fx)
        io = fx.io
        text = io["beam.in.text_inputs"].astype(np.int64)
        emovec = io["beam.in.emo_vec"]
        with torch.inference_mode():
            spk = model.speaker_conditioner(torch.from_numpy(io["beam.in.speech_condition"]),
                                            torch.from_numpy(io["beam.in.cond_lengths"]))
            for seed in (0, 1):
                want_codes, want_score = _upstream_sampling_loop(model, spk, torch.from_numpy(emovec), text, cfg, seed)
                got = generate(EagerGptSteps(model), {"spk_latent": spk.numpy()}, emovec, text, cfg, TorchDraws(seed))
                assert np.array_equal(got.codes, want_codes), (seed, got.codes, want_codes)
                if want_score is not None:
                    assert got.score == pytest.approx(want_score, abs=1e-4)
    finally:
        fx.close()


@pytest.mark.parametrize("kept", [1, 5, 30, 1000, 8194])
def test_top_p_sorted_rows_equal_the_full_sort(kept: int) -> None:
    """top_p_ builds a mostly-filtered row's sorted copy from its few kept values: the same filtered scores as
    sorting the whole row (ties, -inf logits and a kept -inf included)."""
    rng = np.random.default_rng(kept)
    rows = rng.standard_normal((3, 8194)).astype(np.float32).round(1)          # many ties
    for r in range(3):
        drop = rng.permutation(8194)[kept:]
        rows[r, drop] = sampling.FILTER_VALUE
    got = sampling.top_p_(rows.copy(), 0.8, 1)
    ws = sampling.Workspace.create(*rows.shape)
    np.copyto(ws.a, rows)
    ws.a.sort(axis=-1)
    want = rows.copy()
    cum = np.cumsum(sampling.softmax(ws.a.copy()).astype(np.float64), axis=-1).astype(np.float32)
    for r in range(3):
        j = min(int(np.searchsorted(cum[r], np.float32(1 - 0.8), side="right")), 8194 - 1)
        if j <= 0:
            continue
        order = np.argsort(rows[r], kind="stable")          # torch's CPU sort is stable
        want[r, order[:j]] = sampling.FILTER_VALUE
    np.testing.assert_array_equal(got, want)
