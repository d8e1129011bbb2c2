"""One export wrapper per graph contract (registry: `all_wrappers(version)`, graph name -> WrapperSpec)."""

from __future__ import annotations

from .base import WrapperSpec


def all_wrappers(version: str = "2.0") -> dict[str, WrapperSpec]:
    """The wrappers of one IndexTTS2 version's graphs: 2.0's registry, or for 2.5 the graphs it shares with 2.0
    plus its own gpt_prefill and semantic_decoder (export/wrappers/v25.py)."""
    from runtime.contracts import graph_names

    from . import audio, gpt, v25

    registry: dict[str, WrapperSpec] = {}
    for family in (audio, gpt):
        overlap = registry.keys() & family.WRAPPERS.keys()
        if overlap:
            raise RuntimeError(f"graph wrappers registered twice: {sorted(overlap)}")
        registry.update(family.WRAPPERS)
    if version == "2.0":
        return registry
    registry.update(v25.WRAPPERS_25)
    return {name: registry[name] for name in graph_names(version)}
