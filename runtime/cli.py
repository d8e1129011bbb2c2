"""`python -m runtime synthesize|inspect`: the torch-free command line.

    python -m runtime synthesize --engines OUT --speaker ref.wav --text "..." --out out.wav [--stream]
    python -m runtime inspect OUT [--hashes]

`synthesize` runs every mode of upstream's `infer` (voice cloning, emotion audio + alpha, emotion
vector, emotion from text) on the graphs of an export directory with the chosen backend, shows progress
per segment, and writes a 22.05 kHz 16-bit WAV: atomically, or with `--stream` progressively (each
vocoder chunk appended as soon as it is ready, each chunk's arrival printed against the audio already
delivered, underruns flagged; runtime/streaming/). Any failure leaves no output file. Sampling and Euler flags that are not given take the export's recorded defaults
(manifest.json `sampling` / `synthesis`), so a checkpoint's own defaults reach the user; the effective
settings are printed before synthesis. `inspect` prints the manifest, the graphs and which backends can run
them here.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from runtime.cli_args import (
    attach_negative_values,
    add_generation_args,
    add_input_args,
    decoder_settings,
    describe_settings,
    generation_config,
    given_generation_flags,
    manifest_defaults,
    synthesis_request,
)
from runtime.errors import InputError, ToolkitError
from runtime.executors import AUTO_ORDER, BACKENDS, OrtOptions, backend_status
from runtime.gpt.generate import GenerationConfig
from runtime.manifest import file_problems, read_manifest
from runtime.request import DecoderSettings
from runtime.streaming.chunks import DEFAULT_FIRST_CHUNK_FRAMES, DEFAULT_MAX_CHUNK_FRAMES, StreamSettings
from runtime.streaming.playback import PlaybackClock
from runtime.wav import StreamingWavWriter, check_output_path, write_wav_atomic

log = logging.getLogger("runtime")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description="IndexTTS2 on exported graphs "
                                     "(ONNX Runtime or TensorRT), without PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthesize", help="text + speaker reference -> WAV")
    syn.add_argument("--engines", type=Path, required=True, help="export directory (python -m export.build --out)")
    add_input_args(syn)
    add_generation_args(syn)
    b = syn.add_argument_group("backend")
    b.add_argument("--backend", default="auto", help=f"one of {', '.join(BACKENDS)} (auto: first usable of "
                   f"{' > '.join(AUTO_ORDER)})")
    b.add_argument("--threads", type=int, default=0, help="CPU threads of ONNX Runtime and OpenVINO (0: their default)")
    b.add_argument("--engine-precision", choices=("fp32", "fp16", "int8", "bf16"), default=None,
                   help="which graph form to run: the TensorRT plans, and the ONNX graphs ONNX Runtime loads (default: "
                        "the export's precision on trt and ort-cuda, fp32 on ort-cpu); on ov-cpu OpenVINO's precision "
                        "hint, fp32 (default) or bf16")
    b.add_argument("--cpu-plan-fallback", action="store_true",
                   help="with --backend cpu-auto: run ONNX Runtime float32 (with a warning) when the export has no CPU "
                        "plan measured on this CPU for these graphs, instead of refusing")
    b.add_argument("--normalizer", default="auto", choices=("auto", "wetext", "fallback"),
                   help="text normalizer backend")
    st = syn.add_argument_group("streaming")
    st.add_argument("--stream", action="store_true",
                    help="write the audio as it is produced (vocoder chunks), print when each chunk arrived and "
                         "whether playback would have run dry")
    st.add_argument("--chunk-frames", type=int, default=DEFAULT_FIRST_CHUNK_FRAMES,
                    help="mel frames of a segment's first vocoder chunk with --stream (256 samples each; later "
                         "chunks double up to --max-chunk-frames)")
    st.add_argument("--max-chunk-frames", type=int, default=DEFAULT_MAX_CHUNK_FRAMES,
                    help="largest vocoder chunk with --stream, in mel frames")
    syn.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    syn.add_argument("-v", "--verbose", action="store_true", help="also show the segments the text was cut into")
    ins = sub.add_parser("inspect", help="show an export directory: manifest, graphs, usable backends")
    ins.add_argument("engines", type=Path, help="export directory")
    ins.add_argument("--hashes", action="store_true", help="also check every file's sha256 (reads them all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(attach_negative_values(list(sys.argv[1:] if argv is None else argv)))
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("runtime").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        if args.command == "synthesize":
            return synthesize(args)
        return inspect(args)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def synthesize(args: argparse.Namespace) -> int:
    from runtime.synthesizer import Synthesizer

    t0 = time.perf_counter()
    request = synthesis_request(args)            # every argument checked before anything is loaded
    generation, decoder = effective_settings(args)
    streaming = stream_settings(args)
    if not args.quiet:
        given = given_generation_flags(args)
        print(f"settings: {describe_settings(generation, decoder)} (the export's defaults"
              + (f"; given: {' '.join(given)})" if given else ")"), flush=True)
    if args.threads < 0:
        raise ToolkitError(f"--threads must be >= 0, got {args.threads}")
    check_output_path(args.out)
    tts = Synthesizer(args.engines, args.backend, ort_options=OrtOptions(intra_op_threads=args.threads or None),
                      normalizer=args.normalizer, emo_text_max_new_tokens=args.emo_text_max_tokens,
                      engine_precision=args.engine_precision, cpu_plan_fallback=args.cpu_plan_fallback)
    try:
        if args.verbose:
            show_segments(tts, request)
        t_loaded, segments, samples, emotion = _run(tts, args, request, generation, decoder, streaming)
    finally:
        tts.close()
    wall = time.perf_counter() - t_loaded
    seconds = samples / tts.sample_rate
    codes = sum(s.codes.size for s in segments)
    rtf = f", RTF {wall / seconds:.2f}" if seconds > 0 else ""
    source = f", emotion from {emotion}" if emotion != "streamed" else ""
    print(f"wrote {args.out}: {seconds:.2f} s of audio, {len(segments)} segment(s), {codes} codes{source}; "
          f"backend {tts.backend}, load {t_loaded - t0:.1f} s, synthesis {wall:.1f} s{rtf}")
    return 0


def effective_settings(args: argparse.Namespace) -> tuple[GenerationConfig, DecoderSettings]:
    """The sampling and Euler settings `synthesize` runs with: the export's recorded defaults (read from
    its manifest alone, no graph opened, so a bad flag fails before anything is loaded) overridden by the
    flags that were given."""
    if not args.engines.exists():
        raise InputError(f"{args.engines}: engine directory not found; create it with "
                         "python -m export.build --checkpoints CKPT --out DIR")
    generation, decoder = manifest_defaults(read_manifest(args.engines, check_files=False))
    return generation_config(args, generation), decoder_settings(args, decoder)


def stream_settings(args: argparse.Namespace) -> StreamSettings:
    """The vocoder chunking of a --stream run (checked against the export's vocoder before loading anything);
    without --stream, whole segments."""
    if not args.stream:
        return StreamSettings.whole_segments()
    if args.chunk_frames <= 0:
        raise InputError(f"--chunk-frames must be > 0 mel frames, got {args.chunk_frames}")
    settings = StreamSettings.chunks(args.chunk_frames, args.max_chunk_frames)
    from runtime.streaming.vocoder import VocoderPlanner

    manifest = read_manifest(args.engines, check_files=False)
    VocoderPlanner.from_manifest(manifest, settings.vocoder, where=str(args.engines))
    return settings


def show_segments(tts, request) -> None:
    """--verbose: the segments the text was cut into (where quick_streaming_tokens moved the boundaries)."""
    segments = tts.segments(request)
    print(f"{len(segments)} segment(s) (at most {request.max_text_tokens_per_segment} tokens each; "
          f"quick_streaming_tokens {request.quick_streaming_tokens}):", flush=True)
    for i, ids in enumerate(segments):
        pieces = tts.tokenizer.convert_ids_to_tokens(ids)
        text = "".join(pieces).replace("\u2581", " ").strip()
        print(f"  {i + 1}: {len(ids):3d} tokens  {text[:90]}{'...' if len(text) > 90 else ''}", flush=True)


def _run(tts, args: argparse.Namespace, request, generation, decoder,
         streaming: StreamSettings) -> tuple[float, list, int, str]:
    """Synthesize and write the WAV (streamed or atomic) -> (start time, segments, samples, emotion source)."""
    t_loaded = time.perf_counter()
    if not args.stream:
        result = tts.synthesize(request, generation, decoder, seed=args.seed, settings=streaming)
        write_wav_atomic(args.out, result.pcm, result.sample_rate)
        return t_loaded, result.segments, result.pcm.size, result.emotion.source
    segments = []
    clock = PlaybackClock(tts.sample_rate)
    with StreamingWavWriter(args.out, tts.sample_rate) as writer:
        for chunk in tts.stream(request, generation, decoder, seed=args.seed, settings=streaming):
            writer.write(chunk.pcm)
            arrival = clock.add(chunk.ready_s, chunk.samples)
            if chunk.result is not None:
                segments.append(chunk.result)
            if not args.quiet and arrival is not None:
                print(_arrival_line(chunk, arrival), flush=True)
        samples = writer.samples
    if not args.quiet:
        stalls = clock.underruns
        print(f"stream: {len(clock.arrivals)} chunks, first audio after {clock.first_audio_s or 0:.2f} s, "
              f"{len(stalls)} underrun(s)" + (f" ({clock.stall_s:.2f} s of gaps)" if stalls else ""), flush=True)
    return t_loaded, segments, samples, "streamed"


def _arrival_line(chunk, arrival) -> str:
    what = "silence" if chunk.kind == "silence" else f"segment {chunk.segment + 1}/{chunk.segments}"
    head = f"chunk {chunk.index + 1:3d} ({what}): ready at {chunk.ready_s:7.2f} s, {arrival.duration_s:5.2f} s of audio"
    if arrival.index == 0:
        return head + "  <- first audio"
    if arrival.underrun:
        return head + f"  UNDERRUN: playback ran dry {-arrival.buffered_s:.2f} s before it arrived"
    return head + f"  ({arrival.buffered_s:.2f} s of audio still buffered)"


def inspect(args: argparse.Namespace) -> int:
    root = args.engines
    manifest = read_manifest(root, check_files=False)
    problems = file_problems(manifest, root, check_hashes=args.hashes)
    ck = manifest.checkpoint
    print(f"export directory: {root}")
    print(f"checkpoint: {ck.path} (config sha256 {ck.config_sha256[:12]}, {len(ck.files)} files)")
    print(f"contract version {manifest.contract_version}, manifest format {manifest.format_version}, "
          f"engine precision {manifest.precision}")
    d = manifest.dims
    print(f"model: GPT {d.layers} layers x {d.heads} heads x {d.head_dim}, width {d.model_dim}, "
          f"{d.vocab} mel codes; semantic width {d.sem_dim}")
    print("tools: " + ", ".join(f"{k} {v}" for k, v in manifest.tools.items()))
    print("graphs:")
    for name, entry in manifest.graphs.items():
        path = entry.path(root)
        size = path.stat().st_size if path.is_file() else 0
        size += sum((path.parent / f).stat().st_size for f in entry.external_data if (path.parent / f).is_file())
        ins = ", ".join(f"{t.name}{_shape(t.shape)}" for t in entry.inputs if not t.name.startswith("kv_cache."))
        caches = sum(t.name.startswith("kv_cache.") for t in entry.inputs)
        if caches:
            ins += f", kv_cache.0..{caches - 1}"
        outs = ", ".join(f"{t.name}{_shape(t.shape)}" for t in entry.outputs)
        ranges = ", ".join(f"{a} {r.min}..{r.opt}..{r.max}" for a, r in entry.ranges.items())
        print(f"  {name:20s} {size / 2**20:9.1f} MiB  ({ins}) -> ({outs})  [{ranges}]")
        for kind, form in entry.forms.items():
            fpath = root / form.file
            fsize = fpath.stat().st_size if fpath.is_file() else 0
            fsize += sum((fpath.parent / f).stat().st_size for f in form.external_data if (fpath.parent / f).is_file())
            counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in form.counts.items())
            stale = "" if form.made_from == entry.sha256 else "  (STALE: made from another float32 file)"
            print(f"  {'':20s} {fsize / 2**20:9.1f} MiB  {kind} form {form.file}: {counts}; policy "
                  f"{Path(form.policy).name or '?'} ({form.policy_sha256[:12]}){stale}")
            if form.note:
                print(f"  {'':20s} {'':9s}      ({form.note})")
    shared = manifest.shared_gpt
    if shared is not None:
        stale = "" if shared.current(manifest.graphs) else "  (STALE: made from other GPT graphs; not used)"
        print(f"shared GPT graph (ONNX Runtime CPU, one session): {shared.file}, branches {', '.join(shared.branches)}, "
              f"{shared.shared_bytes / 2**30:.2f} GiB of weights held once{stale}")
    show_cpu_plan(root, manifest)
    assets = manifest.assets
    print("runtime assets: " + (", ".join(f"{k} {v.file}" for k, v in assets.files().items()) or "none "
                                "(re-run export.build)")
          + f"; emotion LLM: {assets.emotion_llm or 'none'}")
    print("backends:")
    for name in (b for b in BACKENDS if b != "auto"):
        status = backend_status(name, root)
        print(f"  {name:9s} {'yes' if status.ok else 'no '}  {status.detail}")
    if problems:
        print("problems:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("files: all present" + (" and matching their sha256" if args.hashes else ""))
    return 0


def show_cpu_plan(root: Path, manifest) -> None:
    """The export's CPU plan (cpu_plan.json): per graph the choice, every candidate's time and the gate."""
    from runtime.cpu_plan import CpuPlan, plan_path, read_plan, this_cpu

    path = plan_path(root)
    if not path.is_file():
        print("CPU plan: none (python -m benchmarks.cpu_plan --engines DIR measures one on this machine)")
        return
    try:
        plan = read_plan(root, manifest)
        valid = "valid here"
    except ToolkitError as err:
        import json

        try:
            plan = CpuPlan.from_json(json.loads(path.read_text()))
        except Exception:  # noqa: BLE001 — shown, not raised: inspect reports
            print(f"CPU plan: {path}: unreadable ({err})")
            return
        valid = f"NOT valid here: {err}"
    print(f"CPU plan ({path.name}, {plan.created or 'undated'}; {valid}):")
    print(f"  measured on {plan.cpu.describe()}, {plan.threads or 'default'} thread(s); "
          + ", ".join(f"{k} {v}" for k, v in plan.versions.items()))
    if plan.cpu != this_cpu():
        print(f"  this machine: {this_cpu().describe()}")
    for name, g in plan.graphs.items():
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in g.timings_ms.items())
        print(f"  {name:20s} {g.choice.label:13s} [{times}]" + (f"  {g.reason}" if g.reason else ""))
    if plan.gates:
        print("  end-to-end gates of the plan: " + ", ".join(f"{k} {v}" for k, v in plan.gates.items()
                                                          if not isinstance(v, (dict, list))))


def _shape(shape: Sequence[object]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"
