"""Continuous batching of the GPT decode: every active generation's beams are rows of ONE `gpt_decode` call.

A generation joins after its prefill (its prefix K/V copied into free rows of the shared cache,
runtime/gpt/batch_cache.py; generations joining together with prompts of one length share the prefill
call), is stepped with everyone else, and leaves when its TokenSelector ends (the
same selector the one-request loop runs, runtime/gpt/generate.py, so sampling, beams, repetition penalty
and the request's own random stream are exactly as alone). Beam reorders stay within a generation's rows.

Pure bookkeeping over a GptSteps: no threads here (runtime/scheduler/workers.py drives it).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from runtime.errors import BackendError
from runtime.gpt.batch_cache import BatchKVCache
from runtime.gpt.generate import (GenerationConfig, GenerationResult, GptCondition, NextStep, TokenSelector,
                                  max_new_tokens, prefill_feed, stack_feeds)
from runtime.gpt.sampling import DrawSource
from runtime.gpt.steps import GptSteps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Joining:
    """A generation about to join: its prompt, its settings, its random stream (`key` names it in the batch)."""

    key: Hashable
    condition: GptCondition      # the version's speaker / language prefill inputs (batch 1)
    emovec: np.ndarray           # (1, D)
    text_ids: np.ndarray         # (L,) the segment's ids
    config: GenerationConfig
    draws: DrawSource | None


@dataclass
class _Active:
    selector: TokenSelector
    pending: NextStep            # what its rows run in the next step


class GptBatch:
    """The generations being decoded together, over one BatchKVCache."""

    def __init__(self, steps: GptSteps, cache: BatchKVCache | Any) -> None:
        """`cache`: the steps' `new_batch_cache` (BatchKVCache on the host, the TensorRT device cache of
        runtime/trt/kv_batch_device.py: the same interface)."""
        self.steps, self.cache = steps, cache
        self.active: dict[Hashable, _Active] = {}
        self._feed: dict[str, np.ndarray] = {}
        self._feed_version = -1
        self.decode_calls = 0
        self.prefill_calls = 0
        self.peak_rows = 0                 # the most member rows one call has stepped
        # the last steps: (member rows, decode rows incl. idle, graph call s, whole step s) (benchmarks)
        self.timeline: deque[tuple[int, int, float, float]] = deque(maxlen=100_000)

    @property
    def rows_in_use(self) -> int:
        return self.cache.used_rows

    def fits(self, beams: int) -> bool:
        return beams <= self.cache.free_rows()

    def join(self, key: Hashable, condition: GptCondition, emovec: np.ndarray, text_ids: np.ndarray,
             config: GenerationConfig, draws: DrawSource | None) -> GenerationResult | None:
        """Prefill `key`'s prompt alone and take its rows. Returns the result at once when the first token
        already ends the generation (it then takes no rows), else None."""
        return self.join_together([Joining(key, condition, emovec, text_ids, config, draws)])[key]

    def join_together(self, joining: Sequence[Joining]) -> dict[Hashable, GenerationResult | None]:
        """Prefill prompts of the same length in ONE call, then each takes its rows as `join` does.
        -> per key, its result when its first token already ended it, else None."""
        return self.take_rows(joining, self.prefill(joining))

    def prefill(self, joining: Sequence[Joining]) -> dict[str, Any]:
        """The prefill call of prompts of one length (row b of the call is prompt b; a row's logits and K/V do
        not depend on the other rows, so each is its prefill alone). Prompts of different lengths cannot share
        a call: the prefill graph has no padding mask. Nothing is drawn from any random stream here."""
        rows = [prefill_feed(j.condition, j.emovec, j.text_ids) for j in joining]     # each as alone
        lengths = sorted({r["text_ids"].shape[1] for r in rows})
        if len(lengths) != 1:
            raise ValueError(f"a shared prefill needs prompts of one length, got {lengths}")
        feed = rows[0] if len(rows) == 1 else stack_feeds(rows)
        out = self.steps.prefill(feed)
        self.prefill_calls += 1
        return out

    def take_rows(self, joining: Sequence[Joining], prefill: dict[str, Any]) -> dict[Hashable, GenerationResult | None]:
        """Each generation's first token from its row of `prefill`'s logits, then its rows of the shared cache
        (from its row of the K/V: host or device array, valid until the next prefill)."""
        geom = self.steps.geometry
        kv, prompt_rows = prefill["kv"], int(prefill["kv"].shape[4])
        logits = np.asarray(prefill["logits"], np.float32)
        results: dict[Hashable, GenerationResult | None] = {}
        for b, j in enumerate(joining):
            max_new = max_new_tokens(j.config, geom)
            selector = TokenSelector(geom, j.config, j.draws, max_new, prompt_rows)
            step = selector.first(logits[b:b + 1])
            if step is None:
                results[j.key] = selector.result()
                continue
            self.cache.join(j.key, kv, j.config.num_beams, prompt_rows + max_new - 1, source=b)
            self._set(j.key, step)
            self.active[j.key] = _Active(selector, step)
            results[j.key] = None
        return results

    def leave(self, key: Hashable) -> None:
        """Drop `key` (finished, cancelled or failed): its rows are idle from the next step."""
        if self.active.pop(key, None) is not None:
            self.cache.leave(key)

    def step(self) -> tuple[dict[Hashable, GenerationResult], dict[Hashable, Exception]]:
        """One decode call for every active generation -> (the generations that ended, with their results;
        those whose rows came back non-finite, with the error). Both have left the batch."""
        if not self.active:
            return {}, {}
        t0 = time.perf_counter()
        self.cache.ensure_room()
        if self._feed_version != self.cache.version:
            self._feed = self.cache.feeds()
            self._feed_version = self.cache.version
        t1 = time.perf_counter()
        out = self.steps.decode(self._feed)
        t2 = time.perf_counter()
        used, rows = self.cache.used_rows, self.cache.rows
        self.decode_calls += 1
        self.peak_rows = max(self.peak_rows, self.cache.used_rows)
        self.cache.append(out["kv_new"])                    # host or device array
        logits = np.asarray(out["logits"], np.float32)
        ended: dict[Hashable, GenerationResult] = {}
        failed: dict[Hashable, Exception] = {}
        # the rows the logits came from: a member leaving below may compact the cache and move the others
        rows_of = {key: list(self.cache.member_rows(key)) for key in self.active}
        for key, member in list(self.active.items()):
            mine = logits[rows_of[key]]
            # NaN or +inf: this generation's rows broke and it fails alone (-inf is a legal "never this token")
            if np.isnan(mine).any() or np.isposinf(mine).any():
                failed[key] = BackendError(f"gpt_decode returned non-finite logits (NaN or +inf) for this "
                                           f"request's rows (step {member.selector.k + 1})")
                self.leave(key)
                continue
            step = member.selector.next(mine)
            if step is None:
                ended[key] = member.selector.result()
                self.leave(key)
            else:
                member.pending = step
                self._set(key, step)
        self.timeline.append((used, rows, t2 - t1, time.perf_counter() - t0))
        return ended, failed

    def _set(self, key: Hashable, step: NextStep) -> None:
        """Apply the step's beam reorder to the member's rows and set their tokens and position."""
        if step.parents is not None:
            self.cache.reorder(key, step.parents)
        self.cache.set_tokens(key, step.tokens, step.position)
