"""Shared by the CPU-backend tests: one fixed-length synthesis per backend, so two backends are compared on the
same amount of work (the stop token masked, as the benchmarks do)."""

from __future__ import annotations

import dataclasses

import numpy as np

from runtime.request import SynthesisRequest

TEXT = "Hello there, this is a test of the CPU backends."


def fixed_length_synthesis(synth, speaker, tokens: int = 40, seed: int = 3):
    """-> (codes per segment, int16 pcm) of one request with exactly `tokens` codes per segment."""
    from benchmarks.backends import FixedLengthSteps

    synth.gpt_steps = FixedLengthSteps(synth.gpt_steps)
    gen = dataclasses.replace(synth.generation_defaults, max_mel_tokens=tokens)
    result = synth.synthesize(SynthesisRequest(text=TEXT, speaker=speaker), gen, seed=seed)
    return [s.codes.tolist() for s in result.segments], result.pcm


def lsb(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max(initial=0))
