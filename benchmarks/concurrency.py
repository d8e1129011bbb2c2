"""Many requests at once: what batching concurrent requests into shared graph calls buys, per level.

    python -m benchmarks.concurrency --engines OUT [--checkpoints CKPT] [--backend ort-cpu] \
        [--levels 1,2,4,8] [--beams 1,3] [--gpt-tokens 40] [--rounds 2] [--euler-steps 25] \
        [--threads N] [--out benchmarks/results-concurrency]

Three measurements, in one run on one Synthesizer (speaker cached, one unmeasured warm-up of each):
1. The hardware's ceiling: ONE `gpt_decode` call at R rows (R = every row count the GPT levels use, and
   1..24) over a 256-position cache, median of DECODE_RUNS calls: what a step of R rows cannot beat.
2. GPT phase, per beam count and level c: c generations submitted together to the scheduler's GPT worker
   (each its own request's conditioning, text and random stream; the stop token hidden so each makes
   exactly --gpt-tokens codes, benchmarks/backends.py:FixedLengthSteps): tokens/s = c x tokens / wall from
   submit to the last one's end (prefills and latent passes included, which run alone), decode tokens/s
   = c / the median steady step (all c decoding), their ratios to c = 1, and the scheduler's step against
   the graph call inside it (median of step / call over the steady steps).
3. End to end, per level c: c client threads issue requests back to back (closed loop), --rounds
   requests each (c = 1 is the sequential baseline); requests/s, latency p50 / p95 and the time to the
   first chunk (whole segments, the default synthesize()).
Results: OUT/results.json (machine, settings, every number), OUT/results.md (the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import BENCH_BACKENDS, open_backend

log = logging.getLogger("benchmarks")

DECODE_RUNS = 7
CACHE_POSITIONS = 256
CEILING_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24)
TEXT = ("Many people ask the same voice to read their messages at the same time, and a server answers them all "
        "together instead of one after another.")


@dataclass(frozen=True)
class Settings:
    engines: Path
    checkpoints: Path | None
    backend: str
    levels: tuple[int, ...]
    beams: tuple[int, ...]
    gpt_tokens: int                 # codes per generation in the GPT-phase measurement
    e2e_tokens: int                 # codes per request end to end
    gpt_rounds: int                 # sweeps of the GPT-phase levels (medians over them)
    rounds: int
    euler_steps: int
    threads: int | None
    speaker: Path
    seed: int


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


def decode_ceiling(synth: Any, rows_list: list[int]) -> dict[int, float]:
    """Median seconds of one gpt_decode call at each row count (cache of CACHE_POSITIONS, half filled)."""
    from runtime.contracts import kv_cache_name

    g = synth.gpt_steps.geometry
    out: dict[int, float] = {}
    for rows in rows_list:
        feed = {kv_cache_name(i): np.zeros((2, rows, g.heads, CACHE_POSITIONS, g.head_dim), np.float32)
                for i in range(g.layers)}
        mask = np.zeros((rows, CACHE_POSITIONS), np.float32)
        mask[:, :CACHE_POSITIONS // 2] = 1.0
        feed.update(kv_mask=mask, mel_ids=np.full((rows, 1), 5, np.int64),
                    mel_pos=np.full((rows, 1), CACHE_POSITIONS // 2, np.int64))
        synth.gpt_steps.decode(feed)                                         # warm-up (and buffer binding)
        times = []
        for _ in range(DECODE_RUNS):
            t0 = time.perf_counter()
            synth.gpt_steps.decode(feed)
            times.append(time.perf_counter() - t0)
        out[rows] = statistics.median(times)
    return out


def gpt_phase(synth: Any, level: int, beams: int, settings: Settings) -> dict[str, Any]:
    """`level` generations submitted at once to the GPT worker -> tokens/s and step overhead."""
    from runtime.request import SynthesisRequest
    from runtime.scheduler.workers import GptJob

    generation = dataclasses.replace(synth.generation_defaults, num_beams=beams, max_mel_tokens=settings.gpt_tokens)
    request = SynthesisRequest(text=TEXT, speaker=settings.speaker)
    jobs = []
    for i in range(level):
        prep = synth.prepare(request, settings.seed + i)
        jobs.append(GptJob(prep.condition, prep.emovec, np.asarray(prep.segments[0], np.int64), generation,
                           prep.streams.gpt, 0, synth.gpt_steps))
    worker = synth.scheduler.gpt
    batch = worker.batch
    mark = len(batch.timeline) if batch is not None else 0
    calls = (batch.prefill_calls if batch is not None else 0, worker.latent_calls)
    t0 = time.perf_counter()
    futures = [worker.submit(job) for job in jobs]
    outputs = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    tokens = sum(int(o.codes.result.codes.size) for o in outputs)
    steps = list(batch.timeline)[mark:] if batch is not None else []
    full = [s for s in steps if s[0] == level * beams]                        # every generation decoding
    ratios = [s[3] / s[2] for s in full]
    return {"level": level, "beams": beams, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "steps": len(steps), "steady_steps": len(full), "rows": level * beams,
            "prefill_calls": (batch.prefill_calls if batch is not None else 0) - calls[0],
            "latent_calls": worker.latent_calls - calls[1],
            "decode_rows": full[0][1] if full else None,
            "call_s_median": statistics.median([s[2] for s in full]) if full else None,
            "step_s_median": statistics.median([s[3] for s in full]) if full else None,
            "step_over_call": statistics.median(ratios) if ratios else None}


def median_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One (beams, level) over its rounds: the median of each measured number (the round with the median
    tokens/s for the rest); `rounds` keeps every round's tokens/s."""
    chosen = sorted(records, key=lambda r: r["tokens_per_s"])[len(records) // 2]
    out = dict(chosen)
    for key in ("tokens_per_s", "wall_s", "call_s_median", "step_s_median", "step_over_call"):
        values = [r[key] for r in records if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["rounds"] = [r["tokens_per_s"] for r in records]
    return out


def end_to_end(synth: Any, level: int, settings: Settings) -> dict[str, Any]:
    """`level` client threads, `rounds` requests each, back to back."""
    from runtime.request import DecoderSettings, SynthesisRequest

    generation = dataclasses.replace(synth.generation_defaults, max_mel_tokens=settings.e2e_tokens)
    decoder = DecoderSettings(steps=settings.euler_steps)
    request = SynthesisRequest(text=TEXT, speaker=settings.speaker)
    latencies: list[float] = []
    first_audio: list[float] = []
    audio = [0.0]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(settings.rounds):
            t0 = time.perf_counter()
            try:
                first = None
                samples = 0
                for chunk in synth.stream(request, generation, decoder, seed=settings.seed + 100 * c + r):
                    if first is None and chunk.samples:
                        first = time.perf_counter() - t0
                    samples += chunk.samples
            except BaseException as err:  # noqa: BLE001 — reported
                errors.append(err)
                return
            with lock:
                latencies.append(time.perf_counter() - t0)
                first_audio.append(first or 0.0)
                audio[0] += samples / synth.sample_rate

    threads = [threading.Thread(target=client, args=(c,)) for c in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    n = len(latencies)
    return {"level": level, "requests": n, "wall_s": wall, "requests_per_s": n / wall, "audio_s": audio[0],
            "rtf": wall / audio[0] if audio[0] else None,
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "first_audio_p50_s": percentile(first_audio, 50), "first_audio_p95_s": percentile(first_audio, 95)}


def run(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    from .stages import machine

    opened = open_backend(settings.backend, settings.engines, settings.checkpoints, settings.threads)
    synth = opened.synth
    try:
        progress(f"{settings.backend}: loaded in {opened.load_s:.1f} s")
        rows_used = sorted({lv * b for lv in settings.levels for b in settings.beams} | set(CEILING_ROWS))
        ceiling = decode_ceiling(synth, rows_used)
        progress("decode call: " + ", ".join(f"{r} rows {s * 1e3:.0f} ms" for r, s in ceiling.items()))
        gpt_phase(synth, 1, settings.beams[0], settings)                       # warm-up
        rounds: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for r in range(settings.gpt_rounds):      # every (beams, level) once per round: drift hits them alike
            for beams in settings.beams:
                for level in settings.levels:
                    rec = gpt_phase(synth, level, beams, settings)
                    rounds.setdefault((beams, level), []).append(rec)
                    progress(f"GPT phase, round {r + 1}, {beams} beam(s), {level} at once: "
                             f"{rec['tokens_per_s']:.1f} tokens/s, step/call {rec['step_over_call'] or float('nan'):.3f}")
        gpt = [median_record(recs) for recs in rounds.values()]
        e2e_settings = dataclasses.replace(settings, rounds=1)
        end_to_end(synth, 1, e2e_settings)                                     # warm-up
        e2e = []
        for level in settings.levels:
            rec = end_to_end(synth, level, settings)
            e2e.append(rec)
            progress(f"end to end, {level} client(s): {rec['requests_per_s'] * 60:.2f} requests/min, latency p50 "
                     f"{rec['latency_p50_s']:.1f} s p95 {rec['latency_p95_s']:.1f} s")
        sched = synth.scheduler
        return {"machine": machine(), "settings": {k: str(v) for k, v in dataclasses.asdict(settings).items()},
                "backend": settings.backend, "load_s": opened.load_s,
                "decode_rows_bound": sched.gpt_rows, "euler_rows": sched.mel.euler.max_rows,
                "decode_ceiling_s": {str(k): v for k, v in ceiling.items()}, "gpt_phase": gpt, "end_to_end": e2e}
    finally:
        synth.close()


def markdown(results: dict[str, Any]) -> str:
    ceiling = results["decode_ceiling_s"]
    st = results["settings"]
    lines = [f"### Concurrency ({results['backend']}, GPT phase {st['gpt_tokens']} codes per generation, end to end "
             f"{st.get('e2e_tokens', st['gpt_tokens'])} codes per request)", "",
             "One `gpt_decode` call (256-position cache): " +
             ", ".join(f"{r} rows {s * 1e3:.0f} ms" for r, s in ceiling.items()) + ".", "",
             "Tokens/s of the whole GPT phase count each generation's prefill and latent pass (shared by "
             "generations of equal lengths) in the wall time; decode tokens/s = requests at once / the median steady step (every "
             "generation decoding: one token each per step).", "",
             "| beams | requests at once | decode rows | GPT phase tokens/s | × alone | decode tokens/s | × alone | "
             "step / graph call | one call at these rows |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["beams"]: r["tokens_per_s"] for r in results["gpt_phase"] if r["level"] == 1}
    decode = {(r["beams"], r["level"]): r["level"] / r["step_s_median"] if r["step_s_median"] else None
              for r in results["gpt_phase"]}
    for r in results["gpt_phase"]:
        ratio = r["step_over_call"]
        call = ceiling.get(str(r["rows"]))
        dec, dec1 = decode[(r["beams"], r["level"])], decode.get((r["beams"], 1))
        lines.append(f"| {r['beams']} | {r['level']} | {r['rows']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base[r['beams']]:.2f} | {'n/a' if dec is None else f'{dec:.1f}'} | "
                     f"{'n/a' if dec is None or not dec1 else f'{dec / dec1:.2f}'} | "
                     f"{'n/a' if ratio is None else f'{ratio:.3f}'} | {'n/a' if call is None else f'{call * 1e3:.0f} ms'} |")
    lines += ["", "| clients | requests | requests/min | × sequential | latency p50 | p95 | first audio p50 | p95 | RTF |",
              "|---|---|---|---|---|---|---|---|---|"]
    seq = next((r["requests_per_s"] for r in results["end_to_end"] if r["level"] == 1), None)
    for r in results["end_to_end"]:
        lines.append(f"| {r['level']} | {r['requests']} | {r['requests_per_s'] * 60:.2f} | "
                     f"{r['requests_per_s'] / seq if seq else float('nan'):.2f} | {r['latency_p50_s']:.1f} s | "
                     f"{r['latency_p95_s']:.1f} s | {r['first_audio_p50_s']:.1f} s | {r['first_audio_p95_s']:.1f} s | "
                     f"{r['rtf']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", required=True, type=Path, help="export directory (python -m export.build --out)")
    p.add_argument("--checkpoints", type=Path, help="checkpoint directory (the torch backend; the default speaker)")
    p.add_argument("--backend", default="ort-cpu", choices=BENCH_BACKENDS)
    p.add_argument("--levels", default="1,2,4,8", help="requests at once, comma-separated")
    p.add_argument("--beams", default="1,3", help="beam counts of the GPT-phase measurement")
    p.add_argument("--gpt-tokens", type=int, default=40, help="codes per generation in the GPT-phase measurement "
                                                              "(fixed: the demo weights never stop)")
    p.add_argument("--e2e-tokens", type=int, help="codes per request end to end (default: --gpt-tokens)")
    p.add_argument("--gpt-rounds", type=int, default=1, help="sweeps of the GPT-phase levels, interleaved; each "
                                                              "number is the median over them")
    p.add_argument("--rounds", type=int, default=2, help="end to end: requests per client")
    p.add_argument("--euler-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for ONNX Runtime")
    p.add_argument("--speaker", type=Path, help="speaker reference (default: CKPT/examples/speaker.wav, or the "
                                                "export's example)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results-concurrency"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    def ints(text: str, what: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError as err:
            raise ValueError(f"--{what}: comma-separated integers, got {text!r}") from err
        if not values or min(values) < 1:
            raise ValueError(f"--{what}: integers >= 1, got {text!r}")
        return values

    speaker = args.speaker or (args.checkpoints / "examples" / "speaker.wav" if args.checkpoints else None)
    if speaker is None or not speaker.is_file():
        raise ValueError(f"speaker reference not found ({speaker}); pass --speaker or --checkpoints")
    e2e_tokens = args.e2e_tokens if args.e2e_tokens is not None else args.gpt_tokens
    if args.gpt_tokens < 2 or e2e_tokens < 2 or args.rounds < 1 or args.gpt_rounds < 1:
        raise ValueError("--gpt-tokens and --e2e-tokens must be >= 2, --rounds and --gpt-rounds >= 1")
    return Settings(args.engines, args.checkpoints, args.backend, ints(args.levels, "levels"),
                    ints(args.beams, "beams"), args.gpt_tokens, e2e_tokens, args.gpt_rounds, args.rounds,
                    args.euler_steps, args.threads, speaker, args.seed)


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import ToolkitError

    from .console import progress_printer, setup_logging
    from .report import _write

    args = parse_args(argv)
    setup_logging(args.verbose)
    progress = progress_printer()
    try:
        settings = settings_from(args)
        results = run(settings, progress)
        args.out.mkdir(parents=True, exist_ok=True)
        import json

        paths = [args.out / "results.json", args.out / "results.md"]
        _write(paths[0], json.dumps(results, indent=2, default=str) + "\n")
        _write(paths[1], markdown(results))
    except (ToolkitError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
