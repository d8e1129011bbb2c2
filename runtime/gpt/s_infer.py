"""S_infer, the s2mel's semantic input made from a finished generation — the one step after the decode loop
that differs between versions.

- 2.0 (UPSTREAM §3.1.7): the GPT's teacher-forced latent pass, `gpt_latent(condition, emovec, text_ids,
  codes) -> (B, N, D)`; the s2mel's `gpt_layer` maps it later. Rows share a call only with equal text AND
  code lengths (the graph has no padding mask).
- 2.5 (UPSTREAM-2.5 §1, I5:832): the codec decoder over the codes alone, `semantic_decoder(codes) ->
  (B, 2N, 1024)`. Rows share a call with equal code lengths.

Both are objects with `group_key` (which generations may share one call) and `run` (one call over such a
group, row b = generation b alone), so the scheduler's GPT worker groups and retries without knowing which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence

import numpy as np

from runtime.executors.base import Executor
from runtime.gpt.generate import GptCondition, stack_feeds


@dataclass(frozen=True)
class Finished:
    """One finished generation as S_infer needs it."""

    condition: GptCondition     # the prefill's speaker / language inputs (batch 1)
    emovec: np.ndarray          # (1, D)
    text_ids: np.ndarray        # (L,) the segment's ids as tokenized (the latent pass does not filter 0 / 1)
    codes: np.ndarray           # (N,) cut at the stop token, N >= 1


class SInferPass(Protocol):
    graph: str                  # the graph it runs (messages, benchmarks)
    stage: str                  # its name in a segment's timings ("latent" / "codec_decoder")

    def group_key(self, item: Finished) -> Hashable: ...

    def run(self, group: Sequence[Finished]) -> np.ndarray: ...


class LatentPass:
    """2.0: the `gpt_latent` graph -> (B, N, D)."""

    graph = "gpt_latent"
    stage = "latent"

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def group_key(self, item: Finished) -> Hashable:
        return item.text_ids.size, item.codes.size

    def run(self, group: Sequence[Finished]) -> np.ndarray:
        feed = stack_feeds([dict(g.condition) for g in group])
        feed.update(emovec=np.ascontiguousarray(np.concatenate([g.emovec for g in group]), np.float32),
                    text_ids=np.ascontiguousarray(np.stack([g.text_ids for g in group]), np.int64),
                    codes=np.ascontiguousarray(np.stack([g.codes for g in group]), np.int64))
        return np.asarray(self.executor.run(feed)["s_infer"])


class CodecDecoderPass:
    """2.5: the `semantic_decoder` graph over the codes -> (B, 2N, hidden)."""

    graph = "semantic_decoder"
    stage = "codec_decoder"

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def group_key(self, item: Finished) -> Hashable:
        return item.codes.size

    def run(self, group: Sequence[Finished]) -> np.ndarray:
        codes = np.ascontiguousarray(np.stack([g.codes for g in group]), np.int64)
        return np.asarray(self.executor.run({"codes": codes})["s_infer"])
