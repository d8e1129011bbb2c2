"""The streaming benchmark's runs (benchmarks/stream.py) summarized per backend and text, and as Markdown.

Every latency is summarized as p50 and p95 over the repeats (benchmarks.measure.Percentiles; nearest
rank, so with fewer than 20 repeats p95 is the largest run, and the report says so). Ratios (TTFA over
the offline first segment) are taken per round, then summarized, so both sides of each ratio saw the
same machine state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .measure import Percentiles
from .report import _fmt_ms

OFFLINE, STREAMED = "offline", "streamed"


def _pct(values: Sequence[float | None]) -> dict[str, Any] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    p = Percentiles.of(got)
    return {**dataclasses.asdict(p), "p95_is_max": p.p95_is_max}


def _text_summary(runs: dict[str, list[dict[str, Any]]], text: dict[str, Any]) -> dict[str, Any]:
    off, st = runs[OFFLINE], runs[STREAMED]
    segments = st[0]["segments"]
    return {
        "text": text["index"], "segments": {OFFLINE: off[0]["segments"], STREAMED: segments},
        "audio_s": {OFFLINE: off[0]["audio_s"], STREAMED: st[0]["audio_s"]},
        "offline_first_s": _pct([r["first_segment_s"] for r in off]),
        "offline_wall_s": _pct([r["wall_s"] for r in off]),
        "ttfa_s": _pct([r["ttfa_s"] for r in st]),
        "ttfa_over_offline_first": _pct([r["ttfa_over_offline_first"] for r in st]),
        "streamed_wall_s": _pct([r["wall_s"] for r in st]),
        "chunks": _pct([r["chunks"] for r in st]),
        "speech_gap_p50_s": _pct([Percentiles.of(r["speech_gaps_s"]).p50 for r in st if r["speech_gaps_s"]]),
        "speech_gap_max_s": max((g for r in st for g in r["speech_gaps_s"]), default=None),
        "underruns": _pct([r["underruns"] for r in st]),
        "stall_s": _pct([r["stall_s"] for r in st]),
        "euler_end_s": _pct([r["euler_end_s"] for r in st]),
        "first_audio_minus_euler_end_s": _pct([r["ttfa_s"] - r["euler_end_s"] for r in st
                                               if r["euler_end_s"] is not None]),
        "first_chunk_after_euler_s": [_pct([r["first_chunk_after_euler_s"][k] for r in st]) for k in range(segments)],
    }


def _criterion(texts: list[dict[str, Any]], chunk: dict[str, Any], limit: float) -> dict[str, Any] | None:
    """First audio − Euler end of the first one-segment text, in vocoder chunks (None without such a text)."""
    one = next((t for t in texts if t["segments"][STREAMED] == 1), None)
    if one is None or one["first_audio_minus_euler_end_s"] is None:
        return None
    diff = one["first_audio_minus_euler_end_s"]["p50"]
    chunk_s = chunk["stats_ms"]["median_ms"] / 1e3
    ratio = diff / chunk_s if chunk_s > 0 else None
    return {"text": one["text"], "euler_end_s": one["euler_end_s"]["p50"], "first_audio_s": one["ttfa_s"]["p50"],
            "difference_s": diff, "vocoder_chunk_s": chunk_s, "chunks": ratio, "limit": limit,
            "met": ratio is not None and ratio <= limit, "n": one["ttfa_s"]["n"]}


def summarize(records: list[dict[str, Any]], texts: list[dict[str, Any]], backends: Sequence[str],
              chunk: dict[str, dict[str, Any]], limit: float) -> dict[str, Any]:
    """backend -> {"texts": one summary per text, "criterion": the one-segment text's line (or None)}."""
    out: dict[str, Any] = {}
    for b in backends:
        summaries = []
        for t in texts:
            runs = {m: [r for r in records if r["backend"] == b and r["text"] == t["index"] and r["mode"] == m]
                    for m in (OFFLINE, STREAMED)}
            summaries.append(_text_summary(runs, t))
        out[b] = {"texts": summaries, "criterion": _criterion(summaries, chunk[b], limit)}
    return out


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else _fmt_ms(seconds * 1e3)


def _p(p: dict[str, Any] | None, fmt=_s) -> str:
    if p is None:
        return "n/a"
    return fmt(p["p50"]) if p["n"] == 1 else f"{fmt(p['p50'])} ({fmt(p['p95'])})"


def _row(backend: str, t: dict[str, Any], s: dict[str, Any]) -> str:
    seg, audio = s["segments"], s["audio_s"]
    same = abs(audio[OFFLINE] - audio[STREAMED]) < 1e-3
    audio_cell = f"{audio[STREAMED]:.2f} s" if same else f"{audio[OFFLINE]:.2f} s → {audio[STREAMED]:.2f} s"
    gaps = "n/a (one speech chunk)" if s["speech_gap_p50_s"] is None else \
        f"{_s(s['speech_gap_p50_s']['p50'])} / {_s(s['speech_gap_max_s'])}"
    under = "n/a" if s["underruns"] is None else \
        f"{s['underruns']['p50']:g} ({s['stall_s']['p50']:.2f} s)"
    wall_off, wall_st = s["offline_wall_s"]["p50"], s["streamed_wall_s"]["p50"]
    ratio = _p(s["ttfa_over_offline_first"], "{:.2f}".format)
    return (f"| {backend} | #{t['index'] + 1}, {t['chars']} chars ({seg[OFFLINE]} → {seg[STREAMED]}) | "
            f"{audio_cell} | {_p(s['offline_first_s'])} | {_p(s['ttfa_s'])} | {ratio} | {gaps} | {under} | "
            f"{_s(wall_st)} vs {_s(wall_off)} ({wall_st / wall_off:.2f}×) |")


def _criterion_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for b, r in results["summary"].items():
        c = r["criterion"]
        if c is None:
            lines.append(f"- {b}: no text of one segment was measured")
            continue
        chunk = results["vocoder_chunk"][b]
        verdict = "n/a" if c["chunks"] is None else \
            f"{c['chunks']:.2f} chunks ({'met' if c['met'] else 'NOT met'}: ≤ {c['limit']})"
        lines.append(f"- {b} (text #{c['text'] + 1}, p50 of n={c['n']}): Euler end {_s(c['euler_end_s'])}, first "
                     f"audio {_s(c['first_audio_s'])}, difference {_s(c['difference_s'])} = {verdict}; one vocoder "
                     f"chunk alone {_s(c['vocoder_chunk_s'])} (median of {chunk['stats_ms']['n']}, "
                     f"{chunk['chunk_samples']} samples from a {chunk['segment_frames']}-frame segment)")
    return lines


def streaming_section(results: dict[str, Any]) -> str:
    """The streaming table and the one-segment criterion lines (printed by the CLI, and in results.md)."""
    s = results["settings"]
    n = s["repeats"]
    p95 = f"p95 of n={n} = max" if n < 20 else f"p95 of n={n}, nearest rank"
    st = s["stream"]
    lines = ["## Streaming", "",
             f"p50 ({p95}) over {n} repeat(s) per backend and text; speaker cached, one unmeasured run of each "
             f"mode first, backends and modes interleaved round by round. GPT fixed at {s['gpt_tokens']} codes per "
             f"segment; {s['euler_steps']} Euler steps; {s['threads']} CPU thread(s). Offline: one vocoder call per "
             f"segment, quick_streaming_tokens {s['quick_streaming_tokens'][OFFLINE]}, first segment = when its audio "
             f"is ready. Streamed: vocoder chunks of {st['first_chunk_frames']} mel frames doubling to "
             f"{st['max_chunk_frames']}, quick_streaming_tokens {s['quick_streaming_tokens'][STREAMED]}, "
             + ("the next segment's GPT ahead in a worker thread" if st.get("pipeline", True)
                else "no GPT-ahead worker (--no-pipeline)") + "; TTFA = the first chunk ready. Gaps are between consecutive "
             "speech chunks (the silence between segments is sent at once); underruns and stall as a player that "
             "starts with the first chunk hears them (p50 count, p50 seconds of silence).", "",
             "| backend | text (segments offline → streamed) | audio | offline first segment | TTFA p50 (p95) | "
             "TTFA / offline first | chunk gaps p50 / max | underruns (stall s) | wall streamed vs offline |",
             "|---|---|---|---|---|---|---|---|---|"]
    texts = {t["index"]: t for t in results["texts"]}
    for b, r in results["summary"].items():
        lines += [_row(b, texts[x["text"]], x) for x in r["texts"]]
    lines += ["", f"One-segment text: first audio − Euler end (segment 1's mel ready), in vocoder chunks (the "
              f"first window of a segment's plan, timed alone); criterion ≤ {s['criterion_chunks']}:", ""]
    return "\n".join(lines + _criterion_lines(results)) + "\n"



def markdown(results: dict[str, Any]) -> str:
    lines = [streaming_section(results), "## First chunk after the Euler end, per segment", "",
             "p50 over the repeats of (segment's first chunk ready − its Euler solve ended): its first vocoder "
             "chunk, plus any wait for the vocoder.", "",
             "| backend | text | per segment |", "|---|---|---|"]
    for b, r in results["summary"].items():
        for x in r["texts"]:
            cells = ", ".join(_s(p["p50"]) if p else "n/a" for p in x["first_chunk_after_euler_s"])
            lines.append(f"| {b} | #{x['text'] + 1} | {cells} |")
    lines += ["", "## Texts", ""]
    for t in results["texts"]:
        want = "" if t["intended_segments"] is None else f", written for {t['intended_segments']}"
        head = t["text"][:80] + ("…" if len(t["text"]) > 80 else "")
        lines.append(f"- #{t['index'] + 1}: {t['chars']} chars, {t['segments'][OFFLINE]} segment(s) offline, "
                     f"{t['segments'][STREAMED]} streamed{want}: {head}")
    m = results["machine"]
    lines += ["", "## Machine", "",
              f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB; {m['os']}; Python "
              f"{m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + f"; GPU: {m['gpu']}."]
    return "\n".join(lines) + "\n"
