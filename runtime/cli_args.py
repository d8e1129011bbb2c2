"""Command-line flags shared by the synthesis CLIs (the runtime's and the eager reference's), so both
accept the same spelling, and the one rule that turns them into settings.

Why the sampling and Euler flags default to "not given" (None): the effective settings are the defaults the
caller hands in, overridden only by the flags the user actually typed. The runtime's CLI hands in the
export's recorded defaults (manifest.json `sampling` / `synthesis`, see `manifest_defaults`), so a
checkpoint's own defaults reach a CLI user; the eager CLI has no manifest and hands in the eager pipeline's
own defaults (upstream infer_v2's, the classes' defaults). An argparse default would silently replace both.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from runtime.errors import InputError
from runtime.gpt.generate import GenerationConfig
from runtime.manifest import Manifest
from runtime.request import DecoderSettings, SynthesisRequest

#: flag destination -> GenerationConfig field (`--greedy` / `--sample` set `do_sample`)
_GENERATION_FLAGS = ("num_beams", "top_k", "top_p", "temperature", "repetition_penalty", "length_penalty",
                     "max_mel_tokens")
#: `--quick-streaming-tokens` when streaming and not given. Upstream's merge rule caps a segment at
#: max/2 tokens while the running token count is <= this value, and a value <= max/2 changes nothing; at
#: upstream's max of 120, 120 means the first 120 tokens come in segments of at most 60 tokens.
STREAM_QUICK_STREAMING_TOKENS = 120
#: flag destination -> DecoderSettings field
_DECODER_FLAGS = {"steps": "steps", "cfg_rate": "cfg_rate"}


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
    s.add_argument("--quick-streaming-tokens", type=int, default=None,
                   help="upstream's quick_streaming_tokens: the first N text tokens are cut into segments of at most "
                        "half --max-text-tokens-per-segment, so the first audio comes sooner (default 0; with "
                        f"--stream {STREAM_QUICK_STREAMING_TOKENS}; IndexTTS-2.5: the first segment holds at most "
                        "min(N, half the maximum) tokens)")
    v = parser.add_argument_group("IndexTTS-2.5 exports")
    v.add_argument("--lang", help="the text's language: zh, en, ja, es, ar, ... (default: zh if the text has a CJK "
                                  "ideograph, else en); codes outside the model's table use its 'common' embedding")
    v.add_argument("--duration-factor", type=float, default=1.0,
                   help="scales the length of the speech (0.5 - 2.0; upstream's only duration control)")


def add_generation_args(parser: argparse.ArgumentParser,
                        defaults_from: str = "the export's recorded defaults, manifest.json") -> None:
    """Sampling and decoder flags; each defaults to None ("not given"): see the module docstring."""
    g = parser.add_argument_group(f"generation (flags not given: {defaults_from})")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="greedy", action="store_const", const=True, default=None,
                      help="no sampling (greedy / beam search)")
    mode.add_argument("--sample", dest="greedy", action="store_const", const=False,
                      help="sampling (when the defaults say greedy)")
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--length-penalty", type=float, default=None)
    g.add_argument("--max-mel-tokens", type=int, default=None)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling and the CFM noise")
    g.add_argument("--steps", type=int, default=None, help="Euler steps of the mel decoder")
    g.add_argument("--cfg-rate", type=float, default=None, help="classifier-free guidance rate")


def manifest_defaults(manifest: Manifest) -> tuple[GenerationConfig, DecoderSettings]:
    """The sampling and Euler defaults an export recorded (what the runtime uses when nothing overrides them)."""
    return manifest.sampling, DecoderSettings(manifest.synthesis.euler_steps, manifest.synthesis.cfg_rate)


def generation_config(args: argparse.Namespace, defaults: GenerationConfig) -> GenerationConfig:
    """`defaults` with the sampling flags that were given (checked by GenerationConfig: InputError if invalid)."""
    given = {f: getattr(args, f) for f in _GENERATION_FLAGS if getattr(args, f) is not None}
    if args.greedy is not None:
        given["do_sample"] = not args.greedy
    return dataclasses.replace(defaults, **given)


def decoder_settings(args: argparse.Namespace, defaults: DecoderSettings) -> DecoderSettings:
    """`defaults` with the Euler flags that were given (checked by DecoderSettings: InputError if invalid)."""
    given = {field: getattr(args, dest) for dest, field in _DECODER_FLAGS.items() if getattr(args, dest) is not None}
    return dataclasses.replace(defaults, **given)


def given_generation_flags(args: argparse.Namespace) -> list[str]:
    """The sampling / Euler flags the user typed, spelled as on the command line (for the settings line)."""
    names = [f for f in (*_GENERATION_FLAGS, *_DECODER_FLAGS) if getattr(args, f) is not None]
    flags = ["--" + n.replace("_", "-") for n in names]
    if args.greedy is not None:
        flags.insert(0, "--greedy" if args.greedy else "--sample")
    return flags


def describe_settings(generation: GenerationConfig, decoder: DecoderSettings) -> str:
    """One line: the effective sampling and Euler settings."""
    g = generation
    mode = ("beam sampling" if g.num_beams > 1 else "sampling") if g.do_sample else \
        ("beam search" if g.num_beams > 1 else "greedy")
    sampling = f", top-k {g.top_k}, top-p {g.top_p}, temperature {g.temperature}" if g.do_sample else ""
    return (f"{mode}, {g.num_beams} beam(s){sampling}, repetition penalty {g.repetition_penalty}, "
            f"length penalty {g.length_penalty}, at most {g.max_mel_tokens} mel tokens; "
            f"{decoder.steps} Euler steps, CFG rate {decoder.cfg_rate}")


#: options whose value may start with "-" (a negative number list argparse would take for an option)
VALUE_OPTIONS = ("--emo-vector",)


def attach_negative_values(argv: list[str]) -> list[str]:
    """`--emo-vector -1,0,...` -> `--emo-vector=-1,0,...`: argparse reads "-1,0,..." as an unknown option,
    so the value reaches the vector check (which names the negative weight) instead."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in VALUE_OPTIONS and value[:1] == "-" and value[1:2] in tuple("0123456789."):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


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


def quick_streaming_tokens(args: argparse.Namespace) -> int:
    """The flag if given, else STREAM_QUICK_STREAMING_TOKENS for a streamed run and upstream's 0 otherwise."""
    if getattr(args, "quick_streaming_tokens", None) is not None:
        return args.quick_streaming_tokens
    return STREAM_QUICK_STREAMING_TOKENS if getattr(args, "stream", False) else 0


def synthesis_request(args: argparse.Namespace) -> SynthesisRequest:
    return SynthesisRequest(
        text=read_text(args), speaker=args.speaker, emo_audio=args.emo_audio, emo_alpha=args.emo_alpha,
        emo_vector=parse_emo_vector(args.emo_vector), use_emo_text=args.use_emo_text or args.emo_text is not None,
        emo_text=args.emo_text, use_random=args.use_random, interval_silence_ms=args.interval_silence,
        max_text_tokens_per_segment=args.max_text_tokens_per_segment,
        quick_streaming_tokens=quick_streaming_tokens(args), lang=getattr(args, "lang", None),
        duration_factor=getattr(args, "duration_factor", 1.0))
