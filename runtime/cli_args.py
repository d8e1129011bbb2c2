"""Command-line flags shared by the synthesis CLIs (the runtime's and the eager reference's), so both
accept the same spelling with the same upstream defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.errors import InputError
from runtime.gpt.generate import GenerationConfig
from runtime.request import DecoderSettings, SynthesisRequest

_GEN = GenerationConfig()
_DEC = DecoderSettings()


def add_input_args(parser: argparse.ArgumentParser) -> None:
    """Speaker, text, output and the emotion / segment options of upstream's `infer`."""
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


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Sampling and decoder flags (upstream defaults)."""
    g = parser.add_argument_group("generation (upstream defaults)")
    g.add_argument("--num-beams", type=int, default=_GEN.num_beams)
    g.add_argument("--greedy", action="store_true", help="no sampling (greedy / beam search)")
    g.add_argument("--top-k", type=int, default=_GEN.top_k)
    g.add_argument("--top-p", type=float, default=_GEN.top_p)
    g.add_argument("--temperature", type=float, default=_GEN.temperature)
    g.add_argument("--repetition-penalty", type=float, default=_GEN.repetition_penalty)
    g.add_argument("--length-penalty", type=float, default=_GEN.length_penalty)
    g.add_argument("--max-mel-tokens", type=int, default=_GEN.max_mel_tokens)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling and the CFM noise")
    g.add_argument("--steps", type=int, default=_DEC.steps, help="Euler steps of the mel decoder")
    g.add_argument("--cfg-rate", type=float, default=_DEC.cfg_rate, help="classifier-free guidance rate")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(do_sample=not args.greedy, num_beams=args.num_beams, top_k=args.top_k,
                            top_p=args.top_p, temperature=args.temperature,
                            repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
                            max_mel_tokens=args.max_mel_tokens)


def decoder_settings(args: argparse.Namespace) -> DecoderSettings:
    return DecoderSettings(args.steps, args.cfg_rate)


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


def synthesis_request(args: argparse.Namespace) -> SynthesisRequest:
    return SynthesisRequest(
        text=read_text(args), speaker=args.speaker, emo_audio=args.emo_audio, emo_alpha=args.emo_alpha,
        emo_vector=parse_emo_vector(args.emo_vector), use_emo_text=args.use_emo_text or args.emo_text is not None,
        emo_text=args.emo_text, use_random=args.use_random, interval_silence_ms=args.interval_silence,
        max_text_tokens_per_segment=args.max_text_tokens_per_segment)
