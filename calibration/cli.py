"""python -m calibration collect | analyze | effect | report | int8 | int8-gate

    python -m calibration collect --engines OUT --checkpoints CKPT --out CALIB [--texts FILE] [--reference WAV ...]
    python -m calibration analyze --engines OUT --calib CALIB [--graphs a,b] [--base default|none|FILE]
    python -m calibration effect  --engines OUT --calib CALIB [--effect-variants calibrated,base,none]
    python -m calibration report  --calib CALIB [--out REPORT.md]
    python -m calibration int8 --engines OUT --calib CALIB [--graphs a,b] [--precision-policy FILE] [--items N]
                               [--method minmax|entropy|percentile] [--max-feeds N] [--workspace-gib N]
    python -m calibration int8-gate --engines OUT --calib CALIB [--graphs a,b] [--items N]

`analyze` writes CALIB/analysis.json, CALIB/precision_policy.json (for `python -m export.build
--precision-policy`), CALIB/fp16_bounds.json (what the fp16 graphs made with that policy are held to:
calibration/bounds.py), CALIB/effect.json and the report. `int8` makes every graph's INT8 form (Q/DQ from
the collected feeds on the fp16 form), gates each on the CPU through ONNX Runtime, records the accepted forms
(and the refused graphs' fp16 forms) as the manifest's int8 forms and builds the int8 TensorRT plans where
TensorRT and a GPU exist (calibration/int8_build.py); `int8-gate` judges the recorded INT8 forms again.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from runtime.errors import InputError, ToolkitError

log = logging.getLogger("calibration")


def _progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _base_policy(spec: str):
    from engines.precision import default_policy, load_policy

    if spec == "none":
        return None
    if spec == "default":
        return default_policy()
    return load_policy(spec)


def cmd_collect(args: argparse.Namespace) -> int:
    from .collect import CollectSettings, collect
    from .corpus import default_texts, read_texts, write_default_voices

    texts = read_texts(args.texts) if args.texts else default_texts()
    refs = [Path(r) for r in args.reference] if args.reference else write_default_voices(args.out / "references")
    settings = CollectSettings(backend=args.backend, gpt_tokens=args.gpt_tokens, seed=args.seed,
                               euler_steps=args.euler_steps, threads=args.threads)
    summary = collect(args.engines, args.out, texts, refs, settings, args.checkpoints, _progress)
    print(f"collected {sum(summary.feeds.values())} feeds from {summary.items} syntheses ({summary.segments} "
          f"segments) in {summary.seconds:.0f} s -> {args.out}")
    for g, n in summary.feeds.items():
        print(f"  {g:20s} {n:4d} feeds")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from runtime.manifest import read_manifest

    from .bounds import bounds_record, write_bounds
    from .feeds import FeedStore
    from .fp16_analysis import AnalysisLimits, analysis_json, analyze_graph
    from .policy_writer import calibrated_policy, write_policy
    from .report import ANALYSIS_NAME, EFFECT_NAME, write_report

    store = FeedStore.open(args.calib)
    manifest = read_manifest(args.engines)
    if store.meta.get("dims") and store.meta["dims"] != asdict(manifest.dims):
        raise InputError(f"{args.calib} was collected for a model with other sizes than {args.engines} "
                         f"(dims differ); collect again for this export")
    base = _base_policy(args.base)
    limits = AnalysisLimits(args.headroom, args.error_growth, args.max_rounds, args.max_feeds, args.threads)
    wanted = [g.strip() for g in args.graphs.split(",")] if args.graphs else list(manifest.graphs)
    unknown = [g for g in wanted if g not in manifest.graphs]
    if unknown:
        raise InputError(f"graphs {unknown} are not in {args.engines} (it has {', '.join(manifest.graphs)})")
    graphs = [g for g in wanted if g in store.graphs]
    for g in sorted(set(wanted) - set(graphs)):
        print(f"  {g}: no collected feeds, skipped")
    t0 = time.perf_counter()
    analyses, records = [], []
    record = {"base": args.base, "limits": asdict(limits), "graphs": records}
    for n, g in enumerate(graphs, 1):
        _progress(f"[{n}/{len(graphs)}] analysing {g}")
        a = analyze_graph(g, manifest.graph(g).path(args.engines), store, base, limits, _progress,
                          workdir=args.calib)
        analyses.append(a)
        records.append(analysis_json(a))
        (args.calib / ANALYSIS_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")
        final = a.final
        print(f"  {g}: {a.nodes} layers, calibrated output error {final.worst_output_error():.3g}, "
              f"{final.fp32_layers} fp32 layers ({len(a.measured)} measured)")
    policy = calibrated_policy(base, analyses)
    policy_path = write_policy(policy, args.calib)
    print(f"precision policy -> {policy_path} (sha256 {policy.sha256()[:12]})")
    bounds_path = write_bounds(bounds_record(analyses, policy.sha256()), args.calib)
    print(f"fp16 bounds -> {bounds_path}")
    (args.calib / EFFECT_NAME).unlink(missing_ok=True)      # measured for the previous policy
    if not args.no_effect and graphs == list(manifest.graphs):
        _run_effect(args, store, {"calibrated": policy, "base": base})
    elif not args.no_effect:
        print("  end-to-end effect skipped: it needs every graph analysed (no --graphs)")
    report = write_report(args.calib)
    print(f"report -> {report} ({time.perf_counter() - t0:.0f} s)")
    return 0


EFFECT_LABELS = {"calibrated": "fp16, calibrated policy", "base": "fp16, base policy", "none": "fp16, no fp32 islands"}


def _run_effect(args: argparse.Namespace, store, policies: dict) -> None:
    """Synthesize the chosen items with fp32 graphs and with each variant's fp16-emulated graphs.

    Results are merged into CALIB/effect.json by label (a rerun of one variant replaces only its entry),
    written after every variant so an interrupted run keeps what it measured.
    """
    from engines.precision import PrecisionPolicy

    from .effect import measure_effect, open_synthesizers, pick_items, write_emulated_graphs
    from .report import EFFECT_NAME

    variants = [v.strip() for v in args.effect_variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in EFFECT_LABELS]
    if bad:
        raise InputError(f"effect variants {bad}: each one of {', '.join(EFFECT_LABELS)}")
    policies = dict(policies, none=PrecisionPolicy({}))
    items = pick_items(store.items, args.effect_items)
    gpt_tokens = args.gpt_tokens or store.meta.get("settings", {}).get("gpt_tokens", 48)
    effect_path = args.calib / EFFECT_NAME
    summaries = json.loads(effect_path.read_text(encoding="utf-8"))["variants"] if effect_path.is_file() else []
    for v in variants:
        label = EFFECT_LABELS[v]
        emu_dir = args.calib / f"fp16_emulated_{v}"
        counts = write_emulated_graphs(args.engines, emu_dir, policies[v], progress=_progress)
        ref, test = open_synthesizers(args.engines, emu_dir, args.threads)
        try:
            s = measure_effect(ref, test, items, label, gpt_tokens, progress=_progress)
        finally:
            ref.close()
            test.close()
        entry = s.to_json() | {"fp32_layers": counts,
                               "policy_sha256": policies[v].sha256() if policies[v] is not None else None}
        summaries = [x for x in summaries if x.get("label") != label] + [entry]
        summaries.sort(key=lambda x: list(EFFECT_LABELS.values()).index(x["label"])
                       if x.get("label") in EFFECT_LABELS.values() else len(EFFECT_LABELS))
        tmp = effect_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"variants": summaries}, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(effect_path)
        if not args.keep_emulated:
            shutil.rmtree(emu_dir, ignore_errors=True)
        print(f"  {label}: greedy agreement {100 * s.forced_agreement:.2f}% (teacher-forced), "
              f"{100 * s.free_agreement:.2f}% (free-running), min mel SNR {s.min_mel_snr_db:.1f} dB, "
              f"min wave SNR {s.min_wav_snr_db:.1f} dB")


def cmd_effect(args: argparse.Namespace) -> int:
    """The end-to-end effect alone, for a policy an earlier `analyze` wrote (or any policy file)."""
    from engines.precision import load_policy
    from runtime.manifest import read_manifest

    from .feeds import FeedStore
    from .report import write_report

    store = FeedStore.open(args.calib)
    manifest = read_manifest(args.engines)
    if store.meta.get("dims") and store.meta["dims"] != asdict(manifest.dims):
        raise InputError(f"{args.calib} was collected for a model with other sizes than {args.engines} "
                         f"(dims differ); collect again for this export")
    policy_file = args.policy or args.calib / "precision_policy.json"
    variants = [v.strip() for v in args.effect_variants.split(",") if v.strip()]
    policies = {"base": _base_policy(args.base)}
    if "calibrated" in variants:
        if not Path(policy_file).is_file():
            raise InputError(f"no precision policy at {policy_file}: run `python -m calibration analyze` first "
                             f"or pass --policy")
        policies["calibrated"] = load_policy(policy_file)
    t0 = time.perf_counter()
    _run_effect(args, store, policies)
    print(f"report -> {write_report(args.calib)} ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_shipped
    from .report import write_report

    results = check_shipped(args.engines, args.calib, args.feeds, args.threads, progress=_progress)
    bad = [r.graph for r in results if not r.ok]
    print(f"{len(results) - len(bad)} of {len(results)} fp16 graphs within their bounds"
          + (f"; out of bounds: {', '.join(bad)}" if bad else ""))
    print(f"report -> {write_report(args.calib)}")
    return 1 if bad else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.calib, args.out))
    return 0


def _int8_settings(args: argparse.Namespace):
    from .int8_build import Int8Settings

    graphs = tuple(g.strip() for g in args.graphs.split(",") if g.strip()) if args.graphs else None
    return Int8Settings(items=args.items, graphs=graphs, policy_path=getattr(args, "precision_policy", None),
                        method=getattr(args, "method", "minmax"), max_feeds=getattr(args, "max_feeds", None),
                        workspace_gib=getattr(args, "workspace_gib", 4.0), threads=args.threads)


def cmd_int8(args: argparse.Namespace) -> int:
    from .int8_build import build_int8
    from .report import write_report

    result = build_int8(args.engines, args.calib, _int8_settings(args), progress=_progress)
    print("\n".join(result.lines()))
    print(f"report -> {write_report(args.calib)}")
    print(f"run them with: python -m runtime synthesize --engines {args.engines} --engine-precision int8 "
          f"(--backend trt where the plans exist; --backend ort-cpu runs the forms on the CPU)")
    return 0 if result.ok else 1


def cmd_int8_gate(args: argparse.Namespace) -> int:
    from .int8_build import regate_int8
    from .report import write_report

    result = regate_int8(args.engines, args.calib, _int8_settings(args), progress=_progress)
    print("\n".join(result.lines()[:-1]))
    print(f"report -> {write_report(args.calib)}")
    return 0 if not result.fallbacks else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m calibration", description="Calibration: representative inputs, "
                                "FP16 safety analysis -> precision policy, INT8 forms and their gate.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run the pipeline over the calibration set and keep every graph's feeds")
    c.add_argument("--engines", required=True, type=Path, help="export directory (python -m export.build)")
    c.add_argument("--checkpoints", type=Path, help="checkpoint directory (needed by --backend torch)")
    c.add_argument("--out", required=True, type=Path, help="calibration directory to write")
    c.add_argument("--texts", type=Path, help="texts, one per line (optional en:/zh: prefix); default: built-in set")
    c.add_argument("--reference", action="append", help="reference voice WAV (repeatable); default: 3 generated")
    c.add_argument("--backend", default="torch", choices=("torch", "ort-cpu"))
    c.add_argument("--gpt-tokens", type=int, default=48, help="cap on codes per segment (default 48)")
    c.add_argument("--euler-steps", type=int, help="Euler steps (default: the export's, 25)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int)
    c.set_defaults(func=cmd_collect)
    a = sub.add_parser("analyze", help="FP16 safety analysis per graph and layer -> precision_policy.json")
    a.add_argument("--engines", required=True, type=Path)
    a.add_argument("--calib", required=True, type=Path)
    a.add_argument("--graphs", help="comma-separated graphs (default: all; the end-to-end effect needs all)")
    a.add_argument("--base", default="default", help="base policy: default (shipped), none, or a policy file")
    a.add_argument("--headroom", type=float, default=4.0)
    a.add_argument("--error-growth", type=float, default=0.03)
    a.add_argument("--max-rounds", type=int, default=6)
    a.add_argument("--max-feeds", type=int, default=6, help="feeds per graph, spread over the set (default 6)")
    a.add_argument("--effect-items", type=int, default=4, help="calibration items synthesized for the effect")
    a.add_argument("--effect-variants", default="calibrated,none", help="calibrated, base, none (comma-separated)")
    a.add_argument("--gpt-tokens", type=int, help="greedy codes per segment for the effect (default: collection's)")
    a.add_argument("--no-effect", action="store_true", help="skip the end-to-end effect")
    a.add_argument("--keep-emulated", action="store_true", help="keep the emulated graphs (CALIB/fp16_emulated_*)")
    a.add_argument("--threads", type=int)
    a.set_defaults(func=cmd_analyze)
    e = sub.add_parser("effect", help="end-to-end effect only (greedy tokens, mel/wave SNR) for chosen variants")
    e.add_argument("--engines", required=True, type=Path)
    e.add_argument("--calib", required=True, type=Path)
    e.add_argument("--policy", type=Path, help="the calibrated policy (default CALIB/precision_policy.json)")
    e.add_argument("--base", default="default", help="base policy for the 'base' variant: default, none or a file")
    e.add_argument("--effect-items", type=int, default=4)
    e.add_argument("--effect-variants", default="calibrated,none", help="calibrated, base, none (comma-separated)")
    e.add_argument("--gpt-tokens", type=int)
    e.add_argument("--keep-emulated", action="store_true")
    e.add_argument("--threads", type=int)
    e.set_defaults(func=cmd_effect)
    k = sub.add_parser("check", help="the shipped fp16 graphs (emulated) against the bounds on held-out feeds")
    k.add_argument("--engines", required=True, type=Path, help="export directory whose fp16 forms to check")
    k.add_argument("--calib", required=True, type=Path)
    k.add_argument("--feeds", type=int, default=2, help="held-out feeds per graph (default 2)")
    k.add_argument("--threads", type=int)
    k.set_defaults(func=cmd_check)
    r = sub.add_parser("report", help="write the Markdown report from the records")
    r.add_argument("--calib", required=True, type=Path)
    r.add_argument("--out", type=Path, help="default CALIB/REPORT.md")
    r.set_defaults(func=cmd_report)
    i = sub.add_parser("int8", help="INT8 forms (Q/DQ from the feeds), gated on the CPU, in the manifest; "
                       "int8 TensorRT plans where TensorRT and a GPU exist")
    i.add_argument("--engines", required=True, type=Path, help="export directory (python -m export.build)")
    i.add_argument("--calib", required=True, type=Path, help="calibration directory (python -m calibration collect)")
    i.add_argument("--graphs", help="comma-separated graphs (default: all)")
    i.add_argument("--precision-policy", type=Path, help="fp32 islands: the policy export.build made the fp16 forms "
                   "with (default: the shipped policy; CALIB/precision_policy.json after analyze)")
    i.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"),
                   help="calibration method for the activation scales (default minmax)")
    i.add_argument("--max-feeds", type=int, help="calibration feeds per graph, spread over the set (default: all)")
    i.add_argument("--items", type=int, default=4, help="calibration items the gate synthesizes (default 4)")
    i.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT workspace limit for the plans "
                   "(default 4)")
    i.add_argument("--threads", type=int)
    i.set_defaults(func=cmd_int8)
    g = sub.add_parser("int8-gate", help="judge the recorded INT8 forms again on the CPU; refused ones fall back "
                       "to fp16")
    g.add_argument("--engines", required=True, type=Path)
    g.add_argument("--calib", required=True, type=Path)
    g.add_argument("--graphs", help="comma-separated graphs (default: every graph with an INT8 form)")
    g.add_argument("--items", type=int, default=4)
    g.add_argument("--threads", type=int)
    g.set_defaults(func=cmd_int8_gate)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
