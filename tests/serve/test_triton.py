"""Triton Inference Server through PyTriton (127.0.0.1, tiny export): `tritonclient` over gRPC against
`indextts2` and the decoupled `indextts2_stream`; the audio is Synthesizer.synthesize's for the same seed;
bad input is a response naming it (status and error outputs), and the models keep serving; Triton's own
health and metrics endpoints answer."""

from __future__ import annotations

import json
import queue
import socket
import time

import httpx
import numpy as np
import pytest

from serve.config import Limits, ServeConfig
from serve.service import TtsService
from tests.serve.test_http_api import FAST, TEXT, _alone, _same

grpcclient = pytest.importorskip("tritonclient.grpc")
LONG = "The train was late. 今天天气很好。Please read slowly, then pause."
pytest.importorskip("pytriton")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def triton(tiny_export, tiny_ckpt):
    from serve.triton_models import start_triton

    config = ServeConfig(engines=tiny_export[0], backend="ort-cpu", voices=(("default", tiny_ckpt / "examples/speaker.wav"),),
                         triton_http_port=_free_port(), triton_grpc_port=_free_port(),
                         triton_metrics_port=_free_port(), limits=Limits(max_concurrent=4, max_upload_bytes=1 << 20))
    service = TtsService.open(config)
    server = start_triton(service, config)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{config.triton_grpc_port}")
    deadline = time.monotonic() + 120
    while not (client.is_server_ready() and client.is_model_ready("indextts2_stream")):
        assert time.monotonic() < deadline, "Triton did not get ready"
        time.sleep(0.5)
    yield client, service, config
    client.close()
    server.stop()
    service.close()


def _inputs(text: str | None = TEXT, voice: str | None = "default", options: dict | str | None = None,
            reference: bytes | None = None) -> list:
    items = []

    def add(name: str, value: bytes) -> None:
        t = grpcclient.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value], dtype=np.object_))
        items.append(t)

    if text is not None:
        add("text", text.encode())
    if voice is not None:
        add("voice", voice.encode())
    if reference is not None:
        add("reference_audio", reference)
    if options is not None:
        add("options", (options if isinstance(options, str) else json.dumps(options)).encode())
    return items


def _result(res) -> tuple[np.ndarray, int, str]:
    return res.as_numpy("audio"), int(res.as_numpy("status")[0]), res.as_numpy("error")[0].decode()


def _stream(client, inputs, stop_after: int | None = None) -> tuple[list, list]:
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("indextts2_stream", inputs, enable_empty_final_response=True)
        parts, errors = [], []
        while True:
            result, error = got.get(timeout=300)
            if error is not None:
                errors.append(error)
                break
            final = result.get_response().parameters.get("triton_final_response")
            if result.as_numpy("audio") is not None:
                parts.append(_result(result))
                if stop_after is not None and len(parts) >= stop_after:
                    break
            if final is not None and final.bool_param:
                break
        return parts, errors
    finally:
        client.stop_stream(cancel_requests=stop_after is not None)


def test_the_models_give_the_synthesizers_audio_whole_and_streamed(triton, tiny_ckpt) -> None:
    client, service, config = triton
    audio, status, error = _result(client.infer("indextts2", _inputs(options=FAST)))
    assert (status, error) == (200, "")
    _same(audio, _alone(service, tiny_ckpt, **FAST), "indextts2")
    longer = {**FAST, "max_text_tokens_per_segment": 8}          # several segments: several chunks
    parts, errors = _stream(client, _inputs(text=LONG, options=longer))
    assert not errors and all(p[1] == 200 and p[0].size for p in parts) and len(parts) >= 3, [p[1:] for p in parts]
    _same(np.concatenate([p[0] for p in parts]),
          _alone(service, tiny_ckpt, text=LONG, quick_streaming_tokens=120, **longer), "indextts2_stream")
    base = f"http://127.0.0.1:{config.triton_http_port}"
    assert httpx.get(f"{base}/v2/health/ready").status_code == 200
    assert httpx.get(f"{base}/v2/models/indextts2/ready").status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{config.triton_metrics_port}/metrics").text
    assert 'nv_inference_request_success{model="indextts2"' in metrics


@pytest.mark.parametrize("case, status, message", [
    ("empty_text", 400, "input is empty"),
    ("no_text", 400, "'text' is required"),
    ("unknown_voice", 400, "not found"),
    ("bad_options", 400, "not JSON"),
    ("unknown_option", 400, "speed_up"),
    ("garbage_reference", 400, "cannot decode"),
])
def test_bad_input_is_a_response_naming_it_and_the_models_keep_serving(triton, case, status, message) -> None:
    client, _, _ = triton
    inputs = {"empty_text": lambda: _inputs(text=" ", options=FAST),
              "no_text": lambda: _inputs(text=None, options=FAST),
              "unknown_voice": lambda: _inputs(voice="voice-000", options=FAST),
              "bad_options": lambda: _inputs(options="{seed: 1"),
              "unknown_option": lambda: _inputs(options={"speed_up": 2}),
              "garbage_reference": lambda: _inputs(voice=None, reference=b"not audio" * 20, options=FAST)}[case]
    audio, got_status, error = _result(client.infer("indextts2", inputs()))
    assert got_status == status and message in error and "Traceback" not in error and audio.size == 0, error
    parts, errors = _stream(client, inputs())
    assert not errors and parts[-1][1] == status and message in parts[-1][2]
    audio, got_status, _ = _result(client.infer("indextts2", _inputs(options={"max_mel_tokens": 8, "seed": 1})))
    assert got_status == 200 and audio.size > 0


def test_a_client_gone_mid_stream_frees_its_slot(triton) -> None:
    client, service, _ = triton
    parts, _ = _stream(client, _inputs(options={"max_mel_tokens": 60, "seed": 3}), stop_after=1)
    assert parts and parts[0][1] == 200
    deadline = time.monotonic() + 120
    while service.slots.in_use and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.slots.in_use == 0, "a stream whose client went away kept its slot"
    audio, status, _ = _result(client.infer("indextts2", _inputs(options={"max_mel_tokens": 8, "seed": 1})))
    assert status == 200 and audio.size > 0


def test_the_load_test_drives_triton_over_grpc(triton, tmp_path) -> None:
    from benchmarks import load

    _, _, config = triton
    for stream in (False, True):
        out = tmp_path / f"load-{stream}"
        args = ["--url", f"grpc://127.0.0.1:{config.triton_grpc_port}", "--concurrency", "1,2", "--requests", "2",
                "--options", '{"max_mel_tokens": 8}', "--out", str(out)] + (["--stream"] if stream else [])
        assert load.main(args) == 0
        levels = json.loads((out / "results.json").read_text())["levels"]
        assert all(r["errors"] == 0 and r["audio_s_per_s"] > 0 for r in levels)
