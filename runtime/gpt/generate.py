"""The GPT decode loop: prefill once, then one decode step per token; greedy, sampling, beam search, beam sampling.

upstream: indextts/gpt/model_v2.py:UnifiedVoice.inference_speech -> the vendored
indextts/gpt/transformers_generation_utils.py:GenerationMixin.generate, i.e. `_sample` (num_beams = 1:
processors on the RAW logits, argmax or `multinomial(softmax, 1)`) and `_beam_search` (num_beams > 1:
processors on `log_softmax`, beam scores added, joint (1, B*V) `topk(2B)` or `multinomial(softmax, 2B)`
+ stable sort, transformers' BeamSearchScorer). UPSTREAM.md §3.1.6.

Written once in numpy against the `GptSteps` seam, so the eager model and the compiled engines run the
same loop. Upstream facts the loop reproduces:
- `input_ids` = ones (the fake prompt ids) + start_mel: the repetition penalty's id set per beam is
  {1, start_mel} + that beam's codes, kept as a (B, V) presence mask (the penalty only sees the set);
- the prefill runs at batch 1 (every beam's prompt is identical) and its K/V is tiled to the beams;
- the k-th generated code (k = 1, 2, ...) is fed at mel position k + 1 into cache row P + k - 1;
- the stop token ends `_sample` (and stays in the codes); `_beam_search` ends when the scorer is done
  or at max_length = P + max_mel_tokens; no GPT call is made after the last token is chosen.
Per step nothing of vocabulary or cache size is allocated beyond the executor's outputs (logits, kv_new).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from runtime.contracts import KV_BUCKETS
from runtime.errors import InputError
from runtime.gpt.beam import BeamScorer, Hypothesis
from runtime.gpt.sampling import (
    DrawSource,
    ProcessorSettings,
    RngDraws,
    Workspace,
    beam_candidates,
    log_softmax,
    multinomial_without_replacement,
    process_scores_,
    softmax,
)
from runtime.gpt.steps import GptGeometry, GptSteps, KVCacheLike

log = logging.getLogger(__name__)

FAKE_PROMPT_ID = 1          # upstream's input_ids are ones before the start_mel token
INITIAL_BEAM_SCORE = -1e9   # beams 1.. start here so that step 0 draws from beam 0 only


@dataclass(frozen=True)
class GenerationConfig:
    """Generation settings; the defaults are infer_v2's (UPSTREAM.md §2.1, do_sample hard-coded True)."""

    do_sample: bool = True
    num_beams: int = 3
    top_k: int = 30
    top_p: float = 0.8
    temperature: float = 0.8
    repetition_penalty: float = 10.0
    length_penalty: float = 0.0
    max_mel_tokens: int = 1500

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_mel_tokens < 1:
            raise InputError(f"GenerationConfig: num_beams ({self.num_beams}) and max_mel_tokens "
                             f"({self.max_mel_tokens}) must be >= 1")
        if self.do_sample and not (self.temperature > 0):
            raise InputError(f"GenerationConfig: temperature must be > 0 when sampling, got {self.temperature}")
        if self.do_sample and not (0 < self.top_p <= 1):
            raise InputError(f"GenerationConfig: top_p must be in (0, 1], got {self.top_p}")

    @property
    def processors(self) -> ProcessorSettings:
        """What generate() builds: min_tokens_to_keep is 2 with beams, 1 without."""
        return ProcessorSettings(self.repetition_penalty, self.do_sample, self.temperature, self.top_k,
                                 self.top_p, 2 if self.num_beams > 1 else 1)


@dataclass
class StepTrace:
    """Per-step records (only when asked for): raw logits, processed scores, beam candidates and choices."""

    logits: list[np.ndarray] = field(default_factory=list)          # (B, V) raw
    scores: list[np.ndarray] = field(default_factory=list)          # (B, V) processed, before beam scores
    cand_scores: list[np.ndarray] = field(default_factory=list)     # (2B,) incl. beam scores, rank order
    cand_tokens: list[np.ndarray] = field(default_factory=list)
    cand_beams: list[np.ndarray] = field(default_factory=list)
    next_scores: list[np.ndarray] = field(default_factory=list)     # (B,) new running beams
    next_tokens: list[np.ndarray] = field(default_factory=list)
    next_indices: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.stack(rows) for name, rows in vars(self).items() if rows}


@dataclass
class GenerationResult:
    """Upstream's `codes` row plus what beam search knows about it."""

    codes: np.ndarray                       # (n,) int64; ends with the stop token unless max_mel_tokens was hit
    stopped: bool                           # the stop token was emitted
    prompt_rows: int                        # P, positions the prefill filled
    max_new_tokens: int                     # the cap actually used
    score: float | None = None              # beams: the returned hypothesis's score (sequences_scores)
    beam_path: np.ndarray | None = None     # beams: source beam of every step of the returned hypothesis
    hypotheses: list[Hypothesis] | None = None   # beams: the finished set after finalize, best first
    trace: StepTrace | None = None


#: The `gpt_prefill` inputs that come from the speaker prompt and the request, by contract name: 2.0
#: {spk_latent (1,32,D) f32}; 2.5 {style (1,192) f32, lang_id (1,) i64}. Separate from emovec (mixed per
#: request) and text_ids (per segment), which every version has.
GptCondition = Mapping[str, np.ndarray]


def prefill_text_ids(text_ids: np.ndarray) -> np.ndarray:
    """(1, L') int64: the segment's ids without 0 / 1, which upstream's prefill drops (its left padding
    under attention mask 0 changes nothing the decode sees, so the rows are simply not there)."""
    ids = np.asarray(text_ids).reshape(-1).astype(np.int64)
    return ids[(ids != 0) & (ids != 1)][None, :]


def generate(steps: GptSteps, condition: GptCondition, emovec: np.ndarray, text_ids: np.ndarray,
             config: GenerationConfig = GenerationConfig(), draws: DrawSource | None = None,
             seed: int | None = None, *, record: bool = False,
             cache_buckets: Sequence[int] = KV_BUCKETS) -> GenerationResult:
    """Generate one segment's mel codes: THE decode loop of one request (the scheduler's batched loop,
    runtime/scheduler/gpt_batch.py, drives the same TokenSelector over rows of a shared cache).

    condition: the version's speaker / language inputs (GptCondition), emovec (1, D) f32, text_ids (L,) or
    (1, L) (ids 0 / 1 are dropped here).
    `draws` supplies the sampling randomness (default: `RngDraws(seed)`); greedy and beam search use none.
    """
    geom = steps.geometry
    max_new = max_new_tokens(config, geom)
    if config.do_sample and draws is None:
        draws = RngDraws(seed)
    out = steps.prefill(prefill_feed(condition, emovec, text_ids))
    kv = out["kv"]
    prompt_rows = kv.shape[4]
    beams = config.num_beams
    cache = steps.new_cache(kv, beams, prompt_rows + max_new - 1, cache_buckets)   # host or device: the steps'
    selector = TokenSelector(geom, config, draws, max_new, prompt_rows, StepTrace() if record else None)
    decoder = _Decoder(steps, cache, beams)
    step = selector.first(out["logits"])
    while step is not None:
        if step.parents is not None:
            cache.reorder(step.parents)
        step = selector.next(decoder.decode(step.tokens, step.position))
    return selector.result()


def max_new_tokens(config: GenerationConfig, geom: GptGeometry) -> int:
    """The request's cap on generated tokens: its max_mel_tokens, capped by the model's."""
    max_new = min(config.max_mel_tokens, geom.max_mel_tokens)
    if max_new < config.max_mel_tokens:
        log.info("max_mel_tokens %d capped at the model's %d", config.max_mel_tokens, geom.max_mel_tokens)
    return max_new


def prefill_feed(condition: GptCondition, emovec: np.ndarray, text_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The `gpt_prefill` inputs of one request (batch 1)."""
    feed = {name: np.ascontiguousarray(value) for name, value in condition.items()}
    feed.update(emovec=np.ascontiguousarray(emovec, np.float32), text_ids=prefill_text_ids(text_ids))
    return feed


def stack_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batch-1 feeds of the same names and row shapes as one feed (rows in order)."""
    return {name: np.ascontiguousarray(np.concatenate([f[name] for f in feeds])) for name in feeds[0]}


class _Seen:
    """Per-beam presence mask of the ids in upstream's input_ids (fake prompt id 1, start_mel, codes)."""

    def __init__(self, beams: int, vocab: int, start_token: int) -> None:
        self.mask = np.zeros((beams, vocab), bool)
        self.mask[:, [FAKE_PROMPT_ID, start_token]] = True
        self._spare = np.empty_like(self.mask)
        self._rows = np.arange(beams)

    def reorder(self, beam_indices: np.ndarray) -> None:
        np.take(self.mask, beam_indices, axis=0, out=self._spare, mode="clip")
        self.mask, self._spare = self._spare, self.mask

    def add(self, tokens: np.ndarray) -> None:
        self.mask[self._rows, tokens] = True


@dataclass
class NextStep:
    """What the GPT must run next for one generation: each beam's token at a mel position, after the
    cache's beams were reordered by `parents` (None: no reorder)."""

    tokens: np.ndarray                      # (B,) int64
    position: int                           # mel position of the fed tokens (the k-th code at k + 1)
    parents: np.ndarray | None = None       # (B,) source beam of each beam


class _Decoder:
    """One request's decode feed over its own cache (the single-request path)."""

    def __init__(self, steps: GptSteps, cache: KVCacheLike, beams: int) -> None:
        self.steps, self.cache = steps, cache
        self.mel_ids = np.zeros((beams, 1), np.int64)
        self.mel_pos = np.zeros((beams, 1), np.int64)
        self._feed: dict[str, np.ndarray] = {}
        self._feed_version = -1

    def decode(self, tokens: np.ndarray, mel_position: int) -> np.ndarray:
        """Feed each beam's token at `mel_position`; write its K/V into the cache; return (B, V) logits."""
        if self._feed_version != self.cache.version:
            self._feed = {**self.cache.feeds(), "mel_ids": self.mel_ids, "mel_pos": self.mel_pos}
            self._feed_version = self.cache.version
        self.mel_ids[:, 0] = tokens
        self.mel_pos.fill(mel_position)
        out = self.steps.decode(self._feed)
        self.cache.append(out["kv_new"])
        return np.asarray(out["logits"], np.float32)


class TokenSelector:
    """One generation's token choices, one step at a time, whatever runs the GPT: `first(prefill logits)`,
    then `next(logits of the last NextStep)` until it returns None; then `result()`.

    Owns the per-step bookkeeping (repetition-penalty id sets, processor scratch, beam scorer, draws) and
    nothing of the GPT: the single-request loop above and the scheduler's shared batch feed it logits.
    """

    def __init__(self, geom: GptGeometry, config: GenerationConfig, draws: DrawSource | None, max_new: int,
                 prompt_rows: int, trace: StepTrace | None = None) -> None:
        if config.do_sample and draws is None:
            raise ValueError("TokenSelector: sampling needs a draw source")
        self.geom, self.config, self.draws, self.trace = geom, config, draws, trace
        self.max_new, self.prompt_rows = max_new, prompt_rows
        beams, vocab = config.num_beams, geom.vocab_size
        self.beams = beams
        self.settings = config.processors
        self.seen = _Seen(beams, vocab, geom.start_mel_token)
        self.ws = Workspace.create(beams, vocab)            # (B, V) processor scratch
        self.flat_ws = Workspace.create(1, beams * vocab)   # (1, B*V) joint beam softmax / draws scratch
        self.scores = np.empty((beams, vocab), np.float32)
        self.probs = np.empty((1, beams * vocab), np.float32)
        self.q = np.empty((1, beams * vocab), np.float32)
        self.k = 0                                          # generated tokens so far
        self._result: GenerationResult | None = None
        if beams == 1:
            self.codes = np.empty(max_new, np.int64)
        else:
            self.scorer = BeamScorer(beams, geom.stop_mel_token, max_new, config.length_penalty)
            self.beam_scores = np.full((beams, 1), INITIAL_BEAM_SCORE, np.float32)
            self.beam_scores[0] = 0.0

    @property
    def done(self) -> bool:
        return self._result is not None

    def first(self, prefill_logits: np.ndarray) -> NextStep | None:
        """The prefill's (1, V) logits, every beam's start."""
        logits = np.repeat(np.asarray(prefill_logits, np.float32).reshape(1, -1), self.beams, axis=0)  # (B, V)
        return self.next(logits)

    def next(self, logits: np.ndarray) -> NextStep | None:
        """Choose from (B, V) logits; the next step to run, or None when the generation has ended."""
        if self.done:
            raise RuntimeError("TokenSelector: the generation has already ended")
        return self._sample(logits) if self.beams == 1 else self._beam(logits)

    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("TokenSelector: the generation has not ended")
        return self._result

    def _record(self, logits: np.ndarray) -> None:
        if self.trace is not None:
            self.trace.logits.append(logits.copy())
            self.trace.scores.append(self.scores.copy())

    def _finish(self, result: GenerationResult) -> None:
        if not result.stopped:      # upstream warns the same way (infer_v2: codes[:, -1] != stop_mel_token)
            log.warning("GPT generation reached max_mel_tokens=%d without the stop token", self.max_new)
        self._result = result

    def _sample(self, logits: np.ndarray) -> NextStep | None:
        """`_sample`: processors on the raw logits, then argmax (greedy) or one draw from the softmax."""
        k, eos = self.k, self.geom.stop_mel_token
        np.copyto(self.scores, logits)
        process_scores_(self.scores, self.seen.mask, self.settings, self.ws)
        self._record(logits)
        if self.config.do_sample:
            probs = softmax(self.scores, out=self.probs.reshape(self.scores.shape), ws=self.ws)
            q = self.draws.exponential(self.q.reshape(self.scores.shape))
            token = int(multinomial_without_replacement(probs[0], 1, q[0])[0])
        else:
            token = int(np.argmax(self.scores[0]))
        self.codes[k] = token
        self.seen.mask[0, token] = True
        self.k = k + 1
        if token == eos or k + 1 == self.max_new:
            codes = self.codes[:k + 1].copy()
            self._finish(GenerationResult(codes, bool(codes[-1] == eos), self.prompt_rows, self.max_new,
                                          trace=self.trace))
            return None
        return NextStep(self.codes[k:k + 1].copy(), k + 2)

    def _beam(self, logits: np.ndarray) -> NextStep | None:
        """`_beam_search`: log_softmax, processors, + beam scores, 2B candidates, the scorer; finalize."""
        k, vocab = self.k, self.geom.vocab_size
        log_softmax(logits, out=self.scores, ws=self.ws)
        process_scores_(self.scores, self.seen.mask, self.settings, self.ws)
        self._record(logits)
        np.add(self.scores, self.beam_scores, out=self.scores)
        idx = beam_candidates(self.scores, 2 * self.beams, self.draws if self.config.do_sample else None,
                              self.flat_ws, self.probs, self.q)
        cand = (self.scores.reshape(-1)[idx], idx % vocab, idx // vocab)
        scores, tokens, parents = self.scorer.process(*cand)
        self._record_beam(cand, (scores, tokens, parents))
        self.beam_scores[:, 0] = scores
        self.k = k + 1
        if self.scorer.done or k + 1 == self.max_new:
            best = self.scorer.finalize()
            eos = self.geom.stop_mel_token
            codes = best.tokens if len(best.tokens) == self.max_new else np.append(best.tokens, eos)
            self._finish(GenerationResult(codes.astype(np.int64), best.eos, self.prompt_rows, self.max_new,
                                          score=best.score, beam_path=best.path,
                                          hypotheses=self.scorer.finished.ranked(), trace=self.trace))
            return None
        self.seen.reorder(parents)
        self.seen.add(tokens)
        return NextStep(np.array(tokens, np.int64), k + 2, np.array(parents, np.int64))

    def _record_beam(self, cand: tuple, chosen: tuple) -> None:
        if self.trace is None:
            return
        t = self.trace
        for rows, value in zip((t.cand_scores, t.cand_tokens, t.cand_beams, t.next_scores, t.next_tokens,
                                t.next_indices), (*cand, *chosen)):
            rows.append(np.array(value, copy=True))
