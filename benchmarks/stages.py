"""Per-stage latency, end-to-end real-time factor and time to first audio, side by side per backend.

    python -m benchmarks.stages --engines OUT --checkpoints CKPT --backends torch,ort-cpu[,trt] \
        [--engines OUT25 --checkpoints CKPT25] [--texts FILE] [--repeats N] [--gpt-tokens 60] [--threads 2] \
        [--out benchmarks/results]

Several exports (`--engines` repeated, e.g. an IndexTTS2 2.0 and a 2.5 export, each with its `--checkpoints`
in the same order) are measured in the same run: one column per export and backend ("2.0 ort-cpu",
"2.5 ort-cpu"), each export on its own recorded inputs; the stages a version does not have stay empty.

What is measured (every backend loaded in this process at once, on the same inputs, after warm-up; the
runs of the backends interleaved round by round, so that the machine's drift is shared by every column):
- each graph on the feeds one synthesis sent it (recorded once, on the first backend): the speaker
  preparation graphs, the GPT prefill, one GPT decode step (mid-generation, the request's beams), the
  S_infer pass (2.0: the GPT latent; 2.5: the codec decoder), the length regulator, one DiT step and BigVGAN; the host front-ends (audio loading,
  resampling, features; shared numpy code);
- the GPT decode loop at a fixed length (`--gpt-tokens`, the stop token masked: see backends.py), the
  time per token it implies and the GPT time per second of audio (2.0 makes 50 codes a second of audio,
  2.5 25: the per-token cost alone hides that difference); the whole Euler solve;
- per text: end-to-end synthesis (speaker cached, as in a service that keeps its voices warm), its RTF
  (wall time / audio duration) and the time until the first segment's audio is ready (streaming);
  peak resident memory during synthesis and the memory the backend's models take;
- the decode step's roofline (benchmarks/roofline.py) at the memory bandwidth measured in this run.
Results: OUT/results.json, OUT/results.md (tables), OUT/results.png (chart; needs matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import BENCH_BACKENDS, OpenedBackend, decode_call, open_backend, recorded_feeds
from .measure import PeakTracker, Stats, measure_interleaved, memory_bandwidth_gbs, trim_heap
from .roofline import Roofline

log = logging.getLogger("benchmarks")

DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    # long enough for two segments at upstream's 120 text tokens per segment, so first audio < whole request
    "Text to speech turns written words into sound. This benchmark times every stage of it, from the reference "
    "audio to the waveform, on each backend in turn, on the same inputs, after one run to warm up. The GPT is held to a "
    "fixed number of codes, so that every backend does the same amount of work whatever its sampling draws. "
    "Speed alone is not the goal: the compiled graphs must agree with the eager model first, and only then be "
    "fast. The numbers in this table are medians of several runs, with the fastest and the slowest beside them.",
)
# (stage label, graph, which recorded call; None: the decode call kept, backends.decode_call) in pipeline order.
# A version measures the stages whose graph its export has (2.0: semantic codec, speaker conditioner, GPT
# latent; 2.5: the codec decoder instead, runtime/contracts.py graph_names).
GRAPH_STAGES = (
    ("semantic encoder (w2v-BERT)", "semantic_encoder", 0),
    ("semantic codec", "semantic_codec", 0),
    ("CAMPPlus", "campplus", 0),
    ("speaker conditioner", "speaker_conditioner", 0),
    ("emotion conditioner", "emotion_conditioner", 0),
    ("GPT prefill", "gpt_prefill", 0),
    ("GPT decode step (graph)", "gpt_decode", None),
    ("GPT latent (2.0 S_infer)", "gpt_latent", 0),
    ("codec decoder (2.5 S_infer)", "semantic_decoder", 0),
    ("length regulator", "length_regulator", 1),
    ("DiT step (CFG batch 2)", "dit_step", 0),
    ("BigVGAN", "bigvgan", 0),
)
PER_TOKEN = "GPT decode per token (in loop)"
PER_AUDIO_SECOND = "GPT per second of audio (prefill + decode)"


# Stage timing floors (measure()): fast stages are repeated for at least this long
STAGE_MIN_SECONDS = 2.0
STAGE_WARMUP_SECONDS = 0.5


@dataclass(frozen=True)
class Export:
    """One export directory to measure (and the checkpoint its torch backend loads)."""

    engines: Path
    checkpoints: Path | None
    version: str                    # the manifest's model version ("2.0", "2.5")
    label: str = ""                 # the column prefix when several exports are measured


@dataclass
class Settings:
    exports: tuple[Export, ...]
    backends: tuple[str, ...]
    texts: tuple[str, ...]
    speaker: Path
    repeats: int = 3
    gpt_tokens: int = 60
    threads: int | None = None
    seed: int = 0
    stage_seconds: float = STAGE_MIN_SECONDS




@dataclass
class Workload:
    """Inputs shared by every backend of one export, made once on its first backend."""

    feeds: dict[str, dict[int | None, dict[str, np.ndarray]]]
    gpt_condition: dict[str, np.ndarray]
    emovec: np.ndarray
    text_ids: np.ndarray
    condition: np.ndarray
    ref_mel: np.ndarray
    style: np.ndarray
    noise: np.ndarray
    beams: int
    decode_cache_len: int
    codes_per_audio_second: float   # 2.0: ~50, 2.5: ~25 (at duration factor 1)


@dataclass
class Column:
    """One measured column: a backend on one export, and the inputs recorded for that export."""

    label: str                      # "ort-cpu", or "2.5 ort-cpu" when several exports are measured
    export: Export
    backend: OpenedBackend
    work: Workload


@dataclass
class BackendResult:
    name: str
    load_s: float
    models_mib: float | None
    stages: dict[str, Stats] = field(default_factory=dict)
    e2e: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _generation(synth: Any, tokens: int) -> Any:
    return dataclasses.replace(synth.generation_defaults, max_mel_tokens=tokens)


def make_workload(backend: OpenedBackend, settings: Settings) -> Workload:
    """One synthesis on `backend` (opened with record=True) -> the feeds of every graph of its export and the
    inputs of the loop stages. S_infer and the target mel length go through the synthesizer's own seams
    (the scheduler's S_infer pass, Synthesizer.mel_frames), so each version is fed as it runs."""
    from runtime.cfm import regulate
    from runtime.gpt.s_infer import Finished
    from runtime.request import SynthesisRequest

    synth = backend.synth
    request = SynthesisRequest(text=settings.texts[0], speaker=settings.speaker)
    gen = _generation(synth, settings.gpt_tokens)
    prep = synth.prepare(request, seed=settings.seed)
    seg = synth.segment(prep, 0, gen)
    feeds = recorded_feeds(backend)
    kept = decode_call(settings.gpt_tokens)
    feeds["gpt_decode"] = {None: feeds.get("gpt_decode", {}).get(kept)} if kept in feeds.get("gpt_decode", {}) else {}
    missing = [g for _, g, call in GRAPH_STAGES if g in synth.manifest.graphs and call not in feeds.get(g, {})]
    if missing:
        raise RuntimeError(f"the recording synthesis did not call {missing} as expected")
    codes = np.asarray(seg.codes, np.int64)
    s_infer = synth.scheduler.gpt.s_infer.run([Finished(prep.condition, prep.emovec, np.asarray(seg.text_ids),
                                                        codes)])
    frames = synth.mel_frames(request, codes.size)
    cond = regulate(synth.graphs["length_regulator"], s_infer, frames)
    prompt = prep.prompt
    condition = np.concatenate([prompt.prompt_condition, cond], axis=1)
    noise = np.random.default_rng(settings.seed).standard_normal((1, prompt.ref_mel.shape[1], condition.shape[1]),
                                                                 dtype=np.float32)
    decode = feeds["gpt_decode"][None]
    many = 1000                                     # codes -> seconds of audio, at the request's duration factor
    audio_s = synth.mel_frames(request, many) * synth.manifest.synthesis.hop_length / synth.sample_rate
    return Workload(feeds, dict(prep.condition), prep.emovec, np.asarray(seg.text_ids), condition, prompt.ref_mel,
                    prompt.style, noise, int(decode["mel_ids"].shape[0]), int(decode["kv_mask"].shape[1]),
                    many / audio_s)


def measure_all(columns: list[Column], settings: Settings, progress: Callable[[str], None]) -> list[BackendResult]:
    """Every stage, then end to end, for all columns at once: runs interleaved round by round
    (measure.measure_interleaved), so the machine's drift is shared by all columns."""
    from runtime.frontend.audio import load_audio
    from runtime.cfm import euler_solve
    from runtime.frontend.features import campplus_features, seamless_features
    from runtime.gpt.generate import generate
    from runtime.frontend.mel import s2mel_mel
    from runtime.request import SynthesisRequest
    from runtime.frontend.resample import resample_sinc
    from runtime.speaker import SEMANTIC_SR, SPEAKER_SR

    results = {c.label: BackendResult(c.label, c.backend.load_s, None) for c in columns}

    def stage(label: str, fns: dict[str, Callable[[], object]], timed: bool = True) -> None:
        if not fns:
            return
        progress(label)
        if timed:
            out = measure_interleaved(fns, settings.repeats, 1, min_seconds=settings.stage_seconds,
                                      warmup_seconds=min(STAGE_WARMUP_SECONDS, settings.stage_seconds))
        else:
            out = measure_interleaved(fns, settings.repeats, 1)
        for name, stats in out.items():
            results[name].stages[label] = stats

    def front_ends() -> None:
        audio = load_audio(settings.speaker, SPEAKER_SR)
        audio_16k = resample_sinc(audio, SPEAKER_SR, SEMANTIC_SR)
        seamless_features(audio_16k[0])
        s2mel_mel(audio)
        campplus_features(audio_16k[0])

    stage("front-ends (host, shared code)", {c.label: front_ends for c in columns})
    for label, graph, call in GRAPH_STAGES:
        fns = {}
        for c in columns:
            if graph not in c.backend.synth.manifest.graphs:
                continue                                     # not in this version's graph set
            if c.backend.name == "trt" and graph == "gpt_decode":
                results[c.label].notes.append(f"{c.label}: GPT decode step (graph) not timed alone on trt (its KV "
                                              "cache lives on the device; the per-token time in the loop is the "
                                              "comparable one)")
                continue
            fns[c.label] = (lambda ex, feed: lambda: ex.run(feed))(c.backend.synth.graphs[graph],
                                                                   c.work.feeds[graph][call])
        stage(label, fns)

    beams = sorted({c.work.beams for c in columns})
    loop_label = f"GPT generate ({settings.gpt_tokens} tokens, {'/'.join(map(str, beams))} beam(s))"
    stage(loop_label, {c.label: (lambda synth, work: lambda: generate(
        synth.gpt_steps, work.gpt_condition, work.emovec, work.text_ids, _generation(synth, settings.gpt_tokens),
        seed=settings.seed))(c.backend.synth, c.work) for c in columns}, timed=False)
    for c in columns:
        r = results[c.label]
        # every token after the first costs one decode step (and the loop's host work: sampling, cache)
        loop, prefill, steps = r.stages[loop_label], r.stages["GPT prefill"].median_ms, settings.gpt_tokens - 1
        r.stages[PER_TOKEN] = Stats(
            (loop.median_ms - prefill) / steps, (loop.min_ms - prefill) / steps, (loop.max_ms - prefill) / steps,
            loop.n)
        # the whole loop (prefill included) per second of the audio its codes make
        per_second = c.work.codes_per_audio_second / settings.gpt_tokens
        r.stages[PER_AUDIO_SECOND] = Stats(loop.median_ms * per_second, loop.min_ms * per_second,
                                           loop.max_ms * per_second, loop.n)
    steps = sorted({c.backend.synth.decoder_defaults.steps for c in columns})
    stage(f"Euler solve ({'/'.join(map(str, steps))} DiT steps)", {c.label: (lambda synth, work: lambda: euler_solve(
        synth.graphs["dit_step"], work.condition, work.ref_mel, work.style, work.noise,
        synth.decoder_defaults.steps, synth.decoder_defaults.cfg_rate))(c.backend.synth, c.work)
        for c in columns}, timed=False)

    for text in settings.texts:
        progress(f"end to end, {len(text)} characters")
        request = SynthesisRequest(text=text, speaker=settings.speaker)
        runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in columns}
        for c in columns:                                    # warm-up (and the speaker cache)
            c.backend.synth.synthesize(request, _generation(c.backend.synth, settings.gpt_tokens), seed=settings.seed)
        for rnd in range(settings.repeats):
            for c in (columns if rnd % 2 == 0 else columns[::-1]):
                runs[c.label].append(_one_synthesis(c.backend.synth, request, settings))
        for c in columns:
            rs = runs[c.label]
            wall = Stats.of([r["wall_s"] for r in rs])
            seconds = rs[0]["audio_s"]
            peaks = [r["peak"] for r in rs]
            results[c.label].e2e.append({
                "text_chars": len(text), "segments": rs[0]["segments"], "audio_s": seconds,
                "wall": dataclasses.asdict(wall), "first_audio": dataclasses.asdict(Stats.of([r["first_s"] for r in rs])),
                "rtf": wall.median_ms / 1e3 / seconds if seconds else None,
                "peak_rss_mib": max((p.peak_mib for p in peaks if p.peak_mib is not None), default=None),
                "synthesis_extra_mib": max((p.extra_mib for p in peaks if p.extra_mib is not None), default=None),
                "peak_since_process_start": any(p.since_start_of_process for p in peaks),
            })
    return [results[c.label] for c in columns]


def _one_synthesis(synth: Any, request: Any, settings: Settings) -> dict[str, Any]:
    """One streamed synthesis: wall time, time to the first segment's audio, audio length, peak memory."""
    with PeakTracker() as peak:
        t0 = time.perf_counter()
        first, samples, segments = None, 0, 0
        for seg in synth.synthesize_segments(request, _generation(synth, settings.gpt_tokens), seed=settings.seed):
            if first is None:
                first = time.perf_counter() - t0
            samples += seg.pcm.size
            segments = seg.count
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "first_s": first or 0.0, "audio_s": samples / synth.sample_rate, "segments": segments,
            "peak": peak.result}


def machine() -> dict[str, Any]:
    """What this was measured on."""
    import platform

    from runtime.trt import gpu

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "onnxruntime", "openvino", "torch", "tensorrt"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 — absent is fine
            versions[mod] = None
    probe = gpu.tensorrt()
    from runtime.cpu_plan import this_cpu

    return {"cpu": cpu, "cpu_flags": list(this_cpu().flags), "logical_cpus": os.cpu_count(), "memory_gib": mem_gib, "os": platform.platform(),
            "python": platform.python_version(), "versions": versions, "gpu": probe.detail}


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    from runtime.manifest import read_manifest

    columns: list[Column] = []
    models: dict[str, float | None] = {}
    manifests = {}
    try:
        for export in settings.exports:
            manifests[export] = read_manifest(export.engines)
            work: Workload | None = None
            for name in settings.backends:
                label = f"{export.label} {name}" if export.label else name
                progress(f"{label}: loading")
                gc.collect()
                trim_heap()
                before = _rss()
                backend = open_backend(name, export.engines, export.checkpoints, settings.threads,
                                       record=work is None, record_decode_call=decode_call(settings.gpt_tokens))
                after = backend.rss_mib_after_load
                models[label] = None if before is None or after is None else after - before
                if work is None:
                    progress(f"{label}: recording the inputs of every stage")
                    work = make_workload(backend, settings)
                columns.append(Column(label, export, backend, work))
        results = measure_all(columns, settings, progress)
    finally:
        for c in columns:
            close = getattr(c.backend.synth, "close", None)
            if close is not None:
                close()
    for r in results:
        r.models_mib = models[r.name]
    progress("memory bandwidth")
    bandwidth = memory_bandwidth_gbs()
    first = columns[0]
    manifest = manifests[first.export]
    # one roofline: the decode graph of every version is the same GPT core (UPSTREAM-2.5: 24 x 1280, same KV)
    roof = Roofline.of(manifest.graph("gpt_decode").path(first.export.engines), first.work.feeds["gpt_decode"][None],
                       bandwidth)
    return {
        "machine": machine(),
        "settings": {"engines": str(first.export.engines), "checkpoint": manifest.checkpoint.path,
                     "checkpoint_config_sha256": manifest.checkpoint.config_sha256, "model": _model(manifest),
                     "exports": [{"engines": str(e.engines), "version": e.version,
                                  "checkpoint": manifests[e].checkpoint.path, "model": _model(manifests[e])}
                                 for e in settings.exports],
                     "backends": list(settings.backends), "repeats": settings.repeats,
                     "warmup": f"stages: >= 1 run and >= {min(STAGE_WARMUP_SECONDS, settings.stage_seconds)} s; "
                               "loops and end to end: 1 run",
                     "stage_min_seconds": settings.stage_seconds,
                     "gpt_tokens": settings.gpt_tokens, "beams": first.work.beams, "threads": settings.threads,
                     "decode_cache_len": first.work.decode_cache_len, "euler_steps": manifest.synthesis.euler_steps,
                     "texts": list(settings.texts),
                     "fixed_gpt_length": f"the stop token is masked, so every backend generates exactly "
                                         f"{settings.gpt_tokens} codes per segment"},
        "backends": {r.name: {"backend": c.backend.name, "version": c.export.version,
                              "codes_per_audio_second": c.work.codes_per_audio_second,
                              "load_s": r.load_s, "models_mib": r.models_mib, "notes": r.notes,
                              "stages": {k: dataclasses.asdict(v) for k, v in r.stages.items()}, "e2e": r.e2e}
                     for r, c in zip(results, columns)},
        "roofline": {"bandwidth_gbs": roof.bandwidth_gbs, **dataclasses.asdict(roof.bytes),
                     "weights_ms": roof.weights_ms, "weights_and_kv_ms": roof.weights_and_kv_ms,
                     "measured_by": "numpy copy of 512 MiB, one thread, bytes read + written, best of 5"},
    }


def _model(manifest: Any) -> dict[str, int]:
    d = manifest.dims
    return {"gpt_layers": d.layers, "gpt_model_dim": d.model_dim, "gpt_heads": d.heads}


def _rss() -> float | None:
    from .measure import rss_mib

    return rss_mib()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", required=True, type=Path, action="append",
                   help="export directory (python -m export.build --out); repeat it to measure several exports "
                        "(e.g. 2.0 and 2.5) in one run")
    p.add_argument("--checkpoints", type=Path, action="append",
                   help="checkpoint directory (needed by the torch backend; the speaker default); one per "
                        "--engines, in the same order")
    p.add_argument("--backends", default="torch,ort-cpu", help=f"comma-separated, of {', '.join(BENCH_BACKENDS)}")
    p.add_argument("--texts", type=Path, help="a UTF-8 file, one text per line (default: two built-in texts)")
    p.add_argument("--speaker", type=Path, help="speaker reference (default: CKPT/examples/speaker.wav)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpt-tokens", type=int, default=60, help="codes generated per segment (fixed)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage-seconds", type=float, default=STAGE_MIN_SECONDS,
                   help="repeat each fast stage for at least this long (up to 50 runs)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for results.json/.md/.png")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    from runtime.errors import InputError
    from runtime.manifest import read_manifest

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if not backends or unknown:
        raise InputError(f"--backends {args.backends!r}: choose from {', '.join(BENCH_BACKENDS)}")
    engines = list(args.engines)
    checkpoints = list(args.checkpoints or [])
    if checkpoints and len(checkpoints) != len(engines):
        raise InputError(f"{len(engines)} --engines but {len(checkpoints)} --checkpoints: give one checkpoint "
                         "directory per export, in the same order (or none)")
    if "torch" in backends and not checkpoints:
        raise InputError("the torch backend needs --checkpoints CKPT (the eager models are loaded from it)")
    exports = []
    for i, root in enumerate(engines):
        if not (root / "manifest.json").is_file():
            raise InputError(f"{root}: no manifest.json; build it with python -m export.build --out {root}")
        exports.append(Export(root, checkpoints[i] if checkpoints else None, read_manifest(root).version))
    versions = [e.version for e in exports]
    if len(exports) > 1:                    # column prefixes: the versions, or the folders when a version repeats
        names = versions if len(set(versions)) == len(versions) else [str(e.engines) for e in exports]
        if len(set(names)) != len(names):
            raise InputError(f"--engines {', '.join(map(str, engines))}: the same export twice")
        exports = [dataclasses.replace(e, label=n) for e, n in zip(exports, names)]
    texts = DEFAULT_TEXTS
    if args.texts is not None:
        if not args.texts.is_file():
            raise InputError(f"--texts {args.texts}: file not found")
        texts = tuple(t.strip() for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip())
        if not texts:
            raise InputError(f"--texts {args.texts}: no text in it")
    speaker = args.speaker or (checkpoints[0] / "examples" / "speaker.wav" if checkpoints else None)
    if speaker is None or not Path(speaker).is_file():
        raise InputError(f"speaker reference {speaker}: file not found (pass --speaker ref.wav)")
    if args.repeats < 1 or args.gpt_tokens < 2:
        raise InputError("--repeats must be >= 1 and --gpt-tokens >= 2")
    if args.stage_seconds < 0:
        raise InputError("--stage-seconds must be >= 0")
    return Settings(tuple(exports), backends, texts, Path(speaker), args.repeats, args.gpt_tokens,
                    args.threads, args.seed, args.stage_seconds)


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import ToolkitError

    from .console import progress_printer, setup_logging
    from .report import write_reports

    args = parse_args(argv)
    setup_logging(args.verbose)
    progress = progress_printer()

    try:
        settings = settings_from(args)
        results = run(settings, progress)
        paths = write_reports(results, args.out)
    except (ToolkitError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
