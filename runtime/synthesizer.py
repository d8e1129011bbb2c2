"""The torch-free IndexTTS2 synthesizer: an export directory + a backend -> speech.

upstream: indextts/infer_v2.py:IndexTTS2.infer / infer_generator — UPSTREAM.md §2 (2.2 emotion source
order, 2.3-2.4 references, 2.6 text, 2.7 the per-segment loop, 2.8 output); DESIGN.md §4.

Per request: text -> segments (normalize, SentencePiece, segmentation); the emotion plan; the speaker
prompt (cached by audio content); the conditioning (spk_latent, emovec: merge with the emotion
reference, or the emotion-vector mix). Per segment: GPT prefill + decode loop (runtime/gpt/generate.py over
the preallocated KV cache), `gpt_latent`, `length_regulator`, the Euler loop over `dit_step`
(runtime/cfm.py), `bigvgan`, int16. Segments are yielded as they finish (`synthesize_segments`), or
joined with silence (`synthesize`).

Randomness comes from one seed through runtime/randomness.py, exactly as in the eager reference
(export/pipeline.py), so the same seed gives the same GPT draws and the same CFM noise on every backend.

Threads: a Synthesizer may be shared between threads. Its executors hold bound buffers, so graph work
is serialized by one lock, taken for each request's preparation and for each segment; requests from
several threads interleave segment by segment and each gets exactly the audio it would get alone. For
parallel throughput, create one Synthesizer per worker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from runtime.assets import load_emotion_matrices, load_tokenizer
from runtime.backend import Backend, open_backend, require_graphs
from runtime.caches import LRU, audio_key
from runtime.cfm import euler_solve, mel_length, regulate
from runtime.emotion import EmotionPlan, emotion_plan, final_emovec
from runtime.errors import InputError
from runtime.executors import OrtOptions
from runtime.executors.base import Executor
from runtime.frontend.text.tokenizer import text_segments
from runtime.gpt.codes import segment_codes
from runtime.gpt.generate import GenerationConfig
from runtime.gpt.sampling import DrawSource
from runtime.gpt.steps import GptSteps
from runtime.manifest import Manifest, read_manifest
from runtime.randomness import RandomStreams
from runtime.request import (
    DecoderSettings,
    SegmentResult,
    SynthesisRequest,
    SynthesisResult,
    join_segments,
)
from runtime.speaker import SpeakerPrompt, prepare_emotion, prepare_speaker
from runtime.timing import Laps, log_segment
from runtime.wav import to_pcm16

log = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    """A request made ready for the per-segment loop."""

    request: SynthesisRequest
    segments: list[list[int]]
    plan: EmotionPlan
    streams: RandomStreams
    prompt: SpeakerPrompt
    spk_latent: np.ndarray      # (1, 32, D)
    emovec: np.ndarray          # (1, D)


class Synthesizer:
    """IndexTTS2 from an export directory (`python -m export.build` output).

    `backend`: auto | trt | ort-cuda | ort-cpu, or a Backend already opened (runtime/backend.py; the
    synthesizer closes it). `executors`: run the graphs with these instead (e.g. the eager torch executors
    of export/torch_executor.py, for parity; they stay the caller's to close); the export directory still
    supplies the manifest and the runtime assets. `cache_size`: speaker / emotion references kept (LRU, by
    content).
    """

    def __init__(self, engines: str | Path, backend: str | Backend = "auto", *,
                 executors: Mapping[str, Executor] | None = None, ort_options: OrtOptions = OrtOptions(),
                 cache_size: int = 8, normalizer: str = "auto", emo_text_max_new_tokens: int = 32768,
                 engine_precision: str | None = None) -> None:
        """`engine_precision`: which graph form to run ("fp32", "fp16", "int8": the TensorRT plans, and the ONNX
        graphs ONNX Runtime loads; default: the export's precision on trt / ort-cuda, fp32 on ort-cpu;
        runtime.executors.graph_form)."""
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
        self._lock = threading.RLock()
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
        return open_backend(self.manifest, self.root, backend, ort_options=ort_options, precision=precision)

    def close(self) -> None:
        """Free the backend's resources (TensorRT device memory, CUDA graphs); the object is unusable after."""
        with self._lock:
            self._backend.close()

    def __enter__(self) -> "Synthesizer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- references -------------------------------------------------------------------------------
    def speaker(self, path: str | Path) -> SpeakerPrompt:
        """The prepared speaker reference (cached by file content)."""
        key = audio_key(path, "speaker")
        with self._lock:
            return self._speakers.get(key, lambda: prepare_speaker(self.graphs, path))

    def emotion(self, path: str | Path) -> np.ndarray:
        """The emotion reference's emovec (1, D) (cached by file content)."""
        key = audio_key(path, "emotion")
        with self._lock:
            return self._emotions.get(key, lambda: prepare_emotion(self.graphs, path))

    def _text_to_emotion(self, text: str) -> dict[str, float]:
        if self._llm is None:
            if not self.manifest.assets.emotion_llm:
                raise InputError("emotion from text needs the checkpoint's emotion LLM (qwen0.6bemo4-merge), "
                                 "and this export has none; use --emo-vector or --emo-audio")
            from runtime.emotion.llm import QwenEmotion

            self._llm = QwenEmotion(self.manifest.assets.emotion_llm, max_new_tokens=self._emo_text_max_new_tokens)
        return self._llm.inference(text)

    # -- a request --------------------------------------------------------------------------------
    def segments(self, request: SynthesisRequest) -> list[list[int]]:
        return text_segments(self.tokenizer, request)

    def prepare(self, request: SynthesisRequest, seed: int | None = None,
                gpt_draws: DrawSource | None = None) -> PreparedRequest:
        """Everything before the per-segment loop: segments, emotion plan, randomness, conditioning."""
        segments = self.segments(request)
        plan = emotion_plan(request, self._text_to_emotion)
        streams = RandomStreams.from_seed(seed, gpt_draws)
        t0 = time.perf_counter()
        prompt = self.speaker(request.speaker)
        t1 = time.perf_counter()
        emovec = final_emovec(self.matrices, plan, prompt.base_emovec, self.emotion(plan.emo_audio), prompt.style,
                              request.use_random, streams.choice)                   # (1, D)
        log.info("%d segment(s); emotion from %s; speaker %.2f s, emotion %.2f s", len(segments), plan.source,
                 t1 - t0, time.perf_counter() - t1)
        return PreparedRequest(request, segments, plan, streams, prompt, prompt.spk_latent, emovec)

    def synthesize_segments(self, request: SynthesisRequest, generation: GenerationConfig | None = None,
                            decoder: DecoderSettings | None = None, seed: int | None = None,
                            gpt_draws: DrawSource | None = None) -> Iterator[SegmentResult]:
        """Yield each segment's audio as soon as it is finished (the streaming form of `synthesize`)."""
        prep = self.prepare(request, seed, gpt_draws)
        for index in range(len(prep.segments)):
            yield self.segment(prep, index, generation, decoder)

    def synthesize(self, request: SynthesisRequest, generation: GenerationConfig | None = None,
                   decoder: DecoderSettings | None = None, seed: int | None = None,
                   gpt_draws: DrawSource | None = None) -> SynthesisResult:
        """All segments joined with `interval_silence_ms` of silence between them (not after the last)."""
        prep = self.prepare(request, seed, gpt_draws)
        segments = [self.segment(prep, i, generation, decoder) for i in range(len(prep.segments))]
        return SynthesisResult(join_segments(segments, self.sample_rate, request.interval_silence_ms),
                               self.sample_rate, segments, prep.plan)

    # -- one segment ------------------------------------------------------------------------------
    def segment(self, prep: PreparedRequest, index: int, generation: GenerationConfig | None = None,
                decoder: DecoderSettings | None = None) -> SegmentResult:
        """Segment `index` of a prepared request: codes, mel, int16 samples, per-stage wall times."""
        generation = generation or self.generation_defaults
        decoder = decoder or self.decoder_defaults
        with self._lock:
            return self._segment(prep, index, generation, decoder)

    def _segment(self, prep: PreparedRequest, index: int, generation: GenerationConfig,
                 decoder: DecoderSettings) -> SegmentResult:
        laps = Laps()
        prompt, streams = prep.prompt, prep.streams
        seg = segment_codes(self.gpt_steps, prep.spk_latent, prep.emovec, prep.segments[index], generation,
                            streams.gpt, index)
        codes = seg.codes                                                           # (N,)
        laps.lap("gpt")
        t_ref = prompt.ref_mel.shape[-1]
        frames = mel_length(codes.size)
        noise = streams.cfm_noise(t_ref + frames, decoder.temperature)               # drawn even if unused
        if codes.size == 0:
            mel = np.zeros((1, prompt.ref_mel.shape[1], 0), np.float32)
            pcm = np.zeros(0, np.int16)
        else:
            s_infer = self.graphs["gpt_latent"].run({
                "spk_latent": prep.spk_latent, "emovec": prep.emovec,
                "text_ids": np.ascontiguousarray(seg.text_ids[None]), "codes": np.ascontiguousarray(codes[None])
            })["s_infer"]                                                           # (1, N, sem_dim)
            laps.lap("latent")
            cond = regulate(self.graphs["length_regulator"], s_infer, frames)       # (1, T_gen, C)
            condition = np.concatenate([prompt.prompt_condition, cond], axis=1)    # (1, T_ref + T_gen, C)
            laps.lap("length_regulator")
            mel_full = euler_solve(self.graphs["dit_step"], condition, prompt.ref_mel, prompt.style, noise,
                                   decoder.steps, decoder.cfg_rate)                 # (1, 80, T_ref + T_gen)
            mel = np.ascontiguousarray(mel_full[:, :, t_ref:])                      # (1, 80, T_gen)
            laps.lap("dit")
            wav = self.graphs["bigvgan"].run({"mel": mel})["wav"]                   # (1, 256 T_gen)
            pcm = to_pcm16(wav[0])
            laps.lap("bigvgan")
        log_segment(index, len(prep.segments), seg, pcm.size, self.sample_rate, laps)
        return SegmentResult(index, seg.text_ids, codes, seg.result.stopped, mel, pcm, laps.timings,
                             len(prep.segments))
