"""The OpenAI-compatible HTTP API (FastAPI): speech, voices, health.

Routes: `POST /v1/audio/speech` (serve/params.py's fields; `stream: true` -> the audio as it is produced,
chunked transfer), `GET|POST /v1/audio/voices`, `DELETE /v1/audio/voices/{id}`, `GET /health` (the process
is up; never behind auth), `GET /ready` (the model is loaded). Errors have OpenAI's shape
(`{"error": {"message", "type", "code"}}`): 400 bad input (also wrong types, as FastAPI's 422 turned into
400 with each field named), 401 no or wrong token, 404 unknown voice id (as a resource), 411/413 uploads
without a declared length or beyond a limit, 429 at the request limit (Retry-After), 503 retryable
failures (an unusable emotion-model answer), 500 anything else — the request fails alone, the server
keeps serving.

The API runs the runtime in this process rather than calling Triton over gRPC: a speech request would
otherwise cross a socket twice and be serialized (text in, PCM out) for nothing, since both doors drive
the same Synthesizer here; see README "Serving" for the choice.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from runtime.errors import Cancelled, InputError
from serve import audio_out
from serve.auth import OPEN_PATHS, authorized
from serve.config import MODEL_NAME
from serve.errors import NotFound
from serve.params import SpeechBody, check_body
from serve.service import AudioStream, TtsService
from serve.status import status_of

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MULTIPART_OVERHEAD = 64 << 10      # the form's boundaries and text fields beside the audio


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def error_response(err: BaseException) -> JSONResponse:
    """The status and message of a failure (serve/status.py; the request fails alone)."""
    status, message = status_of(err)
    kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    retry = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return _error(status, message, kind, retry)


def create_app(service: TtsService, token: str | None = None) -> FastAPI:
    app = FastAPI(title="IndexTTS2", docs_url=None, redoc_url=None, openapi_url=None)
    limits = service.limits
    max_body = (limits.max_upload_bytes * 4) // 3 * 2 + limits.max_text_chars * 4 + MULTIPART_OVERHEAD

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None and request.url.path not in OPEN_PATHS and \
                not authorized(request.headers.get("authorization"), token):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                          "authentication_error", {"WWW-Authenticate": "Bearer"})
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "send the request body with a Content-Length", "invalid_request_error")
            if not length.isdigit() or int(length) > max_body:
                return _error(413, f"the request body has {length} bytes, more than this server takes ({max_body}:"
                                   f" max_upload_bytes = {limits.max_upload_bytes} as base64, and the text)",
                              "invalid_request_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(400, "; ".join(parts), "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if service.ready:
            return JSONResponse({"status": "ready", "model": MODEL_NAME, "backend": service.synth.backend})
        return _error(503, "the model is not loaded", "server_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "indextts2-engines"}]}

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechBody) -> Response:
        try:
            check_body(body, limits)
            request = await run_in_threadpool(service.speech, body, body.input, body.voice, body.stream)
        except Exception as err:  # noqa: BLE001 — every failure is this request's answer
            return error_response(err)
        headers = {"X-Seed": str(request.seed)}
        media = audio_out.CONTENT_TYPES[body.response_format]
        if not body.stream:
            try:
                pcm = await run_in_threadpool(service.synthesize, request)
                data = audio_out.encode(pcm, service.sample_rate, body.response_format)
            except Exception as err:  # noqa: BLE001
                return error_response(err)
            return Response(data, media_type=media, headers=headers)
        try:
            stream = await run_in_threadpool(service.stream, request)
        except Exception as err:  # noqa: BLE001 — refused before any audio
            return error_response(err)
        state = {"completed": False}
        # the background task runs when the body ends AND when the client goes away mid-body (then the body's
        # generator may be left suspended at a yield, its `finally` never run): it frees the request either way
        return StreamingResponse(_stream_body(stream, body.response_format, service.sample_rate, state),
                                 media_type=media, headers=headers,
                                 background=BackgroundTask(lambda: stream.finish(state["completed"])))

    @app.get("/v1/audio/voices")
    async def voices() -> dict:
        return {"object": "list", "data": [v.public() for v in service.voices.list()]}

    @app.post("/v1/audio/voices")
    async def add_voice(request: Request) -> Response:
        try:
            async with request.form(max_files=1, max_fields=2) as form:
                audio, name = form.get("audio"), form.get("name") or ""
                if audio is None or isinstance(audio, str):
                    raise InputError("the form needs a file field `audio` (the reference recording) and "
                                     "optionally a text field `name`")
                if not isinstance(name, str):
                    raise InputError("the form field `name` must be text")
                data = await audio.read(limits.max_upload_bytes + 1)
            voice, created = await run_in_threadpool(service.voices.add, data, name)
        except Exception as err:  # noqa: BLE001
            return error_response(err)
        return JSONResponse({**voice.public(), "created": created}, status_code=201 if created else 200)

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str) -> Response:
        try:
            voice = service.voices.remove(voice_id)
        except NotFound as err:
            return _error(404, str(err), "invalid_request_error")
        return JSONResponse({"id": voice.id, "deleted": True})

    return app


async def _stream_body(stream: AudioStream, fmt: str, sample_rate: int, state: dict) -> AsyncIterator[bytes]:
    """The chunks as they come; a failure after the first bytes ends the body early (the status is already
    sent) and is logged; a client gone is handled by the response's background task (see `speech`)."""
    try:
        if fmt == "wav":
            yield audio_out.wav_header(sample_rate, None)
        while True:
            chunk = await anyio.to_thread.run_sync(stream.next_chunk)
            if chunk is None:
                break
            yield audio_out.pcm_bytes(chunk.pcm)
        state["completed"] = True
    except Cancelled:
        log.info("stream: the request was cancelled")
    except Exception as err:  # noqa: BLE001 — the status is sent; end the body and say why in the log
        log.warning("stream: ended early: %s", err)
    finally:
        stream.finish(state["completed"])
