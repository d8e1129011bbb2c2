"""`python -m export.synthesize --checkpoints DIR --speaker REF.wav --text "..." --out OUT.wav`

The eager (PyTorch) reference synthesis, every mode of upstream's `IndexTTS2.infer`: voice cloning,
emotion from a second reference (`--emo-audio`, `--emo-alpha`), from an 8-value vector (`--emo-vector`),
or from text through the emotion LLM (`--emo-text` / `--use-emo-text`). Writes a 22.05 kHz 16-bit WAV
(atomically: no partial file on error). There is no manifest here: sampling and Euler flags that are not
given take the eager pipeline's own defaults (upstream infer_v2's: `GenerationConfig()`, `DecoderSettings()`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from runtime.cli_args import (
    add_generation_args,
    add_input_args,
    decoder_settings,
    generation_config,
    synthesis_request,
)
from runtime.errors import ToolkitError
from runtime.gpt.generate import GenerationConfig
from runtime.request import DecoderSettings
from runtime.wav import write_wav_atomic

from .pipeline import EagerIndexTTS2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.synthesize", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoints", type=Path, required=True, help="IndexTTS2 checkpoint directory")
    add_input_args(parser)
    add_generation_args(parser, defaults_from="the eager pipeline's, upstream infer_v2's")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        request = synthesis_request(args)
        config = generation_config(args, GenerationConfig())      # the eager pipeline's own defaults
        decoder = decoder_settings(args, DecoderSettings())
        tts = EagerIndexTTS2(args.checkpoints, emo_text_max_new_tokens=args.emo_text_max_tokens)
        result = tts.synthesize(request, config, decoder, seed=args.seed)
        write_wav_atomic(args.out, result.pcm, result.sample_rate)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = result.pcm.size / result.sample_rate
    codes = sum(s.codes.size for s in result.segments)
    print(f"wrote {args.out}: {seconds:.2f} s of audio, {len(result.segments)} segment(s), {codes} codes, "
          f"emotion from {result.emotion.source}, in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
