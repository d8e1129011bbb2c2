"""The scheduler: the stage workers that run every request's graph work in shared calls, their row bounds,
and the admission bound. A Synthesizer owns one (runtime/synthesizer.py); one request alone goes through
the same workers, as a batch of one.

Bounds (SchedulerConfig, each derived and logged at start):
- decode rows: at most `max_gpt_rows`, at most what the KV memory budget holds at the largest position
  bucket (2048: full size, 503 MB a row in float32, so 8 GiB hold 16 rows; the arrays are the bucket of the
  longest row, typically 256-512 positions, and only a row past 2048 positions, near the longest text and
  code limits, makes them up to 20 % larger), and at most the `gpt_decode` profile's batch maximum on backends
  with fixed profiles (TensorRT);
- prefill and latent rows: `max_prefill_rows` generations of equal lengths per call, capped by the
  `gpt_prefill` and `gpt_latent` profiles' batch maximum;
- Euler rows: `max_euler_rows`, capped by the `dit_step` profile's batch maximum (the CFG batch is
  stacked inside, so the engine sees twice as many);
- vocoder rows: `max_vocoder_rows`, capped by the `bigvgan` profile's batch maximum;
- requests: `max_active_requests` in flight, `max_queued_requests` waiting (runtime/scheduler/admission.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from runtime.cfm import regulate
from runtime.contracts import KV_BUCKETS
from runtime.errors import InputError
from runtime.executors.base import Executor
from runtime.gpt.s_infer import CodecDecoderPass, LatentPass
from runtime.gpt.steps import GptSteps
from runtime.manifest import Manifest
from runtime.scheduler.admission import Admission
from runtime.scheduler.euler_batch import EulerBatch
from runtime.scheduler.gpt_batch import GptBatch
from runtime.scheduler.workers import GptWorker, MelWorker, VocoderWorker
from runtime.wav import to_pcm16

log = logging.getLogger(__name__)

FLOAT32 = 4


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work is shared and how much is taken (the defaults suit one GPU or a many-core CPU)."""

    max_gpt_rows: int = 16              # decode rows (beams of all active generations)
    kv_budget_bytes: int = 8 << 30      # host or device memory for the shared decode KV cache
    max_prefill_rows: int = 4           # prompts per gpt_prefill call, generations per gpt_latent call (equal
                                        # lengths only: neither graph has a padding mask)
    max_euler_rows: int = 4             # solves per dit_step call
    max_vocoder_rows: int = 4           # windows per bigvgan call
    max_active_requests: int = 8        # requests in flight
    max_queued_requests: int = 32       # requests waiting for a slot; more -> QueueFull
    queue_timeout_s: float | None = 300.0   # a waiting request gives up after this (QueueFull)

    def __post_init__(self) -> None:
        for name in ("max_gpt_rows", "kv_budget_bytes", "max_prefill_rows", "max_euler_rows", "max_vocoder_rows", "max_active_requests"):
            if getattr(self, name) < 1:
                raise InputError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < 0:
            raise InputError(f"SchedulerConfig.max_queued_requests must be >= 0, got {self.max_queued_requests}")


def _profile_batch_max(manifest: Manifest, graph: str, fixed_profiles: bool) -> int | None:
    """The batch axis maximum of `graph`'s engine profile where the backend has fixed profiles (the decode
    graph: the rows every KV bucket's profile allows, runtime/trt/engine_plan.py:decode_rows_bound)."""
    if not fixed_profiles:
        return None
    if graph == "gpt_decode":
        from runtime.trt.engine_plan import decode_rows_bound      # pure arithmetic: imports without TensorRT

        return decode_rows_bound(manifest.graph(graph))
    return manifest.graph(graph).ranges["batch"].max


def decode_rows(config: SchedulerConfig, manifest: Manifest, fixed_profiles: bool) -> int:
    """The decode batch's row bound (see the module note)."""
    d = manifest.dims
    per_row = d.layers * 2 * d.heads * max(KV_BUCKETS) * d.head_dim * FLOAT32
    rows = min(config.max_gpt_rows, max(1, config.kv_budget_bytes // per_row))
    cap = _profile_batch_max(manifest, "gpt_decode", fixed_profiles)
    return min(rows, cap) if cap is not None else rows


class Scheduler:
    """The stage workers over one backend's executors (threads start on first use)."""

    def __init__(self, manifest: Manifest, graphs: dict[str, Executor] | object, gpt_steps: GptSteps,
                 config: SchedulerConfig = SchedulerConfig(), *, fixed_profiles: bool = False) -> None:
        self.config = config
        rows = decode_rows(config, manifest, fixed_profiles)
        cache = gpt_steps.new_batch_cache(rows, KV_BUCKETS)
        if cache is None:
            log.info("scheduler: %s decodes one generation at a time (no shared decode cache on this backend)",
                     type(gpt_steps).__name__)
        self.gpt_rows = cache.max_rows if cache is not None else None     # the steps may clamp further
        euler_rows = _capped(config.max_euler_rows, _profile_batch_max(manifest, "dit_step", fixed_profiles))
        vocoder_rows = _capped(config.max_vocoder_rows, _profile_batch_max(manifest, "bigvgan", fixed_profiles))
        if not manifest.dit_rows_alone:
            log.warning("this export's dit_step predates rows computed as alone: only segments of equal length "
                        "share Euler steps; re-export (python -m export.build) to batch them all")
        s_infer = LatentPass(graphs["gpt_latent"]) if manifest.version == "2.0" else \
            CodecDecoderPass(graphs["semantic_decoder"])
        group_rows = _capped(_capped(config.max_prefill_rows, _profile_batch_max(manifest, "gpt_prefill", fixed_profiles)),
                             _profile_batch_max(manifest, s_infer.graph, fixed_profiles))
        self.gpt = GptWorker(gpt_steps, s_infer, GptBatch(gpt_steps, cache) if cache is not None else None, group_rows)
        self.mel = MelWorker(graphs["length_regulator"],
                             EulerBatch(graphs["dit_step"], euler_rows, pad_rows=manifest.dit_rows_alone), regulate)
        self.vocoder = VocoderWorker(graphs["bigvgan"], vocoder_rows, lambda wav: to_pcm16(wav))
        self.admission = Admission(config.max_active_requests, config.max_queued_requests, config.queue_timeout_s)
        log.info("scheduler: %s, %d prefill/latent rows, %d Euler rows, %d vocoder rows, %d requests in flight + "
                 "%d waiting", f"{self.gpt_rows} decode rows" if cache is not None else "one generation at a time",
                 group_rows, euler_rows,
                 vocoder_rows, config.max_active_requests, config.max_queued_requests)

    def close(self) -> None:
        for worker in (self.gpt, self.mel, self.vocoder):
            worker.close()


def _capped(value: int, cap: int | None) -> int:
    return min(value, cap) if cap is not None else value
