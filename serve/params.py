"""One speech request as both front doors take it, checked before anything is queued.

The OpenAI fields (`model`, `input`, `voice`, `response_format`, `speed`, `stream`, `instructions`,
`stream_format`) plus IndexTTS2's own options as extra fields, named as vLLM-Omni names them where it has
them (`ref_audio`, `seed`, `temperature`, `top_p`, `top_k`, `max_new_tokens` is `max_mel_tokens` here, as
upstream's `infer`) and as upstream's `infer` arguments otherwise (`emo_vector`, `emo_alpha`, `emo_audio`,
`use_emo_text`, `emo_text`, `num_beams`, `max_mel_tokens`, `interval_silence_ms`,
`max_text_tokens_per_segment`, `quick_streaming_tokens`). Unknown fields are refused (a misspelt option
must not be silently ignored). Audio inside JSON is base64 (plain or a `data:` URI); its size is checked
before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import InputError
from runtime.frontend.audio import AudioBytes
from runtime.gpt.generate import GenerationConfig
from runtime.request import SynthesisRequest
from serve.config import MODEL_NAME, Limits
from serve.errors import TooLarge

RESPONSE_FORMATS = ("wav", "pcm", "flac")
STREAM_FORMATS = ("wav", "pcm")


class SpeechOptions(BaseModel):
    """IndexTTS2's options (both doors; the Triton models take them as one JSON string)."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random seed (default: one is drawn and "
                                                                   "returned in the X-Seed header)")
    temperature: float | None = Field(None, gt=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=10000)
    num_beams: int | None = Field(None, ge=1, le=16)
    do_sample: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    max_mel_tokens: int | None = Field(None, ge=1)
    emo_vector: list[float] | None = Field(None, min_length=8, max_length=8)
    emo_alpha: float = Field(1.0, ge=0, le=1)
    emo_voice: str | None = Field(None, max_length=128, description="a voice id whose audio gives the emotion")
    emo_audio: str | None = Field(None, description="emotion reference audio, base64")
    ref_audio: str | None = Field(None, description="speaker reference audio, base64 (instead of `voice`)")
    use_emo_text: bool = False
    emo_text: str | None = Field(None, max_length=4000)
    interval_silence_ms: int | None = Field(None, ge=0, le=10000)
    max_text_tokens_per_segment: int | None = Field(None, ge=1, le=600)
    quick_streaming_tokens: int | None = Field(None, ge=0, le=10000)
    lang: str | None = Field(None, max_length=16, description="IndexTTS-2.5: the text's language (zh, en, ja, es, "
                                                              "ar, ...; default: zh for CJK text, else en)")
    duration_factor: float | None = Field(None, ge=0.5, le=2.0, description="IndexTTS-2.5: speech length scale")


class SpeechBody(SpeechOptions):
    """`POST /v1/audio/speech`."""

    model: str
    input: str
    voice: str | None = Field(None, max_length=128)
    response_format: str = "wav"
    speed: float | None = None
    stream: bool = False
    stream_format: Literal["audio"] | None = None
    instructions: str | None = None


@dataclasses.dataclass(frozen=True)
class Speech:
    """A checked request, ready for the runtime (the references already resolved to bytes)."""

    request: SynthesisRequest
    generation: GenerationConfig
    seed: int


def check_body(body: SpeechBody, limits: Limits) -> None:
    """The OpenAI fields we cannot honour, each refused with what is supported."""
    if body.model != MODEL_NAME:
        raise InputError(f"model {body.model!r} is not served here; the model is {MODEL_NAME!r}")
    if body.response_format not in RESPONSE_FORMATS:
        raise InputError(f"response_format {body.response_format!r} is not supported; use one of "
                         f"{', '.join(RESPONSE_FORMATS)}")
    if body.stream and body.response_format not in STREAM_FORMATS:
        raise InputError(f"response_format {body.response_format!r} cannot be streamed; stream "
                         f"{' or '.join(STREAM_FORMATS)}")
    if body.speed is not None and body.speed != 1.0:
        raise InputError(f"speed {body.speed} is not supported: IndexTTS2 has no speed control (only 1.0)")
    if body.instructions:
        raise InputError("instructions are not supported; give the emotion with emo_text (and use_emo_text), "
                         "emo_vector or emo_audio")
    check_text(body.input, limits)
    if body.voice is None and body.ref_audio is None:
        raise InputError("voice is required (a voice id from GET /v1/audio/voices), or ref_audio")


def check_text(text: str, limits: Limits) -> None:
    if not text or not text.strip():
        raise InputError("input is empty: give the text to speak")
    if len(text) > limits.max_text_chars:
        raise TooLarge(f"input has {len(text)} characters, more than the limit max_text_chars = "
                       f"{limits.max_text_chars}")


def decode_base64_audio(value: str, field: str, limits: Limits) -> AudioBytes:
    """base64 (plain or `data:<type>;base64,...`) -> AudioBytes; the size is checked before decoding."""
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > limits.max_upload_bytes + 3:
        raise TooLarge(f"{field}: about {len(payload) // 4 * 3} bytes of audio, more than the limit "
                       f"max_upload_bytes = {limits.max_upload_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(f"{field}: not valid base64 ({err})") from err
    if len(data) > limits.max_upload_bytes:
        raise TooLarge(f"{field}: {len(data)} bytes of audio, more than the limit max_upload_bytes = "
                       f"{limits.max_upload_bytes}")
    return AudioBytes(data, f"{field} (uploaded)")


def to_speech(options: SpeechOptions, text: str, speaker: AudioBytes, emo_audio: AudioBytes | None,
              defaults: GenerationConfig, max_mel_tokens: int, streamed: bool, stream_quick_tokens: int) -> Speech:
    """The runtime's request, generation settings and seed (drawn when not given)."""
    given = {k: getattr(options, k) for k in ("temperature", "top_p", "top_k", "num_beams", "do_sample",
                                              "repetition_penalty", "max_mel_tokens")
             if getattr(options, k) is not None}
    if given.get("max_mel_tokens", 0) > max_mel_tokens:
        raise InputError(f"max_mel_tokens {given['max_mel_tokens']} is more than this model's {max_mel_tokens}")
    generation = dataclasses.replace(defaults, **given)
    optional = {k: getattr(options, k) for k in ("interval_silence_ms", "max_text_tokens_per_segment",
                                                 "quick_streaming_tokens", "lang", "duration_factor")
                if getattr(options, k) is not None}
    if streamed:
        optional.setdefault("quick_streaming_tokens", stream_quick_tokens)
    if options.emo_text is not None and not options.use_emo_text:
        raise InputError("emo_text is given but use_emo_text is false; set use_emo_text to use it")
    request = SynthesisRequest(
        text=text, speaker=speaker, emo_audio=emo_audio, emo_alpha=options.emo_alpha,
        emo_vector=tuple(options.emo_vector) if options.emo_vector is not None else None,
        use_emo_text=options.use_emo_text, emo_text=options.emo_text, **optional)
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    return Speech(request, generation, seed)
