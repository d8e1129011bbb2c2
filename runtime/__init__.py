"""Lean, torch-free runtime: audio and text front-ends, executors, orchestration, CLI.

Nothing in this package imports torch, tensorrt or the `export` package at module level. The public
entry points are loaded on first use, so `import runtime.errors` stays light:

    from runtime import Synthesizer, SynthesisRequest, DecoderSettings, GenerationConfig
"""

from __future__ import annotations

from typing import Any

_PUBLIC = {
    "Synthesizer": "runtime.synthesizer",
    "SynthesisRequest": "runtime.request",
    "SynthesisResult": "runtime.request",
    "SegmentResult": "runtime.request",
    "DecoderSettings": "runtime.request",
    "GenerationConfig": "runtime.gpt.generate",
    "OrtOptions": "runtime.executors.ort",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
