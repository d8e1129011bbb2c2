"""One export wrapper per graph contract (registry: `WRAPPERS`, graph name -> WrapperSpec)."""

from __future__ import annotations

from .base import WrapperSpec


def all_wrappers() -> dict[str, WrapperSpec]:
    from . import audio, gpt

    registry: dict[str, WrapperSpec] = {}
    for family in (audio, gpt):
        overlap = registry.keys() & family.WRAPPERS.keys()
        if overlap:
            raise RuntimeError(f"graph wrappers registered twice: {sorted(overlap)}")
        registry.update(family.WRAPPERS)
    return registry
