"""`python -m export.smoke --checkpoints DIR --speaker REF.wav --out OUT.wav`

The eager chain around the GPT, end to end, before the GPT exists in this toolkit: the speaker
reference goes through every front-end and submodel (w2v-BERT, semantic codec, CAMPPlus, length
regulator), then random speech codes and a random GPT latent stand in for the GPT's output and go
through gpt_layer + vq2emb, the length regulator, the 25-step CFM and BigVGAN to a 22.05 kHz 16-bit
WAV. It proves that a checkpoint directory loads and every stage runs; with random codes the audio is
noise whatever the weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime.errors import ToolkitError
from runtime.wav import to_pcm16, write_wav_atomic

from .eager import EagerModels, codes_to_mel, mel_length, prepare_speaker, vocode

log = logging.getLogger(__name__)


def run(checkpoints: Path, speaker: Path, out: Path, n_codes: int, seed: int, steps: int,
        cfg_rate: float) -> dict[str, float]:
    """Run the chain; returns per-stage wall times in seconds."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    models = EagerModels.load(checkpoints, with_gpt=False)
    times["load"] = time.perf_counter() - t0
    cfg = models.layout.config

    t0 = time.perf_counter()
    prompt = prepare_speaker(models, speaker)
    times["speaker"] = time.perf_counter() - t0
    log.info("speaker prompt: %d semantic frames, %d mel frames", prompt.spk_cond_emb.shape[1],
             prompt.ref_mel.shape[-1])

    rng = np.random.default_rng(seed)
    assert cfg.semantic_codec is not None
    gpt_dim = cfg.gpt.model_dim if cfg.gpt is not None else 1280
    codes = torch.from_numpy(rng.integers(0, cfg.semantic_codec.codebook_size, (1, n_codes)))
    latent = torch.from_numpy(rng.standard_normal((1, n_codes, gpt_dim), dtype=np.float32))
    total = prompt.ref_mel.shape[-1] + mel_length(n_codes)
    noise = torch.from_numpy(rng.standard_normal((1, 80, total), dtype=np.float32))

    t0 = time.perf_counter()
    mel = codes_to_mel(models, prompt, codes, latent, noise, steps=steps, cfg_rate=cfg_rate)
    times["s2mel"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wav = vocode(models, mel)
    times["bigvgan"] = time.perf_counter() - t0
    if not np.isfinite(wav).all():
        raise ToolkitError("the vocoder produced non-finite samples")
    write_wav_atomic(out, to_pcm16(wav), 22050)
    times["audio_seconds"] = wav.size / 22050
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.smoke", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoints", type=Path, required=True, help="IndexTTS2 checkpoint directory")
    parser.add_argument("--speaker", type=Path, required=True, help="speaker reference audio (wav/flac/ogg)")
    parser.add_argument("--out", type=Path, required=True, help="output WAV (22.05 kHz, 16-bit)")
    parser.add_argument("--codes", type=int, default=100, help="number of random speech codes (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25, help="Euler steps (upstream 25)")
    parser.add_argument("--cfg-rate", type=float, default=0.7, help="classifier-free guidance (upstream 0.7)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.codes < 1 or args.steps < 1:
        print("error: --codes and --steps must be at least 1", file=sys.stderr)
        return 2
    try:
        times = run(args.checkpoints, args.speaker, args.out, args.codes, args.seed, args.steps, args.cfg_rate)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in times.items() if k != "audio_seconds")
    print(f"wrote {args.out}: {times['audio_seconds']:.2f} s of audio ({stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
