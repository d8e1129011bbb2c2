"""`python -m serve`: the model loaded once, Triton (PyTriton) and the OpenAI-compatible HTTP API on it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from serve.config import Limits, ServeConfig

log = logging.getLogger("serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    p.add_argument("--engines", required=True, type=Path, help="export directory (python -m export.build --out)")
    p.add_argument("--backend", default="auto", help="auto | trt | ort-cuda | cpu-auto | ov-cpu | ort-cpu "
                   "(runtime.executors.BACKENDS)")
    p.add_argument("--host", default="127.0.0.1", help="address of the HTTP API (and Triton); default "
                                                       "127.0.0.1: reachable from this machine only")
    p.add_argument("--port", type=int, default=8000, help="HTTP API port")
    p.add_argument("--triton-http-port", type=int, default=8010)
    p.add_argument("--triton-grpc-port", type=int, default=8011)
    p.add_argument("--triton-metrics-port", type=int, default=8012)
    p.add_argument("--no-triton", action="store_true", help="serve the HTTP API only")
    p.add_argument("--token-file", type=Path, help="bearer token for every HTTP route but /health")
    p.add_argument("--voices-dir", type=Path, help="where uploaded voices persist across restarts")
    p.add_argument("--voice", action="append", default=[], metavar="NAME=FILE",
                   help="register a reference recording as voice NAME at start (repeatable)")
    p.add_argument("--voice-cache", type=int, default=64, help="prepared voices kept in memory (LRU)")
    p.add_argument("--threads", type=int, help="ONNX Runtime CPU threads (default: one per core)")
    d = Limits()
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    p.add_argument("--max-upload-bytes", type=int, default=d.max_upload_bytes)
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds)
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent, help="requests at once; beyond: 429")
    p.add_argument("--max-voices", type=int, default=d.max_voices)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> ServeConfig:
    voices = []
    for spec in args.voice:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--voice {spec!r}: expected NAME=FILE")
        voices.append((name, Path(path)))
    limits = Limits(args.max_text_chars, args.max_upload_bytes, args.max_audio_seconds, args.max_concurrent,
                    args.max_voices)
    return ServeConfig(engines=args.engines, backend=args.backend, host=args.host, port=args.port,
                       triton=not args.no_triton, triton_http_port=args.triton_http_port,
                       triton_grpc_port=args.triton_grpc_port, triton_metrics_port=args.triton_metrics_port,
                       token_file=args.token_file, voices_dir=args.voices_dir, voices=tuple(voices),
                       voice_cache=args.voice_cache, threads=args.threads, limits=limits)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("serve").setLevel(logging.INFO)
    from runtime.errors import ToolkitError

    try:
        config = config_from(args)
        return run(config)
    except (ToolkitError, ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def run(config: ServeConfig) -> int:
    """Load, start both doors, serve until interrupted (SIGINT/SIGTERM), stop both."""
    import uvicorn

    from serve.auth import read_token
    from serve.http_api import create_app
    from serve.service import TtsService

    token = read_token(config.token_file) if config.token_file is not None else None
    service = TtsService.open(config)
    triton = None
    try:
        if config.triton:
            from serve.triton_models import start_triton

            triton = start_triton(service, config)
        app = create_app(service, token)
        print(f"serving {config.engines} on {service.synth.backend}: HTTP API http://{config.host}:{config.port}/v1"
              + (f", Triton HTTP :{config.triton_http_port} gRPC :{config.triton_grpc_port} metrics "
                 f":{config.triton_metrics_port}" if triton is not None else "")
              + (", bearer auth on" if token else ""), flush=True)
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        if triton is not None:
            triton.stop()
        service.close()
    return 0
