"""Triton Inference Server through PyTriton: the models `indextts2` (one request -> its whole audio) and
`indextts2_stream` (decoupled: one request -> its audio chunks as they are ready; gRPC streaming).

Both models, no batch axis (Triton hands each request over as it comes; the runtime's scheduler batches
the graph work of all requests, whichever door they came through):

| input | type | shape | |
|---|---|---|---|
| `text` | BYTES | [1] | UTF-8 text |
| `voice` | BYTES | [1] | optional: a voice id (or unique name) of the registry |
| `reference_audio` | BYTES | [1] | optional: the speaker recording's bytes (WAV/FLAC/OGG), instead of `voice` |
| `options` | BYTES | [1] | optional: JSON of the IndexTTS options (serve/params.py `SpeechOptions`: seed, temperature, top_p, top_k, num_beams, max_mel_tokens, emo_vector, emo_alpha, emo_voice, emo_audio (base64), use_emo_text, emo_text, ...) |

| output | type | shape | |
|---|---|---|---|
| `audio` | INT16 | [-1] | 22.05 kHz mono samples (a chunk of them for `indextts2_stream`; may be empty) |
| `sample_rate` | INT32 | [1] | |
| `status` | INT32 | [1] | 200, or the status the HTTP API gives the same failure (400, 413, 429, 503, 500) |
| `error` | BYTES | [1] | "" or what went wrong |

Why failures are outputs and not Triton errors: PyTriton turns an exception raised by a model into an error
whose message is the whole Python traceback, and a client must get the problem named, not a traceback.
So a request that fails gets one response (the last of its stream) with `status` and `error` set and no
audio; the model keeps serving. A stream that fails after some audio ends the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.frontend.audio import AudioBytes
from serve.config import MODEL_NAME, STREAM_MODEL_NAME, ServeConfig
from serve.errors import TooLarge
from serve.launcher import triton_environment
from serve.params import Speech, SpeechOptions, check_text
from serve.service import AudioStream, TtsService
from serve.status import status_of

log = logging.getLogger(__name__)


def _text(request: Any, name: str) -> str | None:
    if name not in request:
        return None
    value = np.asarray(request[name]).reshape(-1)
    if value.size != 1:
        raise InputError(f"input {name!r} must hold one element, got {value.size}")
    item = value[0]
    try:
        return item.decode("utf-8") if isinstance(item, (bytes, np.bytes_)) else str(item)
    except UnicodeDecodeError as err:
        raise InputError(f"input {name!r} is not UTF-8 text ({err})") from err


def parse(service: TtsService, request: Any, streamed: bool) -> Speech:
    """A Triton request -> the checked Speech (the same checks as the HTTP API)."""
    text = _text(request, "text")
    if text is None:
        raise InputError("input 'text' is required")
    check_text(text, service.limits)
    raw = _text(request, "options") or "{}"
    try:
        options = SpeechOptions.model_validate(json.loads(raw))
    except json.JSONDecodeError as err:
        raise InputError(f"input 'options' is not JSON ({err})") from err
    except ValueError as err:                    # pydantic's ValidationError names each field
        raise InputError(f"input 'options': {err}") from err
    voice = _text(request, "voice")
    if "reference_audio" in request:
        data = np.asarray(request["reference_audio"]).reshape(-1)
        if data.size != 1:
            raise InputError("input 'reference_audio' must hold one element (the file's bytes)")
        audio = bytes(data[0])
        if len(audio) > service.limits.max_upload_bytes:
            raise TooLarge(f"reference_audio has {len(audio)} bytes, more than the limit max_upload_bytes = "
                           f"{service.limits.max_upload_bytes}")
        voice_audio: AudioBytes | None = AudioBytes(audio, "reference_audio (uploaded)")
    else:
        voice_audio = None
        if voice is None:
            raise InputError("give input 'voice' (a voice id) or 'reference_audio'")
    return service.speech(options, text, voice, streamed, speaker=voice_audio)


def response(pcm: np.ndarray | None, sample_rate: int, status: int = 200, error: str = "") -> dict[str, np.ndarray]:
    return {"audio": np.asarray(pcm if pcm is not None else np.zeros(0, np.int16), np.int16),
            "sample_rate": np.array([sample_rate], np.int32), "status": np.array([status], np.int32),
            "error": np.array([error.encode("utf-8")], dtype=np.object_)}


def failure(err: BaseException, sample_rate: int) -> dict[str, np.ndarray]:
    status, message = status_of(err)
    return response(None, sample_rate, status, message)


class Models:
    """The two models' inference callables (async generators: blocking work runs in threads, so one model
    instance serves many requests at once)."""

    def __init__(self, service: TtsService) -> None:
        self.service = service

    async def whole(self, requests: list) -> Any:
        loop = asyncio.get_running_loop()
        yield list(await asyncio.gather(*(loop.run_in_executor(None, self._whole, r) for r in requests)))

    def _whole(self, request: Any) -> dict[str, np.ndarray]:
        sr = self.service.sample_rate
        try:
            return response(self.service.synthesize(parse(self.service, request, False)), sr)
        except Exception as err:  # noqa: BLE001 — this request's answer
            return failure(err, sr)

    async def stream(self, requests: list) -> Any:
        """Every yield answers each request: its next chunk, or 0 samples while it has none (or has ended)."""
        loop = asyncio.get_running_loop()
        sr = self.service.sample_rate
        streams: list[AudioStream | None] = []
        pending: list[dict | None] = []
        for r in requests:
            try:
                streams.append(await loop.run_in_executor(None, self._open, r))
                pending.append(None)
            except Exception as err:  # noqa: BLE001 — refused before any audio
                streams.append(None)
                pending.append(failure(err, sr))
        try:
            if any(p is not None for p in pending):
                yield [p if p is not None else response(None, sr) for p in pending]
            live = {i for i, s in enumerate(streams) if s is not None}
            while live:
                out = [response(None, sr) for _ in requests]
                news = False
                nexts = {i: loop.run_in_executor(None, streams[i].next_chunk) for i in live}
                for i, fut in nexts.items():
                    try:
                        chunk = await fut
                    except Exception as err:  # noqa: BLE001 — the stream ends with its failure
                        out[i], news = failure(err, sr), True
                        live.discard(i)
                        continue
                    if chunk is None:
                        live.discard(i)
                    else:
                        out[i], news = response(chunk.pcm, sr), True
                if news:
                    yield out
        finally:
            for s in streams:
                if s is not None:
                    s.cancel()
                    await loop.run_in_executor(None, s.close)

    def _open(self, request: Any) -> AudioStream:
        return self.service.stream(parse(self.service, request, True))


def bind(triton: Any, service: TtsService) -> Models:
    from pytriton.model_config import ModelConfig, Tensor

    models = Models(service)
    inputs = [Tensor(name="text", dtype=bytes, shape=(1,)),
              Tensor(name="voice", dtype=bytes, shape=(1,), optional=True),
              Tensor(name="reference_audio", dtype=bytes, shape=(1,), optional=True),
              Tensor(name="options", dtype=bytes, shape=(1,), optional=True)]
    outputs = [Tensor(name="audio", dtype=np.int16, shape=(-1,)),
               Tensor(name="sample_rate", dtype=np.int32, shape=(1,)),
               Tensor(name="status", dtype=np.int32, shape=(1,)),
               Tensor(name="error", dtype=bytes, shape=(1,))]
    triton.bind(model_name=MODEL_NAME, infer_func=models.whole, inputs=inputs, outputs=outputs,
                config=ModelConfig(batching=False), strict=True)
    triton.bind(model_name=STREAM_MODEL_NAME, infer_func=models.stream, inputs=inputs, outputs=outputs,
                config=ModelConfig(batching=False, decoupled=True), strict=True)
    return models


def start_triton(service: TtsService, config: ServeConfig) -> Any:
    """Triton (the server binary of the nvidia-pytriton wheel) with both models, running in the background;
    `.stop()` ends it."""
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as err:
        raise ImportError("Triton needs nvidia-pytriton (pip install -e '.[serve]'); or start with --no-triton "
                          f"for the HTTP API alone ({err})") from err
    triton_environment()
    triton = Triton(config=TritonConfig(http_address=config.host, http_port=config.triton_http_port,
                                        grpc_address=config.host, grpc_port=config.triton_grpc_port,
                                        metrics_port=config.triton_metrics_port, log_verbose=0))
    try:
        bind(triton, service)
        triton.run()
    except BaseException:
        triton.stop()
        raise
    log.info("Triton: models %s and %s on %s (HTTP %d, gRPC %d, metrics %d)", MODEL_NAME, STREAM_MODEL_NAME,
             config.host, config.triton_http_port, config.triton_grpc_port, config.triton_metrics_port)
    return triton
