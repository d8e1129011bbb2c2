"""Beam-search bookkeeping: the running beams' back-pointers, the finished set, the done test, finalize.

upstream: transformers 4.52.1 `generation/beam_search.py` (`BeamSearchScorer.process` / `finalize`,
`BeamHypotheses.add` / `is_done`, early_stopping=False, one batch row), driven by
`indextts/gpt/transformers_generation_utils.py:GenerationMixin._beam_search`. The rules, as the
`gpt_beam` fixture README states them:

- step k (t = k + 1 generated tokens, the candidate's included): walk the 2B candidates in rank order;
  an EOS candidate of rank >= B is skipped, one of rank < B is OFFERED to the finished set (the source
  beam's tokens without the EOS, score = candidate score / t ** length_penalty); any other candidate
  fills the next running slot; stop once B slots are filled.
- finished set (capacity B, worst starts at 1e9): an offer is admitted iff the set holds fewer than B or
  its score > worst (strict); at B + 1 the lowest (earliest on ties) is evicted and worst = the new
  lowest, otherwise worst = min(worst, score).
- done (sticky) iff the set is full and worst >= max(candidate scores) / t ** length_penalty.
- finalize: only if not done, offer every running beam in slot order (score / n ** length_penalty);
  return the highest (the latest added on ties).

Running beams are stored as back-pointers (token and parent slot per step, preallocated), so a step
costs no copying of token histories; a hypothesis's tokens and path are rebuilt only when admitted.
Scores are float32 as in torch; the scorer compares exact Python floats (`.item()`), as upstream does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Hypothesis:
    """A finished or finalized sequence: generated tokens (EOS never included) and its per-step source beams."""

    score: float            # sum of processed scores / generated_len ** length_penalty (Python float)
    tokens: np.ndarray      # (n,) int64
    path: np.ndarray        # (n + 1,) for an EOS hypothesis (the emitting beam last), (n,) for a running beam
    eos: bool               # ended with the stop token (which `tokens` leaves out)


@dataclass
class FinishedSet:
    """transformers' `BeamHypotheses` for one request (capacity = num_beams)."""

    capacity: int
    length_penalty: float
    worst: float = 1e9
    items: list[Hypothesis] = field(default_factory=list)

    def score(self, sum_logprobs: float, generated_len: int) -> float:
        return sum_logprobs / (generated_len ** self.length_penalty)

    def admits(self, score: float) -> bool:
        return len(self.items) < self.capacity or score > self.worst

    def add(self, hyp: Hypothesis) -> None:
        """Insert an admitted hypothesis; evict the lowest (earliest on ties) beyond capacity."""
        self.items.append(hyp)
        if len(self.items) > self.capacity:
            ranked = sorted((h.score, i) for i, h in enumerate(self.items))
            del self.items[ranked[0][1]]
            self.worst = ranked[1][0]
        else:
            self.worst = min(hyp.score, self.worst)

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        if len(self.items) < self.capacity:
            return False
        return self.worst >= best_sum_logprobs / (generated_len ** self.length_penalty)

    def best(self) -> Hypothesis:
        """Highest score; among equal scores the one added last (upstream pops the end of a stable sort)."""
        return sorted(self.items, key=lambda h: h.score)[-1]

    def ranked(self) -> list[Hypothesis]:
        """Highest score first, stable on ties."""
        return sorted(self.items, key=lambda h: -h.score)


class BeamScorer:
    """Per-step candidate walk and final selection for one request with `num_beams` running beams."""

    def __init__(self, num_beams: int, eos_token: int, max_steps: int, length_penalty: float = 0.0) -> None:
        self.num_beams = num_beams
        self.eos_token = eos_token
        self.finished = FinishedSet(num_beams, length_penalty)
        self.done = False
        self.steps = 0
        self.next_scores = np.zeros((max_steps, num_beams), np.float32)   # per step: running beam scores
        self.next_tokens = np.zeros((max_steps, num_beams), np.int64)     # ... their last token
        self.next_indices = np.zeros((max_steps, num_beams), np.int64)    # ... their parent slot

    def process(self, cand_scores: np.ndarray, cand_tokens: np.ndarray,
                cand_beams: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Consume one step's 2B candidates (rank order); return the new running beams' (scores, tokens, parents)."""
        k = self.steps
        generated = k + 1
        slot = 0
        for rank, (score, token, beam) in enumerate(zip(cand_scores.tolist(), cand_tokens.tolist(),
                                                        cand_beams.tolist())):
            if token == self.eos_token:
                if rank < self.num_beams:
                    self._offer_eos(k, beam, score)
                continue
            self.next_scores[k, slot] = cand_scores[rank]
            self.next_tokens[k, slot] = token
            self.next_indices[k, slot] = beam
            slot += 1
            if slot == self.num_beams:
                break
        if slot < self.num_beams:
            raise RuntimeError(f"beam step {k}: only {slot} of {self.num_beams} candidates are not the stop token")
        best = float(np.max(cand_scores))
        self.done = self.done or self.finished.is_done(best, generated)
        self.steps = generated
        return self.next_scores[k], self.next_tokens[k], self.next_indices[k]

    def _offer_eos(self, k: int, beam: int, sum_logprobs: float) -> None:
        score = self.finished.score(sum_logprobs, k + 1)
        if self.finished.admits(score):
            tokens, path = self.backtrack(k - 1, beam)
            self.finished.add(Hypothesis(score, tokens, np.append(path, beam), eos=True))

    def backtrack(self, k: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and source-beam path of running beam `slot` after step k (k = -1: empty)."""
        tokens = np.empty(k + 1, np.int64)
        path = np.empty(k + 1, np.int64)
        for s in range(k, -1, -1):
            tokens[s] = self.next_tokens[s, slot]
            path[s] = self.next_indices[s, slot]
            slot = int(path[s])
        return tokens, path

    def finalize(self) -> Hypothesis:
        """Offer the running beams if the scorer is not done, then return the best hypothesis."""
        if not self.done:
            last = self.steps - 1
            for slot in range(self.num_beams):
                score = self.finished.score(float(self.next_scores[last, slot]), self.steps)
                if self.finished.admits(score):
                    tokens, path = self.backtrack(last, slot)
                    self.finished.add(Hypothesis(score, tokens, path, eos=False))
        return self.finished.best()
