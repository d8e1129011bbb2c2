"""Streaming against offline synthesis, per backend: time to first audio, chunk cadence, underruns.

    python -m benchmarks.stream --engines OUT [--checkpoints CKPT] --backends ort-cpu[,torch,ort-cuda,trt] \
        [--texts FILE] [--repeats 3] [--gpt-tokens 40] [--threads N] [--chunk-frames 32] \
        [--max-chunk-frames 256] [--out benchmarks/results-stream]

Per backend, per text, per repeat (speaker cached; one unmeasured run of each mode first; backends and
modes interleaved round by round, their order alternating, as benchmarks/stages.py does):
- offline: `synthesize_segments` with one vocoder call per segment and upstream's quick_streaming_tokens
  0: when the first segment's audio is ready, and the whole request's wall time;
- streamed: `stream()` with the vocoder chunked (`--chunk-frames` doubling up to `--max-chunk-frames`) and
  the request's quick_streaming_tokens at the CLI's streaming default (STREAM_QUICK_STREAMING_TOKENS):
  time to first audio (TTFA, the first chunk's ready time), the gaps between consecutive speech chunks,
  underruns and the silence they cost (runtime/streaming/playback.py), wall time, chunks, audio, and per
  segment how long after its Euler solve ended its first chunk was ready;
- TTFA / the offline first segment, within one round (same machine state).
Then one vocoder chunk alone: the first window a segment's plan makes (`vocoder_windows`) on a real mel
of the benchmark's segment length, median of VOCODER_RUNS runs. For a text of one segment the report
holds first audio − Euler end against that time: the chunked vocoder's start-up cost, ≤ CRITERION chunks.

The built-in texts are one sentence per segment: each sentence has no break token (comma, hyphen), so
it is one piece of upstream's segmenter, and 58–65 words, i.e. 61–120 text tokens at 1.05–1.8 tokens per
word (the checkpoint's tokenizer is not at hand here to count them), so no two share a segment of 120
tokens and quick_streaming_tokens (which only stops merges) moves nothing; the one-segment text is one
short sentence. The counts each text gives with this export's tokenizer, at both quick settings, are printed and
recorded (the tiny demo's 400-piece tokenizer cuts them differently).

The GPT is held at `--gpt-tokens` codes per segment (benchmarks/backends.py: random demo weights never
stop), whatever the segment's text: with real weights a shorter first segment (quick_streaming_tokens)
would also have fewer codes; here it would not.
Results: OUT/results.json (machine, settings, every run), OUT/results.md (benchmarks/stream_report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .backends import BENCH_BACKENDS, OpenedBackend, open_backend
from .measure import measure_interleaved

log = logging.getLogger("benchmarks")

SENTENCES = (
    "A streaming speech engine starts to play the first words of an answer while the rest of the answer is still "
    "being computed in the background and so the listener hears a voice almost at once instead of waiting in "
    "silence for the whole of a long text to be turned into sound by the language model and then by the decoder "
    "and the vocoder.",
    "The language model writes the speech codes one after the other and the flow matching decoder then turns "
    "those codes into a mel spectrogram over many small steps of an ordinary differential equation before the "
    "vocoder finally turns the spectrogram into a waveform that a small loudspeaker on the desk can play to the "
    "people who are waiting to hear it.",
    "A listener does not really care how fast the whole text is spoken in the end but only how soon the voice "
    "begins and whether it ever stops to wait for the machine to catch up with it and that is exactly why this "
    "benchmark measures the time to the first audio and the gaps between the pieces of sound as they arrive.",
    "The old lighthouse keeper climbed the narrow stairs every evening to light the great lamp at the top of the "
    "tower and then he sat by the window for many hours and watched the ships pass slowly along the dark coast "
    "until the first grey light of the morning came back over the cold and quiet sea below the rocks.",
    "In the small village at the foot of the mountain the baker opened his shop long before sunrise and the "
    "smell of fresh bread drifted through the narrow streets where the children were still asleep in their beds "
    "and the only sound in the whole place was the water running in the old stone fountain in the middle of the "
    "square.",
    "The river carried the melted snow from the high valleys down to the wide green plain where the farmers had "
    "dug long channels many years ago to bring the water to their fields of wheat and barley and every spring "
    "they cleaned those channels together with their neighbours before the first warm days of the new season "
    "arrived.",
    "On rainy afternoons the library was full of students who read in silence at the long wooden tables while "
    "the rain drummed against the tall windows above the reading room and the old librarian walked slowly "
    "between the high shelves to put the returned books back in their proper places one by one until the bell "
    "rang at closing time.",
    "The train left the station a little later than planned but the driver made up the lost time on the long "
    "straight stretch of track that runs beside the lake toward the city and the passengers who had worried "
    "about missing their meetings began to relax and looked out at the water shining in the sun below the "
    "green hills.",
    "When the wind turned to the north the fishermen pulled their boats high onto the beach and tied them to "
    "the posts above the line of the tide and then they waited in the warm harbour tavern for the storm to pass "
    "over the islands and for the sea to grow calm enough for all of them to sail out again in the morning.",
    "At the end of the long day the city lights came on one by one and the streets slowly filled with people "
    "walking home from work under the warm glow of the old lamps while the shops closed their doors and the "
    "smell of dinner cooking drifted out of the open windows of the houses above the busy road.",
)
#: (text, segments it is written to give at 120 tokens per segment, quick_streaming_tokens 0)
DEFAULT_TEXTS = (
    ("The quick brown fox jumps over the lazy dog while the old farmer watches quietly from the porch.", 1),
    (" ".join(SENTENCES[:3]), 3),
    (" ".join(SENTENCES), 10),
)
DEFAULT_GPT_TOKENS = 40
VOCODER_RUNS = 10             # one vocoder chunk alone: median of this many runs (after 2 unmeasured)
CRITERION = 1.2               # first audio − Euler end of a one-segment text, in vocoder chunks: at most this
OFFLINE, STREAMED = "offline", "streamed"


@dataclass
class Settings:
    engines: Path
    checkpoints: Path | None
    backends: tuple[str, ...]
    texts: tuple[str, ...]
    intended: tuple[int | None, ...]         # segments a built-in text is written to give (None: --texts)
    speaker: Path
    stream: Any                              # runtime.streaming.chunks.StreamSettings
    repeats: int = 3
    gpt_tokens: int = DEFAULT_GPT_TOKENS
    threads: int | None = None
    seed: int = 0


@dataclass
class TextCase:
    """One text as the two modes request it."""

    index: int
    text: str
    offline: Any                             # SynthesisRequest, quick_streaming_tokens 0
    streamed: Any                            # SynthesisRequest, STREAM_QUICK_STREAMING_TOKENS
    segments: dict[str, int]                 # mode -> segments the tokenizer cuts


def _generation(synth: Any, tokens: int) -> Any:
    return dataclasses.replace(synth.generation_defaults, max_mel_tokens=tokens)


def text_cases(synth: Any, settings: Settings) -> list[TextCase]:
    """Both modes' requests of every text, with the segment counts this export's tokenizer gives."""
    from runtime.cli_args import STREAM_QUICK_STREAMING_TOKENS
    from runtime.request import SynthesisRequest

    cases = []
    for i, text in enumerate(settings.texts):
        offline = SynthesisRequest(text=text, speaker=settings.speaker, quick_streaming_tokens=0)
        streamed = dataclasses.replace(offline, quick_streaming_tokens=STREAM_QUICK_STREAMING_TOKENS)
        cases.append(TextCase(i, text, offline, streamed, {OFFLINE: len(synth.segments(offline)),
                                                           STREAMED: len(synth.segments(streamed))}))
    return cases


def offline_run(synth: Any, request: Any, settings: Settings) -> dict[str, Any]:
    """One offline synthesis (one vocoder call per segment): first segment ready, wall, audio."""
    from runtime.request import silence
    from runtime.streaming.chunks import StreamSettings

    t0 = time.perf_counter()
    first, samples, segments = None, 0, 0
    for seg in synth.synthesize_segments(request, _generation(synth, settings.gpt_tokens), seed=settings.seed,
                                         settings=StreamSettings.whole_segments()):
        if first is None:
            first = time.perf_counter() - t0
        samples += seg.pcm.size
        segments = seg.count
    wall = time.perf_counter() - t0
    samples += max(segments - 1, 0) * silence(synth.sample_rate, request.interval_silence_ms).size
    return {"first_segment_s": first or 0.0, "wall_s": wall, "segments": segments,
            "audio_s": samples / synth.sample_rate}


def streamed_run(synth: Any, request: Any, settings: Settings) -> tuple[dict[str, Any], Any]:
    """One streamed synthesis -> (its record, the first segment's mel)."""
    from runtime.streaming.chunks import SPEECH
    from runtime.streaming.playback import PlaybackClock

    clock = PlaybackClock(synth.sample_rate)
    speech_ready: list[float] = []
    after_euler: dict[int, float] = {}
    vocoder_s: dict[int, float] = {}          # per segment, all its vocoder calls as the stream made them
    euler_end, mel, kinds, segments = None, None, [], 0
    t0 = time.perf_counter()
    for chunk in synth.stream(request, _generation(synth, settings.gpt_tokens), seed=settings.seed,
                              settings=settings.stream):
        clock.add(chunk.ready_s, chunk.samples)
        kinds.append(chunk.kind)
        if chunk.kind == SPEECH:
            speech_ready.append(chunk.ready_s)
        if chunk.mel_ready_s is not None:
            after_euler[chunk.segment] = chunk.ready_s - chunk.mel_ready_s
            if chunk.segment == 0:
                euler_end = chunk.mel_ready_s
        if chunk.result is not None:
            vocoder_s[chunk.segment] = chunk.result.timings.get("bigvgan")
            mel = chunk.result.mel if mel is None else mel
        segments = chunk.segments
    wall = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(speech_ready, speech_ready[1:])]
    record = {
        "ttfa_s": clock.first_audio_s, "wall_s": wall, "segments": segments, "chunks": len(clock.arrivals),
        "audio_s": sum(a.duration_s for a in clock.arrivals), "euler_end_s": euler_end,
        "first_chunk_after_euler_s": [after_euler.get(i) for i in range(segments)],
        "segment_vocoder_s": [vocoder_s.get(i) for i in range(segments)],
        "speech_gaps_s": gaps, "underruns": len(clock.underruns), "stall_s": clock.stall_s,
        "arrivals": [{"ready_s": a.ready_s, "duration_s": a.duration_s, "buffered_s": a.buffered_s, "kind": k}
                     for a, k in zip(clock.arrivals, kinds)],
    }
    return record, mel


def measure_text(backends: list[OpenedBackend], case: TextCase, settings: Settings,
                 progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every repeat of both modes on every backend for one text -> (run records, backend -> a mel)."""
    progress(f"text {case.index + 1}: warm-up (one run of each mode per backend)")
    mels: dict[str, Any] = {}
    for b in backends:
        offline_run(b.synth, case.offline, settings)
        mels[b.name] = streamed_run(b.synth, case.streamed, settings)[1]
    order = [(b, mode) for b in backends for mode in (OFFLINE, STREAMED)]
    records = []
    for rnd in range(settings.repeats):
        progress(f"text {case.index + 1}: round {rnd + 1}/{settings.repeats}")
        paired: dict[str, dict[str, dict[str, Any]]] = {}
        for b, mode in (order if rnd % 2 == 0 else order[::-1]):
            if mode == OFFLINE:
                rec = offline_run(b.synth, case.offline, settings)
            else:
                rec, mels[b.name] = streamed_run(b.synth, case.streamed, settings)
            rec = {"backend": b.name, "text": case.index, "repeat": rnd, "mode": mode, **rec}
            paired.setdefault(b.name, {})[mode] = rec
            records.append(rec)
        for pair in paired.values():
            first = pair[OFFLINE]["first_segment_s"]
            pair[STREAMED]["ttfa_over_offline_first"] = pair[STREAMED]["ttfa_s"] / first if first else None
    return records, mels


def vocoder_chunk(backends: list[OpenedBackend], mels: dict[str, Any], settings: Settings,
                  progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """One vocoder chunk alone per backend: the first window of a segment's plan, on that backend's mel."""
    progress(f"one vocoder chunk alone ({VOCODER_RUNS} runs per backend)")
    fns, info = {}, {}
    for b in backends:
        mel = mels[b.name]
        window = b.synth.vocoder_windows(mel.shape[-1], settings.stream)[0]
        fns[b.name] = (lambda synth, m, w: lambda: synth.vocode(m, w))(b.synth, mel, window)
        samples = int(fns[b.name]().size)
        info[b.name] = {"segment_frames": int(mel.shape[-1]), "window": repr(window), "chunk_samples": samples,
                        "chunk_audio_s": samples / b.synth.sample_rate}
    for name, stats in measure_interleaved(fns, VOCODER_RUNS, warmup=2).items():
        info[name]["stats_ms"] = dataclasses.asdict(stats)
    return info


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    from runtime.manifest import read_manifest

    from .stages import machine
    from .stream_report import summarize

    manifest = read_manifest(settings.engines)
    opened: list[OpenedBackend] = []
    records: list[dict[str, Any]] = []
    mels: dict[str, Any] = {}
    try:
        for name in settings.backends:
            progress(f"{name}: loading")
            opened.append(open_backend(name, settings.engines, settings.checkpoints, settings.threads))
        cases = text_cases(opened[0].synth, settings)
        _show_cases(cases, settings, progress)
        with _segmenter_warned_once():
            for case in cases:
                got, last = measure_text(opened, case, settings, progress)
                records += got
                mels = mels or last                 # the first text's mels: every segment has the same length
        chunk = vocoder_chunk(opened, mels, settings, progress)
    finally:
        for backend in opened:
            backend.synth.close()
    texts = [{"index": c.index, "chars": len(c.text), "text": c.text, "segments": c.segments,
              "intended_segments": settings.intended[c.index]} for c in cases]
    return {
        "machine": machine(),
        "settings": _settings_record(settings, manifest, cases),
        "texts": texts,
        "vocoder_chunk": chunk,
        "summary": summarize(records, texts, settings.backends, chunk, CRITERION),
        "runs": records,
    }


@contextlib.contextmanager
def _segmenter_warned_once() -> Iterator[None]:
    """The segmenter's warnings (a hard cut) were shown by text_cases; every run cuts the same texts again."""
    logger = logging.getLogger("runtime.frontend.text.segments")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _show_cases(cases: list[TextCase], settings: Settings, progress: Callable[[str], None]) -> None:
    for c in cases:
        want = settings.intended[c.index]
        note = "" if want in (None, c.segments[OFFLINE]) else f" (written for {want} with the checkpoint's tokenizer)"
        progress(f"text {c.index + 1}: {len(c.text)} chars, {c.segments[OFFLINE]} segment(s) at "
                 f"quick_streaming_tokens {c.offline.quick_streaming_tokens}{note}, {c.segments[STREAMED]} at "
                 f"{c.streamed.quick_streaming_tokens}")


def _settings_record(settings: Settings, manifest: Any, cases: list[TextCase]) -> dict[str, Any]:
    s = settings.stream
    return {"engines": str(settings.engines), "checkpoint": manifest.checkpoint.path,
            "backends": list(settings.backends), "repeats": settings.repeats, "gpt_tokens": settings.gpt_tokens,
            "threads": settings.threads, "seed": settings.seed, "euler_steps": manifest.synthesis.euler_steps,
            "sample_rate": manifest.synthesis.sample_rate,
            "stream": {"first_chunk_frames": s.vocoder.first_frames if s.vocoder else 0,
                       "max_chunk_frames": s.vocoder.max_frames if s.vocoder else 0, "pipeline": s.pipeline},
            "max_text_tokens_per_segment": cases[0].offline.max_text_tokens_per_segment if cases else None,
            "quick_streaming_tokens": {OFFLINE: 0, STREAMED: cases[0].streamed.quick_streaming_tokens if cases
                                       else None},
            "warmup": "one unmeasured run of each mode per backend and text (speaker cached)",
            "vocoder_runs": VOCODER_RUNS, "criterion_chunks": CRITERION,
            "fixed_gpt_length": f"the stop token is masked: every segment generates exactly {settings.gpt_tokens} "
                                "codes, whatever its text"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from runtime.streaming.chunks import DEFAULT_FIRST_CHUNK_FRAMES, DEFAULT_MAX_CHUNK_FRAMES

    p = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", required=True, type=Path, help="export directory (python -m export.build --out)")
    p.add_argument("--checkpoints", type=Path, help="checkpoint directory (the torch backend; the default speaker)")
    p.add_argument("--backends", default="ort-cpu", help=f"comma-separated, of {', '.join(BENCH_BACKENDS)}")
    p.add_argument("--texts", type=Path, help="a UTF-8 file, one text per line (default: texts of 1, 3, 10 segments)")
    p.add_argument("--speaker", type=Path, help="speaker reference (default: CKPT/examples/speaker.wav)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpt-tokens", type=int, default=DEFAULT_GPT_TOKENS, help="codes generated per segment (fixed)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--chunk-frames", type=int, default=DEFAULT_FIRST_CHUNK_FRAMES,
                   help="mel frames of a segment's first vocoder chunk (later chunks double)")
    p.add_argument("--max-chunk-frames", type=int, default=DEFAULT_MAX_CHUNK_FRAMES, help="largest vocoder chunk")
    p.add_argument("--no-pipeline", action="store_true",
                   help="stream without the GPT-ahead worker (every stage in the caller's thread)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results-stream"), help="folder for results.json/.md")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """The checked settings; every refusal is an InputError naming the flag (nothing is loaded yet)."""
    from runtime.errors import InputError
    from runtime.manifest import read_manifest
    from runtime.streaming.chunks import StreamSettings
    from runtime.streaming.vocoder import VocoderPlanner

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if not backends or unknown or len(set(backends)) != len(backends):
        raise InputError(f"--backends {args.backends!r}: choose from {', '.join(BENCH_BACKENDS)}, each once")
    if "torch" in backends and args.checkpoints is None:
        raise InputError("the torch backend needs --checkpoints CKPT (the eager models are loaded from it)")
    if not (args.engines / "manifest.json").is_file():
        raise InputError(f"{args.engines}: no manifest.json; build it with python -m export.build --out {args.engines}")
    if args.repeats < 1 or args.gpt_tokens < 2:
        raise InputError(f"--repeats must be >= 1 and --gpt-tokens >= 2, got {args.repeats} and {args.gpt_tokens}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.chunk_frames <= 0:
        raise InputError(f"--chunk-frames must be > 0 mel frames, got {args.chunk_frames}")
    stream = StreamSettings.chunks(args.chunk_frames, args.max_chunk_frames,      # refuses max < first
                                   pipeline=not args.no_pipeline)
    manifest = read_manifest(args.engines, check_files=False)
    VocoderPlanner.from_manifest(manifest, stream.vocoder, where=str(args.engines))
    texts, intended = tuple(t for t, _ in DEFAULT_TEXTS), tuple(n for _, n in DEFAULT_TEXTS)
    if args.texts is not None:
        if not args.texts.is_file():
            raise InputError(f"--texts {args.texts}: file not found")
        texts = tuple(t.strip() for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip())
        if not texts:
            raise InputError(f"--texts {args.texts}: no text in it")
        intended = (None,) * len(texts)
    speaker = args.speaker or (args.checkpoints / "examples" / "speaker.wav" if args.checkpoints else None)
    if speaker is None or not Path(speaker).is_file():
        raise InputError(f"speaker reference {speaker}: file not found (pass --speaker ref.wav)")
    return Settings(args.engines, args.checkpoints, backends, texts, intended, Path(speaker), stream, args.repeats,
                    args.gpt_tokens, args.threads, args.seed)


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import ToolkitError

    from .console import progress_printer, setup_logging
    from .report import _write
    from .stream_report import markdown, streaming_section

    args = parse_args(argv)
    setup_logging(args.verbose)
    progress = progress_printer()

    try:
        settings = settings_from(args)
        results = run(settings, progress)
        args.out.mkdir(parents=True, exist_ok=True)
        paths = [args.out / "results.json", args.out / "results.md"]
        _write(paths[0], _json(results))
        _write(paths[1], markdown(results))
    except (ToolkitError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(streaming_section(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _json(results: dict[str, Any]) -> str:
    import json

    return json.dumps(results, indent=2, default=str) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
