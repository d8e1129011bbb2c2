"""`python -m export.synthesize --checkpoints DIR --speaker REF.wav --text "..." --out OUT.wav`

The eager (PyTorch) reference synthesis, every mode of upstream's `IndexTTS2.infer`: voice cloning,
emotion from a second reference (`--emo-audio`, `--emo-alpha`), from an 8-value vector (`--emo-vector`),
or from text through the emotion LLM (`--emo-text` / `--use-emo-text`). Writes a 22.05 kHz 16-bit WAV
(atomically: no partial file on error).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from runtime.errors import InputError, ToolkitError
from runtime.generate import GenerationConfig
from runtime.wav import write_wav_atomic

from .pipeline import DecoderSettings, EagerIndexTTS2, SynthesisRequest


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Sampling and decoder flags (upstream defaults), shared by every synthesis CLI."""
    g = parser.add_argument_group("generation (upstream defaults)")
    g.add_argument("--num-beams", type=int, default=3)
    g.add_argument("--greedy", action="store_true", help="no sampling (greedy / beam search)")
    g.add_argument("--top-k", type=int, default=30)
    g.add_argument("--top-p", type=float, default=0.8)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--repetition-penalty", type=float, default=10.0)
    g.add_argument("--length-penalty", type=float, default=0.0)
    g.add_argument("--max-mel-tokens", type=int, default=1500)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling and the CFM noise")
    g.add_argument("--steps", type=int, default=25, help="Euler steps of the mel decoder")
    g.add_argument("--cfg-rate", type=float, default=0.7, help="classifier-free guidance rate")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(do_sample=not args.greedy, num_beams=args.num_beams, top_k=args.top_k,
                            top_p=args.top_p, temperature=args.temperature,
                            repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
                            max_mel_tokens=args.max_mel_tokens)


def parse_emo_vector(text: str | None) -> tuple[float, ...] | None:
    """'0,0.5,0,0,0,0,0,0' -> floats (validated later: 8 non-negative values)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError as err:
        raise InputError(f"--emo-vector must be 8 comma-separated numbers, got {text!r}") from err


def read_text(args: argparse.Namespace) -> str:
    if (args.text is None) == (args.text_file is None):
        raise InputError("give exactly one of --text and --text-file")
    if args.text_file is not None:
        try:
            return args.text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{args.text_file}: cannot read the text file ({err})") from err
    return args.text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.synthesize", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoints", type=Path, required=True, help="IndexTTS2 checkpoint directory")
    parser.add_argument("--speaker", type=Path, required=True, help="speaker reference audio")
    parser.add_argument("--text", help="text to speak")
    parser.add_argument("--text-file", type=Path, help="read the text from this UTF-8 file")
    parser.add_argument("--out", type=Path, required=True, help="output WAV (22.05 kHz, 16-bit)")
    e = parser.add_argument_group("emotion")
    e.add_argument("--emo-audio", type=Path, help="emotion reference audio")
    e.add_argument("--emo-alpha", type=float, default=1.0, help="emotion strength (audio blend, vector scale)")
    e.add_argument("--emo-vector", help="8 weights: happy,angry,sad,afraid,disgusted,melancholic,surprised,calm")
    e.add_argument("--use-emo-text", action="store_true", help="emotion from the text via the emotion LLM")
    e.add_argument("--emo-text", help="emotion from this description (implies --use-emo-text)")
    e.add_argument("--use-random", action="store_true", help="random emotion prototypes (vector mode)")
    e.add_argument("--emo-text-max-tokens", type=int, default=32768,
                   help="cap on the emotion LLM's answer (upstream 32768)")
    s = parser.add_argument_group("segments")
    s.add_argument("--max-text-tokens-per-segment", type=int, default=120)
    s.add_argument("--interval-silence", type=int, default=200, help="silence between segments (ms)")
    add_generation_args(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        request = SynthesisRequest(
            text=read_text(args), speaker=args.speaker, emo_audio=args.emo_audio, emo_alpha=args.emo_alpha,
            emo_vector=parse_emo_vector(args.emo_vector), use_emo_text=args.use_emo_text or args.emo_text is not None,
            emo_text=args.emo_text, use_random=args.use_random, interval_silence_ms=args.interval_silence,
            max_text_tokens_per_segment=args.max_text_tokens_per_segment)
        config = generation_config(args)
        if args.steps < 1:
            raise InputError(f"--steps must be at least 1, got {args.steps}")
        tts = EagerIndexTTS2(args.checkpoints, emo_text_max_new_tokens=args.emo_text_max_tokens)
        result = tts.synthesize(request, config, DecoderSettings(args.steps, args.cfg_rate), seed=args.seed)
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
