"""Serving an IndexTTS-2.5 export: the OpenAI-compatible HTTP API (127.0.0.1, tiny 2.5 export, ONNX Runtime CPU)
takes the 2.5 fields `lang` and `duration_factor` and answers the Synthesizer's audio for the same seed, whole
and streamed; an out-of-range duration factor is a 4xx naming it and the server keeps serving."""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest

from runtime.request import SynthesisRequest
from serve.config import Limits, ServeConfig
from serve.http_api import create_app
from serve.service import TtsService
from tests.serve.server import RunningServer

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai")

TOKEN = "test-token-0123456789abcdef"
TEXT = "Hello world. This is a test!"
FAST = {"max_mel_tokens": 16, "seed": 5}


@pytest.fixture(scope="module")
def served25(tiny25_export, tiny25_ckpt, tmp_path_factory):
    config = ServeConfig(engines=tiny25_export[0], backend="ort-cpu", triton=False,
                         voices_dir=tmp_path_factory.mktemp("voices25"),
                         voices=(("default", tiny25_ckpt / "examples/speaker.wav"),),
                         limits=Limits(max_text_chars=300, max_upload_bytes=1 << 20, max_audio_seconds=20,
                                       max_concurrent=2))
    service = TtsService.open(config)
    server = RunningServer(create_app(service, TOKEN))
    yield server, service
    server.stop()
    service.close()


def _alone(service, ckpt, **fields) -> np.ndarray:
    request = SynthesisRequest(text=TEXT, speaker=ckpt / "examples/speaker.wav", **fields)
    generation = dataclasses.replace(service.synth.generation_defaults, max_mel_tokens=FAST["max_mel_tokens"])
    return service.synth.synthesize(request, generation, seed=FAST["seed"]).pcm


def test_lang_and_duration_factor_through_the_http_api(served25, tiny25_ckpt) -> None:
    server, service = served25
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, timeout=300, max_retries=0)
    pcm = {}
    for factor in (1.0, 1.5):
        body = {**FAST, "lang": "en", "duration_factor": factor}
        got = client.audio.speech.create(model="indextts2", voice="default", input=TEXT, response_format="pcm",
                                         extra_body=body)
        pcm[factor] = np.frombuffer(got.content, "<i2")
        want = _alone(service, tiny25_ckpt, lang="en", duration_factor=factor)
        assert pcm[factor].shape == want.shape and np.abs(pcm[factor].astype(np.int32) - want).max() <= 1, factor
    assert pcm[1.5].size / pcm[1.0].size == pytest.approx(1.5, abs=0.03)
    with client.audio.speech.with_streaming_response.create(
            model="indextts2", voice="default", input=TEXT, response_format="pcm",
            extra_body={**FAST, "lang": "en", "duration_factor": 1.5, "stream": True}) as response:
        streamed = np.frombuffer(b"".join(response.iter_bytes()), "<i2")
    want = _alone(service, tiny25_ckpt, lang="en", duration_factor=1.5, quick_streaming_tokens=120)
    assert streamed.shape == want.shape and np.abs(streamed.astype(np.int32) - want).max() <= 1

    with httpx.Client(base_url=server.url, timeout=300, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        r = http.post("/v1/audio/speech", json={"model": "indextts2", "voice": "default", "input": TEXT,
                                                "duration_factor": 3.0, **FAST})
        assert r.status_code in (400, 422) and "duration_factor" in r.text, r.text
    again = client.audio.speech.create(model="indextts2", voice="default", input="Still here.", response_format="pcm",
                                       extra_body={"max_mel_tokens": 8, "seed": 1, "lang": "en"})
    assert len(again.content) > 0
