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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from runtime.caches import LRU, audio_key
from runtime.emotion import EmotionPlan, emotion_plan, final_emovec
from runtime.frontend.text.normalize import TextNormalizer
from runtime.cfm import mel_length_25
from runtime.errors import InputError
from runtime.frontend.text.tokenizer import TextTokenizer, text_segments
from runtime.frontend.text25.bpe import BpeTokenizer
from runtime.frontend.text25.frontend import TextFrontend25, request_segments
from runtime.gpt.codes import segment_codes
from runtime.gpt.generate import GenerationConfig
from runtime.gpt.sampling import DrawSource
from runtime.randomness import RandomStreams
from runtime.request import (  # noqa: F401
    DecoderSettings,
    SegmentResult,
    SynthesisRequest,
    SynthesisResult,
    join_segments,
)
from runtime.timing import Laps, log_segment
from runtime.wav import to_pcm16

from .eager import (
    EagerModels,
    SpeakerPrompt,
    codes_to_mel,
    emotion_features,
    mel_length,
    prepare_speaker,
    s_infer_to_mel,
    vocode,
)
from .emotion_matrices import load_emotion_matrices
from .gpt_executor import EagerGptSteps

log = logging.getLogger(__name__)

SAMPLE_RATE = 22050


@dataclass
class PreparedRequest:
    """A request made ready for the per-segment loop."""

    request: SynthesisRequest
    segments: list[list[int]]
    plan: EmotionPlan
    streams: RandomStreams
    prompt: SpeakerPrompt
    condition: dict[str, np.ndarray]   # the GPT prefill's speaker (/ language) inputs, as the runtime's
    emovec: np.ndarray          # (1, D)


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
        self.version = self.models.version
        if self.version == "2.0":
            self.tokenizer: TextTokenizer | TextFrontend25 = TextTokenizer(layout.require("bpe"),
                                                                          normalizer=text_normalizer)
        else:
            self.tokenizer = TextFrontend25(BpeTokenizer(layout.require("tiktoken")), text_normalizer,
                                            cfg.gpt.max_text_tokens)
        self.matrices = load_emotion_matrices(layout.require("feat1"), layout.require("feat2"), cfg.emo_num,
                                              model_dim=cfg.gpt.model_dim)
        self.gpt_steps = EagerGptSteps(self.models.gpt)
        self._speakers: LRU[SpeakerPrompt] = LRU(cache_size)
        self._emotions: LRU[torch.Tensor] = LRU(cache_size)
        self._qwen = None
        self._emo_text_max_new_tokens = emo_text_max_new_tokens

    # -- references -------------------------------------------------------------------------------
    def speaker(self, path: str | Path) -> SpeakerPrompt:
        return self._speakers.get(audio_key(path, "speaker"), lambda: prepare_speaker(self.models, path))

    def emotion_embedding(self, path: str | Path) -> torch.Tensor:
        return self._emotions.get(audio_key(path, "emotion"), lambda: emotion_features(self.models, path))

    def _text_to_emotion(self, text: str) -> dict[str, float]:
        if self._qwen is None:
            from runtime.emotion.llm import QwenEmotion

            self._qwen = QwenEmotion(self.models.layout.main_file("qwen_emo"),
                                     max_new_tokens=self._emo_text_max_new_tokens)
        return self._qwen.inference(text)

    # -- conditioning -----------------------------------------------------------------------------
    @torch.inference_mode()
    def conditioning(self, request: SynthesisRequest, prompt: SpeakerPrompt, plan: EmotionPlan,
                     streams: RandomStreams, lang_id: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(the GPT condition: 2.0 {spk_latent (1, 32, D)}, 2.5 {style (1, 192), lang_id (1,)}; emovec (1, D))
        for this request, as upstream computes them per segment."""
        gpt = self.models.gpt
        spk = prompt.spk_cond_emb                                               # (1, T, F)
        if lang_id is None:
            condition = {"spk_latent": gpt.speaker_conditioner(spk, torch.tensor([spk.shape[1]])).numpy()}
        else:
            condition = {"style": prompt.style.numpy(), "lang_id": np.array([lang_id], np.int64)}
        emo = self.emotion_embedding(plan.emo_audio)                            # (1, T_e, F)
        base = gpt.emotion_conditioner(spk, torch.tensor([spk.shape[1]])).numpy()  # (1, D)
        target = gpt.emotion_conditioner(emo, torch.tensor([emo.shape[1]])).numpy()
        emovec = final_emovec(self.matrices, plan, base, target, prompt.style.numpy(), request.use_random,
                              streams.choice)                                   # (1, D)
        return condition, emovec

    def segments(self, request: SynthesisRequest) -> list[list[int]]:
        return self._text(request)[0]

    def _text(self, request: SynthesisRequest) -> tuple[list[list[int]], int | None]:
        """(per-segment ids, the 2.5 lang_id or None), as the runtime's Synthesizer._text."""
        if self.version == "2.0":
            if request.lang is not None or request.duration_factor != 1.0:
                raise InputError("lang and duration_factor are IndexTTS-2.5 inputs; this checkpoint is 2.0")
            return text_segments(self.tokenizer, request), None
        if not isinstance(request.text, str) or not request.text.strip():
            raise InputError("the text to synthesize is empty")
        return request_segments(self.tokenizer, request.text, request.lang, request.max_text_tokens_per_segment,
                                request.quick_streaming_tokens)

    def _frames(self, request: SynthesisRequest, n_codes: int) -> int:
        return mel_length(n_codes) if self.version == "2.0" else mel_length_25(2 * n_codes, request.duration_factor)

    # -- synthesis --------------------------------------------------------------------------------
    def prepare(self, request: SynthesisRequest, seed: int | None = None,
                gpt_draws: DrawSource | None = None) -> PreparedRequest:
        """Everything before the per-segment loop: segments, emotion plan, randomness, conditioning."""
        segments, lang_id = self._text(request)
        plan = emotion_plan(request, self._text_to_emotion)
        streams = RandomStreams.from_seed(seed, gpt_draws)
        t0 = time.perf_counter()
        prompt = self.speaker(request.speaker)
        t1 = time.perf_counter()
        condition, emovec = self.conditioning(request, prompt, plan, streams, lang_id)
        log.info("%d segment(s); emotion from %s; speaker %.2f s, conditioning %.2f s", len(segments),
                 plan.source, t1 - t0, time.perf_counter() - t1)
        return PreparedRequest(request, segments, plan, streams, prompt, condition, emovec)

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
        laps = Laps()
        prompt, streams = prep.prompt, prep.streams
        seg = segment_codes(self.gpt_steps, prep.condition, prep.emovec, prep.segments[index], generation,
                            streams.gpt, index)
        codes = seg.codes                                                       # (N,)
        laps.lap("gpt")
        t_ref = prompt.ref_mel.shape[-1]
        frames = self._frames(prep.request, codes.size)
        noise = streams.cfm_noise(t_ref + frames, decoder.temperature)
        if codes.size == 0:
            mel = np.zeros((1, 80, 0), np.float32)
            pcm = np.zeros(0, np.int16)
        else:
            codes_t = torch.from_numpy(codes)[None]                             # (1, N)
            if self.version == "2.0":
                latent = self.models.gpt.latent(torch.from_numpy(prep.condition["spk_latent"]),
                                                torch.from_numpy(prep.emovec), torch.from_numpy(seg.text_ids)[None],
                                                codes_t)                        # (1, N, D)
                laps.lap("latent")
                mel_t = codes_to_mel(self.models, prompt, codes_t, latent, torch.from_numpy(noise),
                                     steps=decoder.steps, cfg_rate=decoder.cfg_rate)  # (1, 80, T_gen)
            else:                                                               # 2.5: the codec decoder
                s_infer = self.models.semantic_decoder(codes_t)                 # (1, 2N, D)
                laps.lap("latent")
                mel_t = s_infer_to_mel(self.models, prompt, s_infer, frames, torch.from_numpy(noise),
                                       steps=decoder.steps, cfg_rate=decoder.cfg_rate)
            mel = mel_t.numpy()
            laps.lap("s2mel")
            pcm = to_pcm16(vocode(self.models, mel_t))
            laps.lap("bigvgan")
        log_segment(index, len(prep.segments), seg, pcm.size, SAMPLE_RATE, laps)
        return SegmentResult(index, seg.text_ids, codes, seg.result.stopped, mel, pcm, laps.timings,
                             len(prep.segments))

    def synthesize(self, request: SynthesisRequest, generation: GenerationConfig = GenerationConfig(),
                   decoder: DecoderSettings = DecoderSettings(), seed: int | None = None,
                   gpt_draws: DrawSource | None = None) -> SynthesisResult:
        """All segments joined with `interval_silence_ms` of silence between them (not after the last)."""
        prep = self.prepare(request, seed, gpt_draws)
        segments = [self._segment(i, prep, generation, decoder) for i in range(len(prep.segments))]
        return SynthesisResult(join_segments(segments, SAMPLE_RATE, request.interval_silence_ms), SAMPLE_RATE,
                               segments, prep.plan)
