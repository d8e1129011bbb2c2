"""What a server is started with (`python -m serve` flags), as typed settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAME = "indextts2"                 # the OpenAI `model` and the Triton model
STREAM_MODEL_NAME = "indextts2_stream"   # the decoupled (streaming) Triton model


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (each refused with a 4xx naming the limit)."""

    max_text_chars: int = 4000            # `input` characters (upstream segments long texts; this bounds the work)
    max_upload_bytes: int = 10 << 20      # an uploaded reference, checked before decoding
    max_audio_seconds: float = 60.0       # an uploaded reference's duration (upstream uses its first 15 s)
    max_concurrent: int = 16              # requests in this process at once (in flight + waiting); beyond: 429
    max_voices: int = 1000                # voices in the registry; beyond: refused until some are deleted

    def __post_init__(self) -> None:
        for name in ("max_text_chars", "max_upload_bytes", "max_concurrent", "max_voices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {self.max_audio_seconds}")


@dataclass(frozen=True)
class ServeConfig:
    engines: Path
    backend: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    triton: bool = True                   # start Triton (PyTriton) beside the HTTP API
    triton_http_port: int = 8010
    triton_grpc_port: int = 8011
    triton_metrics_port: int = 8012
    token_file: Path | None = None        # bearer auth on every HTTP route but /health
    voices_dir: Path | None = None        # where uploaded voices persist (None: memory only)
    voices: tuple[tuple[str, Path], ...] = ()   # operator voices registered at start (name, file)
    voice_cache: int = 64                 # prepared speaker/emotion states kept (LRU, by content)
    threads: int | None = None            # ONNX Runtime CPU threads
    stream_quick_tokens: int = 120        # quick_streaming_tokens of streamed requests (unless given)
    limits: Limits = field(default_factory=Limits)
