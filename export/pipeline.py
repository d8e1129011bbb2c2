"""The eager end-to-end IndexTTS2: text + speaker reference (+ emotion) -> 22.05 kHz speech.

upstream: indextts/infer_v2.py:IndexTTS2.infer / infer_generator — UPSTREAM.md §2 (2.2 emotion source
order, 2.3-2.4 reference preparation, 2.6 text, 2.7 per-segment loop, 2.8 output).

This is the independent reference the engine runtime is compared with. It runs the eager PyTorch
submodels, but the host logic (text, emotion arithmetic, the GPT decode loop, randomness) is the
runtime's own numpy code, shared on purpose: the decode loop drives the eager GPT through the same
`GptSteps` seam that the engines implement. Speaker and emotion references are cached by audio
content (not by path), in bounded LRU caches.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from runtime.emotion import EmotionPlan, merge_emovec, mix_emovec, resolve_emotion_source
from runtime.errors import InputError
from runtime.generate import GenerationConfig, generate
from runtime.randomness import RandomStreams
from runtime.sampling import DrawSource
from runtime.text.normalize import TextNormalizer
from runtime.text.tokenizer import TextTokenizer
from runtime.wav import to_pcm16

from .eager import EagerModels, SpeakerPrompt, codes_to_mel, emotion_features, mel_length, prepare_speaker, vocode
from .emotion_matrices import load_emotion_matrices
from .gpt_executor import EagerGptSteps

log = logging.getLogger(__name__)

SAMPLE_RATE = 22050
T = TypeVar("T")


@dataclass(frozen=True)
class SynthesisRequest:
    """One `infer` call's inputs (upstream argument names and defaults, UPSTREAM §2.1)."""

    text: str
    speaker: Path
    emo_audio: Path | None = None
    emo_alpha: float = 1.0
    emo_vector: tuple[float, ...] | None = None
    use_emo_text: bool = False
    emo_text: str | None = None
    use_random: bool = False
    interval_silence_ms: int = 200
    max_text_tokens_per_segment: int = 120
    quick_streaming_tokens: int = 0


@dataclass(frozen=True)
class DecoderSettings:
    """The s2mel Euler solve: upstream's 25 steps, CFG rate 0.7, temperature 1.0."""

    steps: int = 25
    cfg_rate: float = 0.7
    temperature: float = 1.0


@dataclass
class SegmentResult:
    index: int
    text_ids: np.ndarray        # (L,) int64, as tokenized (ids 0/1 included if the text produced them)
    codes: np.ndarray           # (N,) int64, stop token removed
    stopped: bool               # the GPT emitted the stop token (else max_mel_tokens was hit)
    mel: np.ndarray             # (1, 80, T_gen) float32
    pcm: np.ndarray             # (S,) int16, 22.05 kHz
    timings: dict[str, float] = field(default_factory=dict)   # wall seconds per stage


@dataclass
class SynthesisResult:
    pcm: np.ndarray             # (N,) int16, segments joined with silence
    sample_rate: int
    segments: list[SegmentResult]
    emotion: EmotionPlan


@dataclass
class PreparedRequest:
    """A request made ready for the per-segment loop."""

    segments: list[list[int]]
    plan: EmotionPlan
    streams: RandomStreams
    prompt: SpeakerPrompt
    spk_latent: np.ndarray      # (1, 32, D)
    emovec: np.ndarray          # (1, D)


class _LRU:
    """A small content-keyed cache (speaker and emotion references)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str, make: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]  # type: ignore[return-value]
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def audio_key(path: str | Path, role: str) -> str:
    """Cache key of a reference file: its content hash, so an edited file is not served stale."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError as err:
        raise InputError(f"{path}: audio file not found") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read the audio file ({err})") from err
    return f"{role}:{digest}"


class EagerIndexTTS2:
    """Eager IndexTTS2 from a checkpoint directory. Not thread-safe (one synthesis at a time)."""

    def __init__(self, checkpoints: str | Path, cache_size: int = 8, normalizer: str = "auto",
                 emo_text_max_new_tokens: int = 32768) -> None:
        """`emo_text_max_new_tokens` bounds the emotion LLM's answer (upstream: 32768; a trained model
        answers in a few dozen tokens, a random demo model never stops, so tests pass a small value)."""
        self.models = EagerModels.load(checkpoints)
        layout, cfg = self.models.layout, self.models.layout.config
        assert cfg.gpt is not None and self.models.gpt is not None
        text_normalizer = TextNormalizer(enable_glossary=True, backend=normalizer)
        text_normalizer.load_glossary_from_yaml(layout.root / "glossary.yaml")
        self.tokenizer = TextTokenizer(layout.require("bpe"), normalizer=text_normalizer)
        self.matrices = load_emotion_matrices(layout.require("feat1"), layout.require("feat2"), cfg.emo_num,
                                              model_dim=cfg.gpt.model_dim)
        self.gpt_steps = EagerGptSteps(self.models.gpt)
        self._speakers = _LRU(cache_size)
        self._emotions = _LRU(cache_size)
        self._qwen = None
        self._emo_text_max_new_tokens = emo_text_max_new_tokens

    # -- references -------------------------------------------------------------------------------
    def speaker(self, path: str | Path) -> SpeakerPrompt:
        return self._speakers.get(audio_key(path, "speaker"), lambda: prepare_speaker(self.models, path))

    def emotion_embedding(self, path: str | Path) -> torch.Tensor:
        return self._emotions.get(audio_key(path, "emotion"), lambda: emotion_features(self.models, path))

    def _text_to_emotion(self, text: str) -> dict[str, float]:
        if self._qwen is None:
            from .qwen_emotion import QwenEmotion

            self._qwen = QwenEmotion(self.models.layout.main_file("qwen_emo"),
                                     max_new_tokens=self._emo_text_max_new_tokens)
        return self._qwen.inference(text)

    # -- conditioning -----------------------------------------------------------------------------
    @torch.inference_mode()
    def conditioning(self, request: SynthesisRequest, prompt: SpeakerPrompt, plan: EmotionPlan,
                     streams: RandomStreams) -> tuple[np.ndarray, np.ndarray]:
        """(spk_latent (1, 32, D), emovec (1, D)) for this request, as upstream computes them per segment."""
        gpt = self.models.gpt
        spk = prompt.spk_cond_emb                                               # (1, T, F)
        spk_latent = gpt.speaker_conditioner(spk, torch.tensor([spk.shape[1]]))    # (1, 32, D)
        emo = self.emotion_embedding(plan.emo_audio)                            # (1, T_e, F)
        base = gpt.emotion_conditioner(spk, torch.tensor([spk.shape[1]])).numpy()  # (1, D)
        target = gpt.emotion_conditioner(emo, torch.tensor([emo.shape[1]])).numpy()
        emovec = merge_emovec(base, target, plan.merge_alpha)                   # (1, D)
        if plan.emo_vector is not None:
            emovec = mix_emovec(self.matrices, plan.emo_vector, prompt.style.numpy(), emovec,
                                request.use_random, streams.choice).emovec
        return spk_latent.numpy(), emovec

    def segments(self, request: SynthesisRequest) -> list[list[int]]:
        """Text -> per-segment SentencePiece ids (normalize, CJK split, segment; UPSTREAM §2.6)."""
        if not request.text or not request.text.strip():
            raise InputError("the text to synthesize is empty")
        return self.tokenizer.segment_ids(request.text, request.max_text_tokens_per_segment,
                                          request.quick_streaming_tokens)

    # -- synthesis --------------------------------------------------------------------------------
    def prepare(self, request: SynthesisRequest, seed: int | None = None,
                gpt_draws: DrawSource | None = None) -> PreparedRequest:
        """Everything before the per-segment loop: segments, emotion plan, randomness, conditioning."""
        segments = self.segments(request)
        plan = resolve_emotion_source(request.text, request.speaker, request.emo_audio, request.emo_alpha,
                                      request.emo_vector, request.use_emo_text, request.emo_text,
                                      self._text_to_emotion if request.use_emo_text else None)
        streams = RandomStreams.from_seed(seed, gpt_draws)
        t0 = time.perf_counter()
        prompt = self.speaker(request.speaker)
        t1 = time.perf_counter()
        spk_latent, emovec = self.conditioning(request, prompt, plan, streams)
        log.info("%d segment(s); emotion from %s; speaker %.2f s, conditioning %.2f s", len(segments),
                 plan.source, t1 - t0, time.perf_counter() - t1)
        return PreparedRequest(segments, plan, streams, prompt, spk_latent, emovec)

    def synthesize_segments(self, request: SynthesisRequest, generation: GenerationConfig = GenerationConfig(),
                            decoder: DecoderSettings = DecoderSettings(), seed: int | None = None,
                            gpt_draws: DrawSource | None = None) -> Iterator[SegmentResult]:
        """Yield each segment's audio as soon as it is finished (the streaming form of `synthesize`)."""
        prep = self.prepare(request, seed, gpt_draws)
        for index in range(len(prep.segments)):
            yield self._segment(index, prep, generation, decoder)

    @torch.inference_mode()
    def _segment(self, index: int, prep: PreparedRequest, generation: GenerationConfig,
                 decoder: DecoderSettings) -> SegmentResult:
        t0 = clock = time.perf_counter()
        timings: dict[str, float] = {}

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = now - clock
            clock = now

        text_ids = np.asarray(prep.segments[index], np.int64)                  # (L,)
        prompt, spk_latent, emovec, streams = prep.prompt, prep.spk_latent, prep.emovec, prep.streams
        result = generate(self.gpt_steps, spk_latent, emovec, text_ids, generation, draws=streams.gpt)
        stop = self.gpt_steps.geometry.stop_mel_token
        hits = np.flatnonzero(result.codes == stop)
        codes = result.codes[: hits[0]] if hits.size else result.codes          # (N,)
        lap("gpt")
        if not result.stopped:
            log.warning("segment %d: no stop token within max_mel_tokens=%d; the audio is cut there",
                        index + 1, generation.max_mel_tokens)
        t_ref = prompt.ref_mel.shape[-1]
        noise = streams.cfm_noise(t_ref + mel_length(codes.size), decoder.temperature)
        if codes.size == 0:
            log.warning("segment %d: the GPT stopped at once; the segment is silent", index + 1)
            mel = np.zeros((1, 80, 0), np.float32)
            pcm = np.zeros(0, np.int16)
        else:
            codes_t = torch.from_numpy(codes)[None]                             # (1, N)
            latent = self.models.gpt.latent(torch.from_numpy(spk_latent), torch.from_numpy(emovec),
                                            torch.from_numpy(text_ids)[None], codes_t)   # (1, N, D)
            lap("latent")
            mel_t = codes_to_mel(self.models, prompt, codes_t, latent, torch.from_numpy(noise),
                                 steps=decoder.steps, cfg_rate=decoder.cfg_rate)  # (1, 80, T_gen)
            mel = mel_t.numpy()
            lap("s2mel")
            pcm = to_pcm16(vocode(self.models, mel_t))
            lap("bigvgan")
        log.info("segment %d/%d: %d text tokens -> %d codes%s -> %.2f s of audio in %.2f s (%s)", index + 1,
                 len(prep.segments), text_ids.size, codes.size, "" if result.stopped else " (max)",
                 pcm.size / SAMPLE_RATE, time.perf_counter() - t0,
                 ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        return SegmentResult(index, text_ids, codes, result.stopped, mel, pcm, timings)

    def synthesize(self, request: SynthesisRequest, generation: GenerationConfig = GenerationConfig(),
                   decoder: DecoderSettings = DecoderSettings(), seed: int | None = None,
                   gpt_draws: DrawSource | None = None) -> SynthesisResult:
        """All segments joined with `interval_silence_ms` of silence between them (not after the last)."""
        prep = self.prepare(request, seed, gpt_draws)
        segments = [self._segment(i, prep, generation, decoder) for i in range(len(prep.segments))]
        silence = np.zeros(int(SAMPLE_RATE * request.interval_silence_ms / 1000), np.int16)
        parts: list[np.ndarray] = []
        for seg in segments:
            if parts:
                parts.append(silence)
            parts.append(seg.pcm)
        return SynthesisResult(np.concatenate(parts) if parts else np.zeros(0, np.int16), SAMPLE_RATE,
                               segments, prep.plan)
