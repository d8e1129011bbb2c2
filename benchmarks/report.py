"""A benchmark's results (the dict benchmarks/stages.py returns) as JSON, a Markdown table and a PNG chart.

Ratios are against eager PyTorch (`torch`) of the same export when it was measured: backend median / torch
median, so 0.5 means twice as fast as eager. With several exports measured in one run (IndexTTS2 2.0 and
2.5), each backend also gets the later versions against the first one, stage by stage. The chart needs matplotlib (the `bench` extra); without it the PNG is
skipped with a note.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
REFERENCE = "torch"


def _fmt_ms(ms: float | None) -> str:
    if ms is None or ms != ms:
        return "n/a"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.0f} ms"
    return f"{ms:.2f} ms"


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "n/a"
    return f"{_fmt_ms(stats['median_ms'])} ({_fmt_ms(stats['min_ms'])}–{_fmt_ms(stats['max_ms'])})"


def stage_names(results: dict[str, Any]) -> list[str]:
    """Every column's stages in pipeline order: a stage only some columns have (another version's graph)
    goes right after the stage it follows in those columns."""
    names: list[str] = []
    for backend in results["backends"].values():
        previous = None
        for name in backend["stages"]:
            if name not in names:
                names.insert(names.index(previous) + 1 if previous is not None else 0, name)
            previous = name
    return names


def reference_of(results: dict[str, Any], column: str) -> str:
    """The eager column a column is compared with: `torch` of the same export ("2.5 ort-cpu" -> "2.5 torch")."""
    backend = results["backends"][column].get("backend", column)
    prefix = column[:-len(backend)] if column.endswith(backend) else ""
    return prefix + REFERENCE


def ratio(results: dict[str, Any], backend: str, stage: str, reference: str | None = None) -> float | None:
    """backend median / reference median of one stage (None without both); the reference defaults to the
    eager column of the same export."""
    ref_name = reference if reference is not None else reference_of(results, backend)
    ref = results["backends"].get(ref_name, {}).get("stages", {}).get(stage)
    got = results["backends"][backend]["stages"].get(stage)
    if not ref or not got or not ref["median_ms"] or ref["median_ms"] != ref["median_ms"]:
        return None
    return got["median_ms"] / ref["median_ms"]


#: CPU columns also compared with ONNX Runtime float32 of the same export (issue 22: the plan's targets)
CPU_COMPARED = ("cpu-auto", "ov-cpu")
CPU_BASE = "ort-cpu"


def cpu_pairs(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(column, its export's ort-cpu column) for every cpu-auto / ov-cpu column that has one."""
    cols = results["backends"]
    pairs = []
    for name, col in cols.items():
        backend = col.get("backend", name)
        if backend in CPU_COMPARED:
            base = name[:-len(backend)] + CPU_BASE if name.endswith(backend) else CPU_BASE
            if base in cols:
                pairs.append((name, base))
    return pairs


def version_pairs(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(title, column, first-version column) for each backend measured on the first export and a later one."""
    exports = results["settings"].get("exports") or []
    if len(exports) < 2:
        return []
    cols = results["backends"]
    first = exports[0]["version"]
    pairs = []
    for e in exports[1:]:
        for name, col in cols.items():
            base = [n for n, c in cols.items() if c.get("backend") == col.get("backend") and c.get("version") == first]
            if col.get("version") == e["version"] and base:
                pairs.append((f"{e['version']} / {first} ({col['backend']})", name, base[0]))
    return pairs


def markdown(results: dict[str, Any]) -> str:
    backends = list(results["backends"])
    others = [b for b in backends if reference_of(results, b) != b and reference_of(results, b) in backends]
    pairs = version_pairs(results)
    s = results["settings"]
    m = results["machine"]
    lines = ["## Per stage", "",
             f"Median (min–max) of at least {s['repeats']} runs, fast stages repeated for at least "
             f"{s.get('stage_min_seconds', 0)} s (up to 50 runs), after warm-up ({s['warmup']}); "
             f"{s['threads']} CPU thread(s); GPT fixed at "
             f"{s['gpt_tokens']} codes per segment ({s['fixed_gpt_length']}), {s['beams']} beam(s); decode step "
             f"at a {s['decode_cache_len']}-row KV cache; {s['euler_steps']} Euler steps.", ""]
    for e in s.get("exports") or []:
        if len(s["exports"]) > 1:
            lines.append(f"- IndexTTS2 {e['version']}: `{e['engines']}` (checkpoint `{e['checkpoint']}`)")
    if pairs:
        per_s = ", ".join(f"{b} {results['backends'][b]['codes_per_audio_second']:.2f}" for b in backends
                          if "codes_per_audio_second" in results["backends"][b])
        lines += ["", f"Codes per second of audio: {per_s}. Stages a version does not run are empty; the "
                  "version ratio columns are later / first version of the same backend.", ""]
    cpu = cpu_pairs(results)
    head = (["stage"] + backends + [f"{b} / {reference_of(results, b)}" for b in others] + [p[0] for p in pairs]
            + [f"{b} / {base}" for b, base in cpu])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in stage_names(results):
        row = [stage] + [_cell(results["backends"][b]["stages"].get(stage)) if stage in results["backends"][b]["stages"]
                         else "–" for b in backends]
        for b in others:
            r = ratio(results, b, stage)
            row.append("–" if stage not in results["backends"][b]["stages"] else "n/a" if r is None else f"{r:.2f}×")
        for _, b, base in pairs:
            r = ratio(results, b, stage, base)
            row.append("–" if r is None else f"{r:.2f}×")
        for b, base in cpu:
            r = ratio(results, b, stage, base)
            row.append("–" if r is None else f"{r:.2f}×")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## End to end", "",
              "Speaker reference cached (a service keeps its voices warm); first audio = the first segment's "
              "audio ready. Peak RSS: of the whole process (every backend loaded). Models: resident memory added "
              "by loading the backend, the C heap trimmed before and after (benchmarks/measure.py trim_heap).", "",
              "| backend | text | segments | audio | wall | RTF | first audio | peak RSS | models |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b in backends:
        r = results["backends"][b]
        for e in r["e2e"]:
            models = "n/a" if r["models_mib"] is None else f"{r['models_mib'] / 1024:.2f} GiB"
            peak = "n/a" if e["peak_rss_mib"] is None else f"{e['peak_rss_mib'] / 1024:.2f} GiB"
            rtf = "n/a" if e["rtf"] is None else f"{e['rtf']:.2f}"
            lines.append(f"| {b} | {e['text_chars']} chars | {e['segments']} | {e['audio_s']:.2f} s | "
                         f"{_cell(e['wall'])} | {rtf} | {_cell(e['first_audio'])} | {peak} | {models} |")
    for b, base in cpu:
        ref = reference_of(results, b)
        eager = results["backends"].get(ref)
        lines += ["", f"End to end, {b} against {base}" + (f" and {ref}" if eager else "") +
                  ": speed-up of the wall time (how many times faster), same texts.", "",
                  f"| text | {b} wall | × vs {base} | × vs {ref} |", "|---|---|---|---|"]
        for k, e in enumerate(results["backends"][b]["e2e"]):
            e_base = results["backends"][base]["e2e"][k]
            e_ref = eager["e2e"][k] if eager and k < len(eager["e2e"]) else None
            x_base = e_base["wall"]["median_ms"] / e["wall"]["median_ms"] if e["wall"]["median_ms"] else None
            x_ref = (e_ref["wall"]["median_ms"] / e["wall"]["median_ms"]
                     if e_ref is not None and e["wall"]["median_ms"] else None)
            lines.append(f"| {e['text_chars']} chars, {e['segments']} segment(s) | {_cell(e['wall'])} | "
                         f"{'n/a' if x_base is None else f'{x_base:.2f}×'} | {'n/a' if x_ref is None else f'{x_ref:.2f}×'} |")
    for title, b, base in pairs:
        lines += ["", f"End to end, {title}: wall time and RTF of the same texts.", "",
                  "| text | wall | RTF | audio |", "|---|---|---|---|"]
        for e, e0 in zip(results["backends"][b]["e2e"], results["backends"][base]["e2e"]):
            wall = e["wall"]["median_ms"] / e0["wall"]["median_ms"] if e0["wall"]["median_ms"] else None
            rtf = e["rtf"] / e0["rtf"] if e["rtf"] and e0["rtf"] else None
            lines.append(f"| {e['text_chars']} chars | {'n/a' if wall is None else f'{wall:.2f}×'} | "
                         f"{'n/a' if rtf is None else f'{rtf:.2f}×'} | {e['audio_s'] / e0['audio_s']:.2f}× |")
    roof = results["roofline"]
    lines += ["", "## Decode-step roofline", "",
              f"Memory bandwidth measured in this run: {roof['bandwidth_gbs']:.1f} GB/s ({roof['measured_by']}). "
              f"Bytes a decode step must read: weights {roof['weights'] / 2**20:.1f} MiB (gathered tables, one "
              f"row each, excluded: {roof['gathered_tables'] / 2**20:.1f} MiB), KV cache "
              f"{roof['kv_cache'] / 2**20:.1f} MiB.", "",
              "| line | time per step |", "|---|---|",
              f"| roofline, weights | {_fmt_ms(roof['weights_ms'])} |",
              f"| roofline, weights + KV cache | {_fmt_ms(roof['weights_and_kv_ms'])} |"]
    for b in backends:
        st = results["backends"][b]["stages"]
        step = st.get("GPT decode step (graph)")
        if step:
            lines.append(f"| {b} decode step (graph) | {_fmt_ms(step['median_ms'])} = "
                         f"{step['median_ms'] / roof['weights_ms']:.2f}× the weights line |")
        loop = st.get("GPT decode per token (in loop)")
        if loop:
            lines.append(f"| {b} per token in the loop | {_fmt_ms(loop['median_ms'])} |")
    notes = [n for b in backends for n in results["backends"][b]["notes"]]
    if notes:
        lines += ["", "Notes: " + " ".join(notes)]
    lines += ["", "## Machine", "",
              f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB; {m['os']}; Python "
              f"{m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + f"; GPU: {m['gpu']}."]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> bool:
    """Grouped horizontal bars (log scale) of each stage's median per backend -> whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no chart")
        return False
    backends = list(results["backends"])
    stages = stage_names(results)
    height = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(stages) + 1.5))
    for i, b in enumerate(backends):
        ys = [k + i * height for k in range(len(stages))]
        xs = [results["backends"][b]["stages"].get(s, {}).get("median_ms", 0) or 0 for s in stages]
        ax.barh(ys, xs, height=height, label=b)
    ax.set_yticks([k + height * (len(backends) - 1) / 2 for k in range(len(stages))])
    ax.set_yticklabels(stages, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median latency (ms, log scale)")
    s = results["settings"]
    ax.set_title(f"IndexTTS2 stages per backend ({s['threads']} threads, GPT fixed at {s['gpt_tokens']} codes)",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_reports(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.md and (with matplotlib) results.png in `out` -> the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    _write(paths[0], json.dumps(results, indent=2, default=str) + "\n")
    _write(paths[1], markdown(results))
    png = out / "results.png"
    if chart(results, png):
        paths.append(png)
    return paths
