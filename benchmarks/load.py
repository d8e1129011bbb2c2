"""Load test of a running server: `python -m benchmarks.load --url URL --concurrency 1,2,4,8 --requests N`.

Drives either front door of `python -m serve` from outside, as clients would:
- `--url http://HOST:PORT` -> the OpenAI-compatible `POST /v1/audio/speech` (whole, or `--stream`);
- `--url grpc://HOST:PORT` -> Triton's `indextts2` (whole) or `indextts2_stream` (`--stream`) over gRPC.

Per concurrency level (that many clients, each sending its next request when the last one ended, N requests
in all): requests/s, audio seconds per second, time to first audio (the first audio byte; for a whole
response, when it arrives) p50/p95/p99, total latency p50/p95/p99, real-time factor (latency / audio
duration) p50, errors (and the first messages). Writes results.json, results.md and, with matplotlib,
results.png in `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable

import numpy as np

TEXTS = ("Hello, and welcome. This voice was made by a compiled engine.",
         "The weather today is calm, with a light wind from the west.",
         "今天天气很好，我们一起去公园散步吧。",
         "Please hold the line; your call matters to us, and someone will answer shortly.")
SAMPLE_RATE = 22050
WAV_HEADER = 44


@dataclass
class Sample:
    ok: bool
    latency_s: float
    first_audio_s: float | None = None
    audio_s: float = 0.0
    error: str = ""


@dataclass
class Settings:
    url: str
    concurrency: tuple[int, ...]
    requests: int
    stream: bool
    texts: tuple[str, ...]
    voice: str
    options: dict = field(default_factory=dict)
    token: str | None = None
    timeout_s: float = 600.0


# -- one request through each door --------------------------------------------------------------------------
def http_request(settings: Settings, text: str, seed: int) -> Sample:
    import httpx

    body = {"model": "indextts2", "input": text, "voice": settings.voice, "response_format": "pcm",
            "stream": settings.stream, "seed": seed, **settings.options}
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    t0 = time.perf_counter()
    first, size = None, 0
    try:
        with httpx.stream("POST", f"{settings.url}/v1/audio/speech", json=body, headers=headers,
                          timeout=settings.timeout_s) as r:
            if r.status_code != 200:
                r.read()
                return Sample(False, time.perf_counter() - t0, error=f"{r.status_code}: {r.text[:200]}")
            for piece in r.iter_raw():
                if piece and first is None:
                    first = time.perf_counter() - t0
                size += len(piece)
    except Exception as err:  # noqa: BLE001 — a failed request is a measured error
        return Sample(False, time.perf_counter() - t0, error=f"{type(err).__name__}: {err}")
    return Sample(True, time.perf_counter() - t0, first, size / 2 / SAMPLE_RATE)


def grpc_request(settings: Settings, text: str, seed: int, client: Any) -> Sample:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, value: bytes) -> Any:
        t = grpcclient.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value], dtype=np.object_))
        return t

    inputs = [tensor("text", text.encode()), tensor("voice", settings.voice.encode()),
              tensor("options", json.dumps({"seed": seed, **settings.options}).encode())]
    t0 = time.perf_counter()
    if not settings.stream:
        try:
            res = client.infer("indextts2", inputs, timeout=int(settings.timeout_s))
        except Exception as err:  # noqa: BLE001
            return Sample(False, time.perf_counter() - t0, error=f"{type(err).__name__}: {err}")
        status, error = int(res.as_numpy("status")[0]), res.as_numpy("error")[0].decode()
        done = time.perf_counter() - t0
        if status != 200:
            return Sample(False, done, error=f"{status}: {error}")
        return Sample(True, done, done, res.as_numpy("audio").size / SAMPLE_RATE)
    got: Queue = Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    first, samples = None, 0
    try:
        client.async_stream_infer("indextts2_stream", inputs, enable_empty_final_response=True)
        while True:
            result, error = got.get(timeout=settings.timeout_s)
            if error is not None:
                return Sample(False, time.perf_counter() - t0, error=str(error))
            audio = result.as_numpy("audio")
            if audio is not None:
                status = int(result.as_numpy("status")[0])
                if status != 200:
                    return Sample(False, time.perf_counter() - t0,
                                  error=f"{status}: {result.as_numpy('error')[0].decode()}")
                if audio.size and first is None:
                    first = time.perf_counter() - t0
                samples += audio.size
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    except Empty:
        return Sample(False, time.perf_counter() - t0, error="timed out waiting for the stream")
    finally:
        client.stop_stream()
    return Sample(True, time.perf_counter() - t0, first, samples / SAMPLE_RATE)


# -- a level ----------------------------------------------------------------------------------------------
def run_level(settings: Settings, level: int, progress: Callable[[str], None]) -> dict[str, Any]:
    work: Queue = Queue()
    for i in range(settings.requests):
        work.put(i)
    samples: list[Sample] = []
    lock = threading.Lock()

    def client_loop() -> None:
        client = None
        if settings.url.startswith("grpc://"):
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(settings.url[len("grpc://"):])
        try:
            while True:
                try:
                    i = work.get_nowait()
                except Empty:
                    return
                text = settings.texts[i % len(settings.texts)]
                s = grpc_request(settings, text, i, client) if client is not None else http_request(settings, text, i)
                with lock:
                    samples.append(s)
        finally:
            if client is not None:
                client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(level)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rec = summarize(level, samples, wall)
    progress(f"{level} client(s): {rec['requests_per_s']:.3f} requests/s, first audio p50 "
             f"{rec['first_audio_p50_s']:.2f} s, latency p50 {rec['latency_p50_s']:.2f} s, {rec['errors']} error(s)")
    return rec


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(level: int, samples: list[Sample], wall: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    lat = [s.latency_s for s in ok]
    first = [s.first_audio_s for s in ok if s.first_audio_s is not None]
    rtf = [s.latency_s / s.audio_s for s in ok if s.audio_s > 0]
    return {"level": level, "requests": len(samples), "wall_s": wall, "requests_per_s": len(ok) / wall,
            "audio_s_per_s": sum(s.audio_s for s in ok) / wall,
            **{f"first_audio_p{q}_s": _pct(first, q) for q in (50, 95, 99)},
            **{f"latency_p{q}_s": _pct(lat, q) for q in (50, 95, 99)},
            "rtf_p50": statistics.median(rtf) if rtf else float("nan"),
            "errors": len(samples) - len(ok), "error_samples": sorted({s.error for s in samples if not s.ok})[:5]}


def markdown(results: dict[str, Any]) -> str:
    st = results["settings"]
    lines = [f"### Load ({st['url']}, {'streamed' if st['stream'] else 'whole responses'}, {st['requests']} "
             f"requests a level)", "",
             "| clients | requests/s | audio s/s | first audio p50 | p95 | p99 | latency p50 | p95 | p99 | RTF p50 | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["levels"]:
        lines.append(f"| {r['level']} | {r['requests_per_s']:.3f} | {r['audio_s_per_s']:.3f} | "
                     f"{r['first_audio_p50_s']:.2f} s | {r['first_audio_p95_s']:.2f} s | {r['first_audio_p99_s']:.2f} s | "
                     f"{r['latency_p50_s']:.2f} s | {r['latency_p95_s']:.2f} s | {r['latency_p99_s']:.2f} s | "
                     f"{r['rtf_p50']:.2f} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    levels = [r["level"] for r in results["levels"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(levels, [r["requests_per_s"] for r in results["levels"]], marker="o")
    a.set_xlabel("clients")
    a.set_ylabel("requests/s")
    for q in (50, 95):
        b.plot(levels, [r[f"latency_p{q}_s"] for r in results["levels"]], marker="o", label=f"latency p{q}")
        b.plot(levels, [r[f"first_audio_p{q}_s"] for r in results["levels"]], marker="x", label=f"first audio p{q}")
    b.set_xlabel("clients")
    b.set_ylabel("seconds")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="http://HOST:PORT (the HTTP API) or grpc://HOST:PORT (Triton)")
    p.add_argument("--concurrency", default="1,2,4,8", help="clients at once, comma-separated levels")
    p.add_argument("--requests", type=int, default=16, help="requests per level")
    p.add_argument("--stream", action="store_true", help="streamed responses (time to first audio)")
    p.add_argument("--texts", type=Path, help="one text per line (default: four built-in sentences)")
    p.add_argument("--voice", default="default", help="voice id or name on the server")
    p.add_argument("--options", default="{}", help="extra request options as JSON, e.g. '{\"max_mel_tokens\": 200}'")
    p.add_argument("--token-file", type=Path, help="bearer token of the HTTP API")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results-load"))
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if not args.url.startswith(("http://", "https://", "grpc://")):
        raise ValueError(f"--url {args.url!r}: use http://HOST:PORT or grpc://HOST:PORT")
    try:
        levels = tuple(int(v) for v in args.concurrency.split(","))
    except ValueError as err:
        raise ValueError(f"--concurrency: comma-separated integers, got {args.concurrency!r}") from err
    if not levels or min(levels) < 1 or args.requests < 1:
        raise ValueError("--concurrency levels and --requests must be >= 1")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        raise ValueError(f"--options is not JSON: {err}") from err
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object")
    texts = TEXTS
    if args.texts is not None:
        texts = tuple(t.strip() for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip())
        if not texts:
            raise ValueError(f"--texts {args.texts}: no text in it")
    token = args.token_file.read_text(encoding="utf-8").strip() if args.token_file else None
    return Settings(args.url.rstrip("/"), levels, args.requests, args.stream, texts, args.voice, options, token,
                    args.timeout)


def main(argv: list[str] | None = None) -> int:
    from .console import progress_printer
    from .report import _write

    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    progress = progress_printer()
    levels = [run_level(settings, level, progress) for level in settings.concurrency]
    results = {"settings": {**asdict(settings), "token": "***" if settings.token else None, "texts": len(settings.texts)},
               "levels": levels}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / "results.json", args.out / "results.md"]
    _write(paths[0], json.dumps(results, indent=2) + "\n")
    _write(paths[1], markdown(results))
    png = chart(results, args.out / "results.png")
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in [*paths, *([png] if png else [])]))
    return 0 if all(r["errors"] == 0 for r in levels) else 2


if __name__ == "__main__":
    raise SystemExit(main())
