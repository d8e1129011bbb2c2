"""Model memory per backend, each loaded alone in a fresh process.

    python -m benchmarks.memory --engines OUT [--checkpoints CKPT] --backends torch,ort-cpu[,cpu-auto,...] \
        [--threads N] [--out DIR]

Why a process per backend: in one process the first load's freed temporaries (state dicts, converted copies)
stay mapped by the C heap and the next load reuses them, so a backend's resident memory depends on what was
loaded before it. Here each backend is loaded in its own `python -m benchmarks.memory --child NAME` with the
interpreter, numpy and the runtimes imported before the baseline, and reports:
- resident memory added by the load (VmRSS), split into anonymous memory and mapped files (RssAnon, RssFile:
  OpenVINO maps the ONNX weight files; those pages are the file's and are counted while mapped);
- the same after the C heap is trimmed (benchmarks/measure.py trim_heap): what the loaded backend holds;
- the peak during the load (VmHWM).
Results: OUT/memory.json and OUT/memory.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .backends import BENCH_BACKENDS

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def measure_child(name: str, engines: Path, checkpoints: Path | None, threads: int | None) -> dict[str, Any]:
    """In this (fresh) process: load `name` and report what it added."""
    import numpy  # noqa: F401 — imported before the baseline: not the model's memory
    import onnxruntime  # noqa: F401

    from .backends import open_backend
    from .measure import status_gib, trim_heap

    if name == "torch":
        import torch  # noqa: F401
    gc.collect()
    trim_heap()
    before = status_gib(FIELDS)
    t0 = time.perf_counter()
    opened = open_backend(name, engines, checkpoints, threads)     # trims the heap itself before its reading
    load_s = time.perf_counter() - t0
    after = status_gib(FIELDS)
    del opened
    return {"backend": name, "load_s": round(load_s, 1), "before_gib": before, "after_gib": after,
            "added_gib": {k: after[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile") if k in after},
            "peak_gib": after.get("VmHWM")}


def measure(backends: list[str], engines: Path, checkpoints: Path | None, threads: int | None,
            progress: Any = print) -> list[dict[str, Any]]:
    """Each backend in its own child process, one after the other."""
    rows = []
    for name in backends:
        progress(f"{name}: loading in a fresh process")
        cmd = [sys.executable, "-m", "benchmarks.memory", "--child", name, "--engines", str(engines)]
        if checkpoints is not None:
            cmd += ["--checkpoints", str(checkpoints)]
        if threads:
            cmd += ["--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            rows.append({"backend": name, "error": tail})
            progress(f"{name}: failed: {tail}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        progress(f"{name}: {row['added_gib']['VmRSS']:.2f} GiB resident added")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["Each backend loaded alone in a fresh process (benchmarks/memory.py); resident memory added by the "
             "load, the C heap trimmed before and after.", "",
             "| backend | resident added | anonymous | mapped files | peak during load | load |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | failed: {r['error']} | | | | |")
            continue
        a = r["added_gib"]
        lines.append(f"| {r['backend']} | {a['VmRSS']:.2f} GiB | {a.get('RssAnon', float('nan')):.2f} GiB | "
                     f"{a.get('RssFile', float('nan')):.2f} GiB | {r['peak_gib']:.2f} GiB | {r['load_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--engines", type=Path, required=True)
    p.add_argument("--checkpoints", type=Path, help="checkpoint directory (the torch backend needs it)")
    p.add_argument("--backends", default="torch,ort-cpu", help=f"comma-separated, of {', '.join(BENCH_BACKENDS)}")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import InputError

    from .console import setup_logging

    args = parse_args(argv)
    setup_logging(False)
    if args.child:
        print(json.dumps(measure_child(args.child, args.engines, args.checkpoints, args.threads)))
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        unknown = [b for b in backends if b not in BENCH_BACKENDS]
        if unknown or not backends:
            raise InputError(f"--backends: {unknown or 'none given'}; one or more of {', '.join(BENCH_BACKENDS)}")
        if not (args.engines / "manifest.json").is_file():
            raise InputError(f"{args.engines}: no manifest.json (an export directory of python -m export.build)")
        if "torch" in backends and args.checkpoints is None:
            raise InputError("the torch backend needs --checkpoints (the checkpoint directory)")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = measure(backends, args.engines, args.checkpoints, args.threads)
    md = markdown(rows)
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.json").write_text(json.dumps({"rows": rows}, indent=1))
        (args.out / "memory.md").write_text(md, encoding="utf-8")
        print(f"wrote {args.out / 'memory.json'}, {args.out / 'memory.md'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
