"""The torch-free IndexTTS2 synthesizer: an export directory + a backend -> speech.

upstream: indextts/infer_v2.py:IndexTTS2.infer / infer_generator — UPSTREAM.md §2 (2.2 emotion source
order, 2.3-2.4 references, 2.6 text, 2.7 the per-segment loop, 2.8 output); DESIGN.md §4.

Per request: text -> segments (normalize, SentencePiece, segmentation); the emotion plan; the speaker
prompt (cached by audio content); the conditioning (spk_latent, emovec: merge with the emotion
reference, or the emotion-vector mix). Per segment, three stages: GPT (prefill + decode loop,
runtime/gpt/generate.py over the preallocated KV cache, then `gpt_latent`), s2mel (`length_regulator`, the
Euler loop over `dit_step`, runtime/cfm.py), vocoder (`bigvgan` over the mel, whole or in chunks with the
context its receptive field needs, runtime/streaming/vocoder.py), int16. `stream()` yields the audio in
chunks as they are ready (runtime/streaming/pipeline.py runs the stages, the next segment's GPT ahead in a
worker thread); `synthesize()` is the concatenation of that stream.

Randomness comes from one seed through runtime/randomness.py, exactly as in the eager reference
(export/pipeline.py), so the same seed gives the same GPT draws and the same CFM noise on every backend.

Threads: a Synthesizer may be shared between threads, and requests from many threads are batched. Its
graph work runs on the scheduler's stage workers (runtime/scheduler/): one thread per stage owns that
stage's executors and steps every request's work in shared calls (the GPT decode of all active
generations in one `gpt_decode` call, the Euler steps of several segments in one `dit_step` call, vocoder
windows of equal length in one `bigvgan` call). The request's own thread (and its GPT-ahead worker)
submits each stage's job and waits for it, so each request keeps its order and its random streams and gets
exactly the audio it would get alone; one request alone is a batch of one. Reference preparation runs in
the request's thread under one lock (its caches and the emotion LLM are shared objects). At most
`SchedulerConfig.max_active_requests` requests run at once and `max_queued_requests` wait; beyond that a
request gets QueueFull before any work.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from runtime.assets import load_emotion_matrices, load_tokenizer
from runtime.backend import Backend, open_backend, require_graphs
from runtime.caches import LRU, audio_key
from runtime.cfm import mel_length, mel_length_25
from runtime.emotion import EmotionPlan, emotion_plan, final_emovec
from runtime.errors import InputError
from runtime.executors import OrtOptions
from runtime.executors.base import Executor
from runtime.frontend.text.tokenizer import text_segments
from runtime.frontend.text25.frontend import request_segments
from runtime.frontend.audio import AudioSource
from runtime.gpt.codes import SegmentCodes
from runtime.gpt.generate import GenerationConfig, GptCondition
from runtime.gpt.sampling import DrawSource
from runtime.gpt.steps import GptSteps
from runtime.manifest import Manifest, read_manifest
from runtime.randomness import RandomStreams
from runtime.scheduler.scheduler import Scheduler, SchedulerConfig
from runtime.scheduler.workers import GptJob, MelJob, VocoderJob
from runtime.request import DecoderSettings, SegmentResult, SynthesisRequest, SynthesisResult, silence
from runtime.speaker import SpeakerPrompt, prepare_emotion, prepare_speaker
from runtime.streaming.chunks import AudioChunk, StreamSettings
from runtime.streaming.pipeline import stream_segments
from runtime.streaming.vocoder import VocoderChunking, VocoderPlanner, Window
from runtime.timing import log_segment

log = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    """A request made ready for the per-segment loop."""

    request: SynthesisRequest
    segments: list[list[int]]
    plan: EmotionPlan
    streams: RandomStreams
    prompt: SpeakerPrompt
    condition: GptCondition     # the GPT prefill's speaker (/ language) inputs: 2.0 {spk_latent (1, 32, D)}
    emovec: np.ndarray          # (1, D)
    cancel: threading.Event = field(default_factory=threading.Event)   # set when its stream ends or is closed


@dataclass
class CodedSegment:
    """A segment after the GPT stage."""

    index: int
    codes: SegmentCodes
    s_infer: np.ndarray | None  # (1, N, sem_dim); None for a silent segment (no codes)
    timings: dict[str, float]


@dataclass
class MelSegment:
    """A segment after the s2mel stage."""

    mel: np.ndarray             # (1, 80, T_gen) float32, the generated part
    frames: int                 # T_gen
    timings: dict[str, float]


class Synthesizer:
    """IndexTTS2 from an export directory (`python -m export.build` output).

    `backend`: auto | trt | ort-cuda | ort-cpu, or a Backend already opened (runtime/backend.py; the
    synthesizer closes it). `executors`: run the graphs with these instead (e.g. the eager torch executors
    of export/torch_executor.py, for parity; they stay the caller's to close); the export directory still
    supplies the manifest and the runtime assets. `cache_size`: speaker / emotion references kept (LRU, by
    content). `scheduler`: how much work concurrent requests share and how many are taken
    (runtime/scheduler/scheduler.py).
    """

    def __init__(self, engines: str | Path, backend: str | Backend = "auto", *,
                 executors: Mapping[str, Executor] | None = None, ort_options: OrtOptions = OrtOptions(),
                 cache_size: int = 8, normalizer: str = "auto", emo_text_max_new_tokens: int = 32768,
                 engine_precision: str | None = None, scheduler: SchedulerConfig = SchedulerConfig(),
                 cpu_plan_fallback: bool = False) -> None:
        """`engine_precision`: which graph form to run ("fp32", "fp16", "int8": the TensorRT plans, and the ONNX
        graphs ONNX Runtime loads; default: the export's precision on trt / ort-cuda, fp32 on ort-cpu;
        runtime.executors.graph_form; "bf16" on ov-cpu: OpenVINO's precision hint). `cpu_plan_fallback`: on
        cpu-auto without a CPU plan valid here, run ONNX Runtime float32 instead of refusing."""
        self._cpu_plan_fallback = cpu_plan_fallback
        self.root = Path(engines)
        if not self.root.exists():
            raise InputError(f"{self.root}: engine directory not found; create it with "
                             "python -m export.build --checkpoints CKPT --out DIR")
        self.manifest: Manifest = read_manifest(self.root)
        require_graphs(self.manifest, self.root)
        self._backend = self._open(backend, executors, ort_options, engine_precision)
        self.backend: str = self._backend.name
        self.graphs: Mapping[str, Executor] = self._backend.graphs
        self.gpt_steps: GptSteps = self._backend.gpt_steps
        self.tokenizer = load_tokenizer(self.manifest, self.root, normalizer)
        self.matrices = load_emotion_matrices(self.manifest, self.root)
        self.sample_rate = self.manifest.synthesis.sample_rate
        self.generation_defaults: GenerationConfig = self.manifest.sampling
        self.decoder_defaults = DecoderSettings(self.manifest.synthesis.euler_steps, self.manifest.synthesis.cfg_rate)
        self._speakers: LRU[SpeakerPrompt] = LRU(cache_size)
        self._emotions: LRU[np.ndarray] = LRU(cache_size)
        self._refs_lock = threading.RLock()         # reference preparation, its caches, the emotion LLM
        self._scheduler_config = scheduler
        self._scheduler_made: Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        self._planners: dict[VocoderChunking | None, VocoderPlanner] = {}
        self._llm = None
        self._emo_text_max_new_tokens = emo_text_max_new_tokens
        log.info("synthesizer on %s: %s (%d graphs)", self.backend, self.root, len(self.manifest.graphs))

    def _open(self, backend: str | Backend, executors: Mapping[str, Executor] | None, ort_options: OrtOptions,
              precision: str | None) -> Backend:
        """The Backend to run: given, built over injected executors, or opened now (every file checked and
        loaded here, not in the middle of a request)."""
        if isinstance(backend, Backend):
            if executors is not None:
                raise InputError("Synthesizer: pass either an opened Backend or executors, not both")
            return backend
        if executors is not None:
            return Backend.from_executors(self.manifest, executors)
        return open_backend(self.manifest, self.root, backend, ort_options=ort_options, precision=precision,
                            cpu_plan_fallback=self._cpu_plan_fallback)

    @property
    def scheduler(self) -> Scheduler:
        """The stage workers and their batches (their counters and timelines are what benchmarks read)."""
        return self._scheduler

    @property
    def _scheduler(self) -> Scheduler:
        """The stage workers, made on first use over the GPT steps of that moment (a benchmark may wrap
        `gpt_steps` after construction; a job whose steps differ later runs alone)."""
        with self._scheduler_lock:
            if self._scheduler_made is None:
                self._scheduler_made = Scheduler(self.manifest, self.graphs, self.gpt_steps, self._scheduler_config,
                                                 fixed_profiles=self.backend == "trt")
            return self._scheduler_made

    def close(self) -> None:
        """Free the backend's resources (TensorRT device memory, CUDA graphs); the object is unusable after.
        The stage workers stop after their current step; requests still running fail with Cancelled."""
        with self._scheduler_lock:
            if self._scheduler_made is not None:
                self._scheduler_made.close()
        with self._refs_lock:
            self._backend.close()

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- references -------------------------------------------------------------------------------
    def speaker(self, path: AudioSource) -> SpeakerPrompt:
        """The prepared speaker reference (cached by file content)."""
        key = audio_key(path, "speaker")
        with self._refs_lock:
            return self._speakers.get(key, lambda: prepare_speaker(self.graphs, path, self.manifest.version))

    def emotion(self, path: AudioSource) -> np.ndarray:
        """The emotion reference's emovec (1, D) (cached by file content)."""
        key = audio_key(path, "emotion")
        with self._refs_lock:
            return self._emotions.get(key, lambda: prepare_emotion(self.graphs, path))

    def _text_to_emotion(self, text: str) -> dict[str, float]:
        """The emotion LLM's scores for `text` (loaded on first use; one request at a time, under the
        references' lock: the model is one object)."""
        with self._refs_lock:
            if self._llm is None:
                if not self.manifest.assets.emotion_llm:
                    raise InputError("emotion from text needs the checkpoint's emotion LLM (qwen0.6bemo4-merge), "
                                     "and this export has none; use --emo-vector or --emo-audio")
                from runtime.emotion.llm import QwenEmotion

                self._llm = QwenEmotion(self.manifest.assets.emotion_llm,
                                        max_new_tokens=self._emo_text_max_new_tokens)
            return self._llm.inference(text)

    # -- a request --------------------------------------------------------------------------------
    def segments(self, request: SynthesisRequest) -> list[list[int]]:
        return self._text(request)[0]

    def _text(self, request: SynthesisRequest) -> tuple[list[list[int]], int | None]:
        """(per-segment ids, the 2.5 lang_id or None). The 2.5-only fields on a 2.0 export are refused."""
        if self.manifest.version == "2.0":
            if request.lang is not None or request.duration_factor != 1.0:
                raise InputError("lang and duration_factor are IndexTTS-2.5 inputs; this export is IndexTTS2 2.0 "
                                 f"({self.root})")
            return text_segments(self.tokenizer, request), None
        if not isinstance(request.text, str) or not request.text.strip():
            raise InputError("the text to synthesize is empty")
        segments, lang_id = request_segments(self.tokenizer, request.text, request.lang,
                                             request.max_text_tokens_per_segment, request.quick_streaming_tokens)
        if not segments:
            raise InputError(f"the text {request.text[:40]!r} gives no tokens to speak")
        return segments, lang_id

    def mel_frames(self, request: SynthesisRequest, n_codes: int) -> int:
        """A segment's target mel length: 2.0 int(N * 1.72) in float32; 2.5 int(2N * 1.72 * duration_factor)."""
        if self.manifest.version == "2.0":
            return mel_length(n_codes)
        return mel_length_25(2 * n_codes, request.duration_factor)

    def prepare(self, request: SynthesisRequest, seed: int | None = None,
                gpt_draws: DrawSource | None = None) -> PreparedRequest:
        """Everything before the per-segment loop: segments, emotion plan, randomness, conditioning."""
        segments, lang_id = self._text(request)
        plan = emotion_plan(request, self._text_to_emotion)
        streams = RandomStreams.from_seed(seed, gpt_draws)
        t0 = time.perf_counter()
        prompt = self.speaker(request.speaker)
        t1 = time.perf_counter()
        emovec = final_emovec(self.matrices, plan, prompt.base_emovec, self.emotion(plan.emo_audio), prompt.style,
                              request.use_random, streams.choice)                   # (1, D)
        log.info("%d segment(s); emotion from %s; speaker %.2f s, emotion %.2f s", len(segments), plan.source,
                 t1 - t0, time.perf_counter() - t1)
        if lang_id is None:
            condition = {"spk_latent": prompt.spk_latent}
        else:                                            # 2.5: the GPT reads the style and the language
            condition = {"style": prompt.style, "lang_id": np.array([lang_id], np.int64)}
        return PreparedRequest(request, segments, plan, streams, prompt, condition, emovec)

    def stream(self, request: SynthesisRequest, generation: GenerationConfig | None = None,
               decoder: DecoderSettings | None = None, seed: int | None = None, gpt_draws: DrawSource | None = None,
               *, settings: StreamSettings | None = None) -> Iterator[AudioChunk]:
        """The request's audio as chunks, each yielded as soon as it is ready (runtime/streaming/).

        `settings` (default StreamSettings(): 32-frame first vocoder chunks growing to 256, the GPT of the
        next segment running ahead): how the audio is cut. Settings and request are checked and the request
        prepared (references, emotion) before this returns, so bad input raises here, before any chunk; a
        failure after that ends the iteration with a StreamError naming the chunks already delivered.
        Concatenated, the chunks are `synthesize()`'s audio for the same request and seed.
        """
        return self._start(request, generation, decoder, seed, gpt_draws,
                           settings if settings is not None else StreamSettings())[1]

    def synthesize(self, request: SynthesisRequest, generation: GenerationConfig | None = None,
                   decoder: DecoderSettings | None = None, seed: int | None = None,
                   gpt_draws: DrawSource | None = None, *, settings: StreamSettings | None = None) -> SynthesisResult:
        """All segments joined with `interval_silence_ms` of silence between them (not after the last): the
        concatenation of `stream()` (default: one vocoder call per segment, the GPT running ahead)."""
        prep, stream = self._start(request, generation, decoder, seed, gpt_draws,
                                   settings if settings is not None else StreamSettings.whole_segments())
        chunks = list(stream)
        segments = [c.result for c in chunks if c.result is not None]
        pcm = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.int16)
        return SynthesisResult(pcm, self.sample_rate, segments, prep.plan)

    def _start(self, request: SynthesisRequest, generation: GenerationConfig | None, decoder: DecoderSettings | None,
               seed: int | None, gpt_draws: DrawSource | None,
               settings: StreamSettings) -> tuple[PreparedRequest, Iterator[AudioChunk]]:
        """Check the settings, prepare the request (both before any chunk), and the stream of its chunks."""
        started = time.perf_counter()
        self._check_settings(settings)
        admission = self._scheduler.admission
        admission.acquire()                                  # QueueFull here: nothing was started
        try:
            prep = self.prepare(request, seed, gpt_draws)
        except BaseException:
            admission.release()
            raise
        return prep, _Admitted(stream_segments(self, prep, generation or self.generation_defaults,
                                               decoder or self.decoder_defaults, settings, started),
                               admission.release, prep.cancel)

    def synthesize_segments(self, request: SynthesisRequest, generation: GenerationConfig | None = None,
                            decoder: DecoderSettings | None = None, seed: int | None = None,
                            gpt_draws: DrawSource | None = None, *,
                            settings: StreamSettings | None = None) -> Iterator[SegmentResult]:
        """Each segment's result as soon as its last chunk is ready (the stream, seen segment by segment)."""
        settings = settings if settings is not None else StreamSettings.whole_segments()
        for chunk in self.stream(request, generation, decoder, seed, gpt_draws, settings=settings):
            if chunk.result is not None:
                yield chunk.result

    # -- one segment, stage by stage (runtime/streaming/pipeline.py drives these) --------------------
    def segment(self, prep: PreparedRequest, index: int, generation: GenerationConfig | None = None,
                decoder: DecoderSettings | None = None) -> SegmentResult:
        """Segment `index` of a prepared request, all stages in this thread, one vocoder call: codes, mel,
        int16 samples, per-stage wall times. Segments of one request must be made in order (the noise
        stream is read in segment order)."""
        coded = self.codes_stage(prep, index, generation or self.generation_defaults)
        staged = self.mel_stage(prep, coded, decoder or self.decoder_defaults)
        windows = self.vocoder_windows(staged.frames, StreamSettings.whole_segments())
        t0 = time.perf_counter()
        pcm = np.concatenate([self.vocode(staged.mel, w) for w in windows]) if windows else np.zeros(0, np.int16)
        return self.finish_segment(prep, coded, staged, pcm, time.perf_counter() - t0)

    def codes_stage(self, prep: PreparedRequest, index: int, generation: GenerationConfig) -> CodedSegment:
        """The GPT stage of one segment (on the scheduler's GPT worker, decoded with the other requests'
        generations): the codes and the GPT latent `s_infer` over them."""
        job = GptJob(prep.condition, prep.emovec, np.asarray(prep.segments[index], np.int64), generation,
                     prep.streams.gpt, index, self.gpt_steps, cancel=prep.cancel)
        out = self._scheduler.gpt.run(job)
        return CodedSegment(index, out.codes, out.s_infer, out.timings)

    def mel_stage(self, prep: PreparedRequest, coded: CodedSegment, decoder: DecoderSettings) -> MelSegment:
        """The s2mel stage: target length, CFM noise (drawn here, in segment order, even for a silent
        segment, as the eager reference does), then the length regulator and the Euler loop on the
        scheduler's s2mel worker (sharing dit_step calls with other requests); the generated part of the mel."""
        prompt = prep.prompt
        t_ref = prompt.ref_mel.shape[-1]
        frames = self.mel_frames(prep.request, coded.codes.codes.size)
        noise = prep.streams.cfm_noise(t_ref + frames, decoder.temperature)
        if coded.s_infer is None:
            return MelSegment(np.zeros((1, prompt.ref_mel.shape[1], 0), np.float32), 0, {})
        job = MelJob(coded.s_infer, frames, prompt.prompt_condition, prompt.ref_mel, prompt.style, noise,
                     decoder.steps, decoder.cfg_rate, cancel=prep.cancel)
        out = self._scheduler.mel.run(job)
        return MelSegment(out.mel, frames, out.timings)

    def vocoder_windows(self, frames: int, settings: StreamSettings) -> list[Window]:
        """The vocoder calls for a segment of `frames` mel frames (none for a silent segment)."""
        return self._planner(settings.vocoder).plan(frames)

    def vocode(self, mel: np.ndarray, window: Window, cancel: threading.Event | None = None) -> np.ndarray:
        """One vocoder window -> the int16 samples of its chunk (on the scheduler's vocoder worker, sharing
        the call with other requests' windows of the same length)."""
        if mel.ndim != 3 or window.win_end > mel.shape[2]:
            raise InputError(f"vocoder window [{window.win_start}, {window.win_end}) does not fit a mel of shape "
                             f"{mel.shape} (expected (1, mel_bins, T >= {window.win_end}))")
        return self._scheduler.vocoder.run(VocoderJob(mel, window, cancel=cancel))

    def finish_segment(self, prep: PreparedRequest, coded: CodedSegment, staged: MelSegment,
                       pcm: np.ndarray, vocoder_s: float = 0.0) -> SegmentResult:
        """The segment's result (its whole pcm, as the stream delivered it) and its progress line."""
        timings = {**coded.timings, **staged.timings, "bigvgan": vocoder_s}
        seg = coded.codes
        log_segment(coded.index, len(prep.segments), seg, pcm.size, self.sample_rate, timings)
        return SegmentResult(coded.index, seg.text_ids, seg.codes, seg.result.stopped, staged.mel, pcm, timings,
                             len(prep.segments))

    def silence(self, prep: PreparedRequest) -> np.ndarray:
        return silence(self.sample_rate, prep.request.interval_silence_ms)

    def _check_settings(self, settings: StreamSettings) -> None:
        self._planner(settings.vocoder)

    def _planner(self, chunking: VocoderChunking | None) -> VocoderPlanner:
        """The window planner of a chunking (made once; its construction checks the chunk sizes against the
        bigvgan profile: InputError before any work)."""
        planner = self._planners.get(chunking)
        if planner is None:
            planner = VocoderPlanner.from_manifest(self.manifest, chunking, where=str(self.root))
            self._planners[chunking] = planner
        return planner


class _Admitted:
    """A request's chunk iterator that gives its admission slot back when it ends, fails, is closed, or is
    dropped without being read (the request's cancel flag is set then too, freeing its batch rows)."""

    def __init__(self, chunks: Iterator[AudioChunk], release, cancel: threading.Event | None = None) -> None:
        self._chunks, self._release = chunks, release
        self._cancel = cancel if cancel is not None else threading.Event()
        self._open = True

    def cancel(self) -> None:
        """Stop the request from any thread (a server's client gone), even while another thread waits in
        `next()`: its queued and batched work is dropped at the next step and that `next()` ends with
        Cancelled. `close()` from the reading thread then gives the slot back (or `next()` does)."""
        self._cancel.set()

    def __iter__(self) -> "_Admitted":
        return self

    def __next__(self) -> AudioChunk:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._chunks.close()
            finally:
                self._release()

    def __del__(self) -> None:
        self.close()
