"""Where a synthesis run's randomness comes from, so that every backend draws the same numbers.

Upstream draws from torch's global RNG (`multinomial` in the GPT, `randn` for the CFM noise), which no
other implementation can reproduce. Here one seed makes three independent numpy streams: the GPT's
sampling draws, the CFM initial noise, and the random prototype pick of the emotion-vector mode. The
eager pipeline and the engine runtime both use this, so "same seed" means "same draws" across backends,
and a parity test can replace the GPT stream with recorded draws without shifting the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.gpt.sampling import DrawSource, RngDraws

MEL_CHANNELS = 80


@dataclass
class RandomStreams:
    gpt: DrawSource
    noise: np.random.Generator
    choice: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int | None, gpt_draws: DrawSource | None = None) -> "RandomStreams":
        """Independent child streams of `seed` (None: fresh entropy). `gpt_draws` overrides the GPT stream."""
        gpt_ss, noise_ss, choice_ss = np.random.SeedSequence(seed).spawn(3)
        gpt = gpt_draws if gpt_draws is not None else RngDraws(gpt_ss)  # type: ignore[arg-type]
        return cls(gpt=gpt, noise=np.random.default_rng(noise_ss), choice=np.random.default_rng(choice_ss))

    def cfm_noise(self, frames: int, temperature: float = 1.0) -> np.ndarray:
        """The Euler solve's initial x: standard normal (1, 80, frames) float32 times the temperature."""
        z = self.noise.standard_normal((1, MEL_CHANNELS, frames), dtype=np.float32)
        return z if temperature == 1.0 else (z * np.float32(temperature)).astype(np.float32)
