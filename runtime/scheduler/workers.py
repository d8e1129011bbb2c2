"""The stage workers: one thread per stage owns that stage's executors and serves every request's work in
batched steps (THE scheduler loop of each stage is `cycle` below).

- GptWorker: prefill a joining generation alone, then one `gpt_decode` call per step for all active
  generations (runtime/scheduler/gpt_batch.py), the GPT latent pass of each that ends (alone).
- MelWorker: the length regulator of a joining solve alone, then one `dit_step` call per step for a group
  of active solves (runtime/scheduler/euler_batch.py).
- VocoderWorker: vocoder windows of the same length from several requests in one `bigvgan` call.

A request's thread submits a job and waits for its future (runtime/synthesizer.py's stage methods), so the
per-request order (segments, windows, random streams) stays the streaming pipeline's and only the graph
calls are shared. Failures: an error that belongs to one job (its prefill, its rows' logits, its length
regulator) fails that job alone and frees its rows; a batched call that raises fails the jobs in that call
(nothing tells whose rows broke it); a cancelled request's jobs are dropped at the next step. The worker
itself keeps serving. Admission order is FIFO: a waiting job is admitted before any that came after it, and
every admitted job advances at every step of its stage, so none is starved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

import numpy as np

from runtime.errors import BackendError, Cancelled, InputError
from runtime.executors.base import Executor
from runtime.gpt.codes import SegmentCodes, finish_codes, segment_codes
from runtime.gpt.generate import GenerationConfig, GptCondition, prefill_text_ids
from runtime.gpt.s_infer import Finished, SInferPass
from runtime.gpt.sampling import DrawSource
from runtime.gpt.steps import GptSteps
from runtime.scheduler.euler_batch import EulerBatch, start_row
from runtime.scheduler.gpt_batch import GptBatch, Joining
from runtime.streaming.vocoder import Window

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One unit of a stage's work for one request; `future` gets its result or its error."""

    cancel: threading.Event | None = field(default=None, kw_only=True)
    future: Future = field(default_factory=Future, kw_only=True)
    submitted: float = field(default_factory=time.perf_counter, kw_only=True)
    started: float | None = field(default=None, kw_only=True)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)

    def succeed(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def wait(self) -> Any:
        return self.future.result()


class StageWorker:
    """A thread serving jobs: `submit` from any thread; `cycle(new jobs)` runs on the worker's thread until
    it has nothing left to do (`busy()` false and an empty inbox), then the thread sleeps."""

    name = "stage"

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._inbox: list[Job] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.cycles = 0

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._closed:
                raise BackendError(f"{self.name}: the synthesizer is closed")
            self._inbox.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"scheduler-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify()
        return job.future

    def run(self, job: Job) -> Any:
        """Submit and wait (the request's thread)."""
        return self.submit(job).result()

    def close(self) -> None:
        """Stop the thread after its current step; jobs still held fail with Cancelled."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._fail_everything(Cancelled(f"{self.name}: the synthesizer was closed"))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.busy() and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                new, self._inbox = self._inbox, []
            try:
                self.cycle(new)
                self.cycles += 1
            except BaseException as err:  # noqa: BLE001 — a defect here must not stop the stage for everyone
                log.exception("%s worker: a step failed; failing the jobs it held", self.name)
                self._fail_everything(err if isinstance(err, Exception) else BackendError(str(err)))

    def _fail_everything(self, err: BaseException) -> None:
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for job in [*inbox, *self.held()]:
            job.fail(err)
        self.drop_all()

    # -- per stage --------------------------------------------------------------------------------
    def busy(self) -> bool:
        raise NotImplementedError

    def cycle(self, new: list[Job]) -> None:
        raise NotImplementedError

    def held(self) -> Iterable[Job]:
        raise NotImplementedError

    def drop_all(self) -> None:
        raise NotImplementedError


def _drop_cancelled(jobs: deque) -> None:
    for job in [j for j in jobs if j.cancelled()]:
        jobs.remove(job)
        job.fail(Cancelled("the request was cancelled"))


# -- GPT ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class GptJob(Job):
    condition: GptCondition         # the version's speaker / language prefill inputs (batch 1)
    emovec: np.ndarray              # (1, D)
    text_ids: np.ndarray            # (L,) int64
    generation: GenerationConfig
    draws: DrawSource | None
    index: int                      # segment index (messages)
    steps: GptSteps | None = None   # run with these steps instead of the worker's (alone: see GptWorker)


@dataclass
class GptOutput:
    codes: SegmentCodes
    s_infer: np.ndarray | None      # (1, N, sem_dim); None without codes
    timings: dict[str, float]


class GptWorker(StageWorker):
    """Continuous batching of the GPT decode. Generations that join in the same cycle with prompts of one
    length share the prefill call, and those that end in the same step with the same text and code lengths
    share the latent pass (`group_rows` at most per call; neither graph has a padding mask, so unequal lengths
    run alone). A generation runs alone (start to end in one cycle) when the steps have no batch cache
    (calibration's forced steps, test fakes) or when its job brings other steps than the worker's (a caller
    that swapped `Synthesizer.gpt_steps` for one request, as calibration's teacher forcing does)."""

    name = "gpt"

    def __init__(self, steps: GptSteps, s_infer: SInferPass, batch: GptBatch | None, group_rows: int = 1) -> None:
        super().__init__()
        self.steps, self.s_infer, self.batch = steps, s_infer, batch
        self.group_rows = max(1, int(group_rows))
        self.pending: deque[GptJob] = deque()
        self.active: list[GptJob] = []
        self.max_rows = batch.cache.max_rows if batch is not None else None
        self.latent_calls = 0               # calls of the S_infer pass (gpt_latent or semantic_decoder)

    def submit(self, job: Job) -> Future:
        beams = job.generation.num_beams
        if self.max_rows is not None and beams > self.max_rows:
            raise InputError(f"num_beams {beams} exceeds the decode batch's {self.max_rows} rows")
        return super().submit(job)

    def busy(self) -> bool:
        return bool(self.pending or self.active)

    def held(self) -> Iterable[Job]:
        return [*self.pending, *self.active]

    def drop_all(self) -> None:
        for job in self.active:
            if self.batch is not None:
                self.batch.leave(job)
        self.pending.clear()
        self.active.clear()

    def cycle(self, new: list[Job]) -> None:
        self.pending.extend(new)
        _drop_cancelled(self.pending)
        for job in [j for j in self.active if j.cancelled()]:
            self._leave(job)
            job.fail(Cancelled("the request was cancelled"))
        while self.pending and self._runs_alone(self.pending[0]):
            self._alone(self.pending.popleft())
            if self.active:
                break                       # the batch steps between generations run alone
        joining: list[GptJob] = []
        rows = 0
        while self.pending and not self._runs_alone(self.pending[0]) and \
                self.batch.fits(rows + self.pending[0].generation.num_beams):
            job = self.pending.popleft()
            rows += job.generation.num_beams
            joining.append(job)
        for group in _groups(joining, lambda j: prefill_text_ids(j.text_ids).shape[1], self.group_rows):
            self._join(group)
        if self.active:
            self._step()

    def _runs_alone(self, job: GptJob) -> bool:
        return self.batch is None or (job.steps is not None and job.steps is not self.steps)

    def _alone(self, job: GptJob) -> None:
        """The generation start to end in this cycle, over its own cache."""
        job.started = time.perf_counter()
        try:
            codes = segment_codes(job.steps or self.steps, job.condition, job.emovec, list(job.text_ids), job.generation,
                                  job.draws, job.index)
        except Exception as err:  # noqa: BLE001 — the job's own failure
            job.fail(err)
            return
        self._finish([(job, codes)], time.perf_counter())

    def _join(self, group: list[GptJob]) -> None:
        """One prefill call for the group; when it fails, each again alone (the failure is one job's: nothing
        was drawn from any job's random stream yet)."""
        now = time.perf_counter()
        for job in group:
            job.started = now
        joining = [Joining(job, job.condition, job.emovec, job.text_ids, job.generation, job.draws) for job in group]
        try:
            prefill = self.batch.prefill(joining)
        except Exception as err:  # noqa: BLE001 — its prefill failed: this job alone, or retry each alone
            if len(group) == 1:
                group[0].fail(err)
            else:
                for job in group:
                    self._join([job])
            return
        try:
            results = self.batch.take_rows(joining, prefill)
        except Exception as err:  # noqa: BLE001 — a defect: the group's jobs fail, their rows are freed
            for job in group:
                self.batch.leave(job)
                job.fail(err)
            return
        done = []
        for job in group:
            if results[job] is None:
                self.active.append(job)
            else:
                done.append((job, self._codes(job, results[job])))
        self._finish(done, time.perf_counter())

    def _step(self) -> None:
        try:
            ended, failed = self.batch.step()
        except Exception as err:  # noqa: BLE001 — the shared call failed: every job in it fails
            for job in list(self.active):
                self._leave(job)
                job.fail(err)
            return
        now = time.perf_counter()
        for job, err in failed.items():
            self.active.remove(job)
            job.fail(err)
        for job in ended:
            self.active.remove(job)
        self._finish([(job, self._codes(job, result)) for job, result in ended.items()], now)

    def _codes(self, job: GptJob, result: Any) -> SegmentCodes:
        return finish_codes(result, job.text_ids, self.steps.geometry.stop_mel_token, job.index, job.generation)

    def _leave(self, job: GptJob) -> None:
        if job in self.active:
            self.active.remove(job)
            self.batch.leave(job)

    def _finish(self, done: list[tuple[GptJob, SegmentCodes]], decoded: float) -> None:
        """The latent pass of generations that ended together: one call for each group of equal text and code
        lengths (row b of the call is generation b alone); a failed shared call is retried per generation."""
        empty = [(job, codes) for job, codes in done if not codes.codes.size]
        for job, codes in empty:
            self._succeed(job, codes, None, decoded)
        with_codes = [(job, codes) for job, codes in done if codes.codes.size]
        finished = {id(job): Finished(job.condition, job.emovec, codes.text_ids, codes.codes) for job, codes in with_codes}
        key = self.s_infer.group_key
        for group in _groups(with_codes, lambda jc: key(finished[id(jc[0])]), self.group_rows):
            try:
                s_infer = self._s_infer([finished[id(job)] for job, _ in group])
            except Exception as err:  # noqa: BLE001 — this job's latent pass, or each again alone
                if len(group) == 1:
                    group[0][0].fail(err)
                else:
                    for one in group:
                        self._finish([one], decoded)
                continue
            for b, (job, codes) in enumerate(group):
                self._succeed(job, codes, s_infer[b:b + 1].copy(), decoded)

    def _s_infer(self, group: list[Finished]) -> np.ndarray:
        out = self.s_infer.run(group)                       # (B, N, D) 2.0 / (B, 2N, hidden) 2.5
        self.latent_calls += 1
        return out

    def _succeed(self, job: GptJob, codes: SegmentCodes, s_infer: np.ndarray | None, decoded: float) -> None:
        done = time.perf_counter()
        job.succeed(GptOutput(codes, s_infer, {"gpt_wait": job.started - job.submitted,
                                               "gpt": decoded - job.started, self.s_infer.stage: done - decoded}))


def _groups(items: list, key: Callable[[Any], Hashable], size: int) -> list[list]:
    """`items` grouped by `key` (groups in order of their first item, items in order), each cut into runs of
    at most `size`."""
    by_key: dict[Hashable, list] = {}
    for item in items:
        by_key.setdefault(key(item), []).append(item)
    return [group[i:i + size] for group in by_key.values() for i in range(0, len(group), size)]


# -- s2mel --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class MelJob(Job):
    s_infer: np.ndarray             # (1, N, sem_dim)
    frames: int                     # generated mel frames
    prompt_condition: np.ndarray    # (1, T_ref, C)
    ref_mel: np.ndarray             # (1, 80, T_ref)
    style: np.ndarray               # (1, style_dim)
    noise: np.ndarray               # (1, 80, T_ref + frames)
    steps: int
    cfg_rate: float
    regulated: float = 0.0


@dataclass
class MelOutput:
    mel: np.ndarray                 # (1, 80, frames), the generated part
    timings: dict[str, float]


class MelWorker(StageWorker):
    """Length regulator alone per joining solve, then shared Euler steps."""

    name = "s2mel"

    def __init__(self, length_regulator: Executor, euler: EulerBatch,
                 regulate: Callable[[Executor, np.ndarray, int], np.ndarray]) -> None:
        super().__init__()
        self.length_regulator, self.euler, self.regulate = length_regulator, euler, regulate
        self.pending: deque[MelJob] = deque()
        self.active: list[MelJob] = []

    def busy(self) -> bool:
        return bool(self.pending or self.active)

    def held(self) -> Iterable[Job]:
        return [*self.pending, *self.active]

    def drop_all(self) -> None:
        for job in self.active:
            self.euler.leave(job)
        self.pending.clear()
        self.active.clear()

    def cycle(self, new: list[Job]) -> None:
        self.pending.extend(new)
        _drop_cancelled(self.pending)
        for job in [j for j in self.active if j.cancelled()]:
            self.active.remove(job)
            self.euler.leave(job)
            job.fail(Cancelled("the request was cancelled"))
        while self.pending and self.euler.has_room():
            self._join(self.pending.popleft())
        if self.active:
            self._step()

    def _join(self, job: MelJob) -> None:
        job.started = time.perf_counter()
        try:
            cond = self.regulate(self.length_regulator, job.s_infer, job.frames)              # (1, T_gen, C)
            condition = np.concatenate([job.prompt_condition, cond], axis=1)                 # (1, T_ref + T_gen, C)
            row = start_row(condition, job.ref_mel, job.style, job.noise, job.steps, job.cfg_rate)
        except Exception as err:  # noqa: BLE001 — this job's own inputs or regulator call
            job.fail(err)
            return
        job.regulated = time.perf_counter()
        self.euler.join(job, row)
        self.active.append(job)

    def _step(self) -> None:
        try:
            ended = self.euler.step()
        except Exception as err:  # noqa: BLE001 — the shared call failed: the jobs in it fail
            for job in list(self.active):
                if job in self.euler.last_keys:
                    self.active.remove(job)
                    self.euler.leave(job)
                    job.fail(err)
            return
        now = time.perf_counter()
        for job, mel_full in ended.items():
            self.active.remove(job)
            t_ref = job.ref_mel.shape[-1]
            job.succeed(MelOutput(np.ascontiguousarray(mel_full[:, :, t_ref:]), {
                "s2mel_wait": job.started - job.submitted, "length_regulator": job.regulated - job.started,
                "dit": now - job.regulated}))


# -- vocoder --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class VocoderJob(Job):
    mel: np.ndarray                 # (1, 80, T) the segment's mel
    window: Window


class VocoderWorker(StageWorker):
    """Windows of equal length (from any requests) share one bigvgan call, up to `max_rows`."""

    name = "vocoder"

    def __init__(self, bigvgan: Executor, max_rows: int, to_pcm: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.bigvgan, self.max_rows, self.to_pcm = bigvgan, max_rows, to_pcm
        self.pending: deque[VocoderJob] = deque()
        self.calls = 0
        self.peak_rows = 0

    def busy(self) -> bool:
        return bool(self.pending)

    def held(self) -> Iterable[Job]:
        return list(self.pending)

    def drop_all(self) -> None:
        self.pending.clear()

    def cycle(self, new: list[Job]) -> None:
        self.pending.extend(new)
        _drop_cancelled(self.pending)
        if not self.pending:
            return
        head = self.pending[0]
        group = [j for j in self.pending if j.window.window_frames == head.window.window_frames][:self.max_rows]
        for job in group:
            self.pending.remove(job)
            job.started = time.perf_counter()
        try:
            wavs = vocode_windows(self.bigvgan, [(j.mel, j.window) for j in group])
        except Exception as err:  # noqa: BLE001 — the shared call failed: its jobs fail
            for job in group:
                job.fail(err)
            return
        self.calls += 1
        self.peak_rows = max(self.peak_rows, len(group))
        for job, wav in zip(group, wavs):
            job.succeed(self.to_pcm(wav))


def vocode_windows(bigvgan: Executor, items: list[tuple[np.ndarray, Window]]) -> list[np.ndarray]:
    """Windows of one length, each from its own mel (1, 80, T), in one call -> each chunk's float32 samples."""
    frames = items[0][1].window_frames
    if any(w.window_frames != frames for _, w in items):
        raise ValueError("vocode_windows: the windows of one call must have the same length")
    feed = np.stack([mel[0, :, w.win_start:w.win_end] for mel, w in items]).astype(np.float32, copy=False)
    wav = bigvgan.run({"mel": np.ascontiguousarray(feed)})["wav"]                     # (n, hop W)
    expected = frames * items[0][1].hop
    if wav.shape[-1] != expected:
        raise BackendError(f"vocoder: {wav.shape[-1]} samples for a {frames}-frame window, expected {expected}")
    return [np.array(wav[i, w.crop_start:w.crop_end], np.float32) for i, (_, w) in enumerate(items)]
