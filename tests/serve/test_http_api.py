"""The OpenAI-compatible HTTP API on a real server (127.0.0.1, tiny export, ONNX Runtime CPU), driven by the
official `openai` SDK and by httpx: the audio is Synthesizer.synthesize's for the same seed; voices are
registered, listed, used and deleted; bad input through this door is a 4xx naming the problem, and the
server keeps serving the next request."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from runtime.request import SynthesisRequest
from serve.config import Limits, ServeConfig
from serve.http_api import create_app
from serve.service import TtsService
from tests.serve.server import RunningServer

openai = pytest.importorskip("openai")

TOKEN = "test-token-0123456789abcdef"
TEXT = "Hello world. This is a test!"
FAST = {"max_mel_tokens": 20, "seed": 5}             # short generations: the tiny GPT rarely stops


@pytest.fixture(scope="module")
def served(tiny_export, tiny_ckpt, tmp_path_factory):
    voices_dir = tmp_path_factory.mktemp("voices")
    config = ServeConfig(engines=tiny_export[0], backend="ort-cpu", triton=False, voices_dir=voices_dir,
                         voices=(("default", tiny_ckpt / "examples/speaker.wav"),),
                         limits=Limits(max_text_chars=300, max_upload_bytes=1 << 20, max_audio_seconds=20,
                                       max_concurrent=2))
    service = TtsService.open(config)
    server = RunningServer(create_app(service, TOKEN))
    yield server, service, voices_dir
    server.stop()
    service.close()


def _client(server, token=TOKEN):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=token, timeout=300, max_retries=0)


def _http(server, token=TOKEN):
    return httpx.Client(base_url=server.url, timeout=300,
                        headers={"Authorization": f"Bearer {token}"} if token else {})


def _wav_pcm(data: bytes) -> np.ndarray:
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    return np.frombuffer(data[44:], "<i2")


def _alone(service, ckpt, **kw) -> np.ndarray:
    fields = {k: kw.pop(k) for k in ("quick_streaming_tokens", "max_text_tokens_per_segment") if k in kw}
    request = SynthesisRequest(text=kw.pop("text", TEXT), speaker=ckpt / "examples/speaker.wav", **fields)
    generation = dataclasses.replace(service.synth.generation_defaults, max_mel_tokens=kw.pop("max_mel_tokens"))
    return service.synth.synthesize(request, generation, seed=kw.pop("seed")).pcm


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: {got.shape} vs {want.shape}"
    assert np.abs(got.astype(np.int32) - want).max(initial=0) <= 1, f"{what}: more than 1 LSB apart"


def _serves(server) -> None:
    """The server answers a normal request after whatever came before."""
    audio = _client(server).audio.speech.create(model="indextts2", voice="default", input="Still here.",
                                                extra_body={"max_mel_tokens": 8, "seed": 1})
    assert len(_wav_pcm(audio.content)) > 0


def test_the_sdk_gets_the_synthesizers_audio_whole_and_streamed(served, tiny_ckpt) -> None:
    server, service, _ = served
    client = _client(server)
    want = _alone(service, tiny_ckpt, **FAST)
    audio = client.audio.speech.create(model="indextts2", voice="default", input=TEXT, response_format="wav",
                                       extra_body=FAST)
    _same(_wav_pcm(audio.content), want, "wav")
    assert audio.response.headers["x-seed"] == "5"
    pcm = client.audio.speech.create(model="indextts2", voice="default", input=TEXT, response_format="pcm",
                                     extra_body=FAST)
    _same(np.frombuffer(pcm.content, "<i2"), want, "pcm")
    flac = client.audio.speech.create(model="indextts2", voice="default", input=TEXT, response_format="flac",
                                      extra_body=FAST)
    data, rate = sf.read(io.BytesIO(flac.content), dtype="int16")
    assert rate == service.sample_rate
    _same(data, want, "flac")
    # streamed: chunks as produced, the default quick_streaming_tokens of a stream (120) in the request
    streamed_want = _alone(service, tiny_ckpt, quick_streaming_tokens=120, **FAST)
    with client.audio.speech.with_streaming_response.create(
            model="indextts2", voice="default", input=TEXT, response_format="wav",
            extra_body={**FAST, "stream": True}) as response:
        parts = list(response.iter_bytes())
    body = b"".join(parts)
    assert struct.unpack("<I", body[4:8])[0] == 0xFFFFFFFF            # a WAV of unknown length
    _same(_wav_pcm(body), streamed_want, "streamed wav")


def test_voices_are_registered_used_listed_and_deleted(served, tiny_ckpt) -> None:
    server, service, voices_dir = served
    http = _http(server)
    data = (tiny_ckpt / "examples/emotion.wav").read_bytes()
    first = http.post("/v1/audio/voices", files={"audio": ("x.wav", data, "audio/wav")}, data={"name": "alice"})
    assert first.status_code == 201, first.text
    vid = first.json()["id"]
    assert vid.startswith("voice-") and first.json()["created"] is True
    again = http.post("/v1/audio/voices", files={"audio": ("y.wav", data, "audio/wav")}, data={"name": "bob"})
    assert again.status_code == 200 and again.json()["id"] == vid and again.json()["created"] is False
    listed = http.get("/v1/audio/voices").json()["data"]
    assert {v["id"] for v in listed} >= {vid} and all("path" not in json.dumps(v) for v in listed)
    assert sorted(p.name for p in voices_dir.iterdir()) == sorted(
        [f"{v['id']}.audio" for v in listed] + [f"{v['id']}.json" for v in listed])   # nothing else left
    audio = _client(server).audio.speech.create(model="indextts2", voice=vid, input=TEXT, extra_body=FAST)
    request = SynthesisRequest(text=TEXT, speaker=tiny_ckpt / "examples/emotion.wav")
    generation = dataclasses.replace(service.synth.generation_defaults, max_mel_tokens=20)
    _same(_wav_pcm(audio.content), service.synth.synthesize(request, generation, seed=5).pcm, "registered voice")
    # emotion from a registered voice, by name
    by_name = _client(server).audio.speech.create(model="indextts2", voice="default", input=TEXT,
                                                  extra_body={**FAST, "emo_voice": "alice", "emo_alpha": 0.5})
    assert len(_wav_pcm(by_name.content)) > 0
    assert http.delete(f"/v1/audio/voices/{vid}").json() == {"id": vid, "deleted": True}
    gone = http.post("/v1/audio/speech", json={"model": "indextts2", "voice": vid, "input": TEXT, **FAST})
    assert gone.status_code == 400 and "not found" in gone.json()["error"]["message"]
    assert http.delete(f"/v1/audio/voices/{vid}").status_code == 404
    assert not any(p.name.startswith(vid) for p in voices_dir.iterdir())


def test_a_restart_keeps_the_voices(served, tiny_ckpt) -> None:
    from serve.voices import VoiceRegistry

    server, service, voices_dir = served
    http = _http(server)
    made = http.post("/v1/audio/voices", files={"audio": ("k.wav", (tiny_ckpt / "examples/speaker.wav").read_bytes(),
                                                          "audio/wav")}, data={"name": "kept"})
    assert made.status_code in (200, 201), made.text
    again = VoiceRegistry(service.limits, voices_dir)                 # what a new process reads back
    assert again.get(made.json()["id"]).name in ("kept", "default")
    assert again.audio(again.get(made.json()["id"])).data == (tiny_ckpt / "examples/speaker.wav").read_bytes()


def _tone(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(out, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.mark.parametrize("case, status, message", [
    ("empty_text", 400, "input is empty"),
    ("long_text", 413, "max_text_chars"),
    ("unknown_voice", 400, "not found"),
    ("wrong_type", 400, "temperature"),
    ("unknown_field", 400, "speed_up"),
    ("mp3", 400, "wav, pcm, flac"),
    ("speed", 400, "speed"),
    ("wrong_model", 400, "indextts2"),
    ("bad_emo_vector", 400, "emo_vector"),
    ("emo_alpha", 400, "emo_alpha"),
    ("bad_base64", 400, "base64"),
    ("garbage_upload", 400, "cannot decode"),
    ("oversized_upload", 413, "max_upload_bytes"),
    ("long_upload", 413, "max_audio_seconds"),
    ("silent_upload", 400, "silent"),
    ("no_audio_field", 400, "audio"),
    ("no_token", 401, "bearer token"),
    ("bad_token", 401, "bearer token"),
])
def test_bad_input_is_a_4xx_naming_it_and_the_server_keeps_serving(served, case, status, message) -> None:
    server, _, _ = served
    http = _http(server, token=None if case == "no_token" else "wrong-token-xxxxxxxx" if case == "bad_token"
                 else TOKEN)
    body = {"model": "indextts2", "voice": "default", "input": TEXT, **FAST}
    if case == "empty_text":
        body["input"] = "   "
    elif case == "long_text":
        body["input"] = "a" * 301
    elif case == "unknown_voice":
        body["voice"] = "voice-000000000000000000000000"
    elif case == "wrong_type":
        body["temperature"] = "hot"
    elif case == "unknown_field":
        body["speed_up"] = 2
    elif case == "mp3":
        body["response_format"] = "mp3"
    elif case == "speed":
        body["speed"] = 1.5
    elif case == "wrong_model":
        body["model"] = "tts-1"
    elif case == "bad_emo_vector":
        body["emo_vector"] = [0.1, 0.2]
    elif case == "emo_alpha":
        body["emo_alpha"] = 1e9
    elif case == "bad_base64":
        body["emo_audio"] = "not base64 at all!!"
    uploads = {"garbage_upload": b"this is not audio" * 10, "oversized_upload": b"\0" * ((1 << 20) + 4096),
               "long_upload": _tone(25.0), "silent_upload": _silent()}
    if case in uploads:
        r = http.post("/v1/audio/voices", files={"audio": ("u.wav", uploads[case], "audio/wav")}, data={"name": "u"})
    elif case == "no_audio_field":
        r = http.post("/v1/audio/voices", data={"name": "u"}, files={"other": ("u.txt", b"x", "text/plain")})
    else:
        r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and "Traceback" not in r.text, error
    _serves(server)


def _silent(rate: int = 16000) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(rate, np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def test_health_is_open_and_the_rest_needs_the_token(served) -> None:
    server, _, _ = served
    anon = _http(server, token=None)
    assert anon.get("/health").json() == {"status": "ok"}
    assert anon.get("/ready").status_code == 401 and anon.get("/v1/audio/voices").status_code == 401
    assert _http(server).get("/ready").json()["status"] == "ready"
    with pytest.raises(openai.AuthenticationError):
        _client(server, token="nope-nope-nope-nope").audio.speech.create(model="indextts2", voice="default", input=TEXT)


def test_beyond_the_request_limit_is_429_and_a_client_gone_mid_stream_frees_its_slot(served) -> None:
    server, service, _ = served
    body = {"model": "indextts2", "voice": "default", "input": TEXT, "stream": True, "max_mel_tokens": 60, "seed": 2}
    clients = [_http(server) for _ in range(3)]
    streams = []
    try:
        for c in clients[:2]:                                   # max_concurrent = 2: both slots held
            s = c.stream("POST", "/v1/audio/speech", json=body)
            r = s.__enter__()
            assert r.status_code == 200
            streams.append((s, r))
        refused = clients[2].post("/v1/audio/speech", json={**body, "stream": False})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "max_concurrent" in refused.json()["error"]["message"]
        first = next(streams[0][1].iter_raw())                  # read a little, then go away
        assert first[:4] == b"RIFF"
    finally:
        for s, r in streams:
            r.close()
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
    deadline = time.monotonic() + 120
    while service.slots.in_use and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.slots.in_use == 0, "a client gone mid-stream kept its slot"
    _serves(server)


def test_concurrent_sdk_requests_each_get_their_audio(served, tiny_ckpt) -> None:
    server, service, _ = served
    seeds = (11, 12)
    want = {s: _alone(service, tiny_ckpt, max_mel_tokens=20, seed=s) for s in seeds}
    got: dict[int, np.ndarray] = {}

    def run(seed: int) -> None:
        audio = _client(server).audio.speech.create(model="indextts2", voice="default", input=TEXT,
                                                    extra_body={"max_mel_tokens": 20, "seed": seed})
        got[seed] = _wav_pcm(audio.content)

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for s in seeds:
        _same(got[s], want[s], f"seed {s} under concurrency")


def test_voice_paths_are_never_taken_from_a_client(served) -> None:
    server, _, _ = served
    r = _http(server).post("/v1/audio/speech", json={"model": "indextts2", "voice": "/etc/passwd", "input": TEXT})
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"]
    assert _http(server).delete("/v1/audio/voices/..%2F..%2Fetc").status_code == 404


@pytest.mark.parametrize("stream", [False, True])
def test_the_load_test_drives_the_http_api(served, tmp_path, stream) -> None:
    from benchmarks import load

    server, _, _ = served
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    out = tmp_path / "load"
    args = ["--url", server.url, "--concurrency", "1,2", "--requests", "3", "--options", '{"max_mel_tokens": 8}',
            "--token-file", str(token), "--out", str(out)] + (["--stream"] if stream else [])
    assert load.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["level"] for r in results["levels"]] == [1, 2] and results["settings"]["token"] == "***"
    for r in results["levels"]:
        assert r["requests"] == 3 and r["errors"] == 0 and r["audio_s_per_s"] > 0
        assert 0 < r["first_audio_p50_s"] <= r["latency_p50_s"] and r["rtf_p50"] > 0
    assert "| 2 |" in (out / "results.md").read_text()
    bad = ["--url", server.url, "--concurrency", "1", "--requests", "1", "--out", str(out)]   # no token: 401s
    assert load.main(bad) == 2
    assert "401" in json.loads((out / "results.json").read_text())["levels"][0]["error_samples"][0]
