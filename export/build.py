"""`python -m export.build --checkpoints CKPT --out OUT --precision fp16|fp32 [--graphs a,b] [--force]
[--precision-policy FILE]`

One ONNX graph per contract (DESIGN.md §3) from an IndexTTS2 checkpoint directory, each checked
(onnx.checker, shape inference, polygraphy lint, I/O against the contract), then TensorRT engines where
TensorRT and a GPU are present, the runtime's non-graph files (`OUT/assets/`: bpe.model, glossary,
emotion matrices as .npz), then `OUT/manifest.json` — last and atomically, so a manifest only ever
describes files that are complete.

Reuse: a graph is skipped when its ONNX file exists, its sha256 equals the manifest's and its
fingerprint is unchanged. The fingerprint covers what the graph is made from: the checkpoint files it
reads (by sha256) and config.yaml, the contract at this checkpoint's sizes, the exporter, the export
code (export/models, the wrapper's module, the export machinery) and the torch/onnx/onnxscript
versions. Nothing changed → no model is loaded and nothing is exported.

`--precision` is the engine precision, and precision lives in the graph (strongly typed engines): every
graph is exported in float32, and `--precision fp16` also writes its fp16 form `onnx/fp16/<graph>.onnx`
(export/precision_forms.py: fp16 tensors with the precision policy's fp32 islands and explicit Casts; the
policy is the shipped default or `--precision-policy FILE`), which the engines and ONNX Runtime CUDA run.
INT8 engines are not built here:
they need calibration data, and calibration sits above export (DESIGN.md §1), so `python -m calibration
int8 --engines OUT --calib CALIB` makes them (INT8 forms with Q/DQ from the collected feeds, the INT8 gate on
the CPU, then the plans); `--precision int8` is refused with that command before any work. Engine outcomes are typed (engines/outcome.py).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
from functools import partial
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from runtime.contracts import OPSET, GraphContract, ModelDims
from runtime.errors import CheckpointError, ContractError, InputError, ToolkitError
from runtime.manifest import (MANIFEST_NAME, ONNX_DIR, CheckpointFile, CheckpointIdentity, GptTokens, GraphEntry, Manifest,
                              VocoderLayout, graph_entry, read_manifest, sha256_file, write_manifest)

from engines.outcome import EngineResults

from .assets import write_assets
from .config import BigVGANConfig, IndexTTS2Config, load_bigvgan_config
from .dims import checkpoint_contracts, model_dims
from .layout import CheckpointLayout
from .models.alias_free import FILTER_TAPS
from .wrappers.base import WrapperSpec

log = logging.getLogger("export.build")

PRECISIONS = ("fp16", "fp32", "int8")      # int8 is accepted only to be refused, naming INT8_BY_CALIBRATION
INT8_BY_CALIBRATION = ("INT8 engines are built by the calibration step, not by export.build: "
                       "export with --precision fp16, collect calibration data (python -m calibration collect "
                       "--engines {out} --out CALIB), then run python -m calibration int8 --engines {out} --calib "
                       "CALIB (INT8 forms with Q/DQ from the collected feeds, the INT8 gate on the CPU, then the plans)")
EXPORT_ROOT = Path(__file__).resolve().parent
REPO_ROOT = EXPORT_ROOT.parent

#: Checkpoint roles (CheckpointLayout names) each graph reads; a graph not listed depends on all.
GRAPH_ROLES: dict[str, tuple[str, ...]] = {
    "semantic_encoder": ("w2v_bert", "w2v_stats"),
    "semantic_codec": ("semantic_codec",),
    "campplus": ("campplus",),
    "speaker_conditioner": ("gpt",),
    "emotion_conditioner": ("gpt",),
    "gpt_prefill": ("gpt",),
    "gpt_decode": ("gpt",),
    "gpt_latent": ("gpt", "semantic_codec", "s2mel"),   # latent pass, vq2emb, s2mel.gpt_layer
    "semantic_decoder": ("codec",),                     # IndexTTS-2.5
    "length_regulator": ("s2mel",),
    "dit_step": ("s2mel",),
    "bigvgan": ("bigvgan",),
}
ALL_ROLES = ("gpt", "s2mel", "w2v_stats", "w2v_bert", "semantic_codec", "campplus", "bigvgan")
ALL_ROLES_25 = ("gpt", "s2mel", "w2v_stats", "w2v_bert", "codec", "campplus", "bigvgan")
ASSET_ROLES = ("bpe", "feat1", "feat2")     # read by export.assets for the runtime
ASSET_ROLES_25 = ("tiktoken", "feat1", "feat2")


def all_roles(version: str) -> tuple[str, ...]:
    """The checkpoint roles an export of `version` reads (2.5: codec.pth, not the MaskGCT codec)."""
    return ALL_ROLES if version == "2.0" else ALL_ROLES_25


def asset_roles(version: str) -> tuple[str, ...]:
    return ASSET_ROLES if version == "2.0" else ASSET_ROLES_25

#: Sources whose change changes what an export produces (plus each wrapper's own module file).
CODE_SOURCES = ("export/models/*.py", "export/wrappers/base.py", "export/onnx_export.py", "export/eager.py",
                "export/checkpoint.py", "export/config.py", "export/layout.py", "export/dims.py",
                "export/dummy.py", "export/graph_checks.py", "runtime/contracts.py")
FINGERPRINT_TOOLS = ("torch", "onnx", "onnxscript")
REPORTED_TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "transformers", "polygraphy",
                  "onnx-graphsurgeon", "numpy")

ContractsFor = Callable[[ModelDims, IndexTTS2Config], dict[str, GraphContract]]


@dataclass(frozen=True)
class BuildOptions:
    checkpoints: Path
    out: Path
    precision: str = "fp16"
    graphs: tuple[str, ...] | None = None      # None: every graph that has a wrapper
    force: bool = False                        # re-export even when the fingerprint is unchanged
    lint: bool = True
    precision_policy: Path | None = None       # a policy file (e.g. CALIB/precision_policy.json); None: default


@dataclass
class BuildReport:
    manifest: Manifest
    manifest_path: Path
    engines: EngineResults                     # one typed outcome per graph (built / reused / failed / skipped)
    exported: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def engines_failed(self) -> bool:
        return not self.engines.ok


@dataclass(frozen=True)
class GraphPlan:
    """What one graph is made from and where it goes."""

    contract: GraphContract
    spec: WrapperSpec
    fingerprint: str
    checkpoint_sha256: str          # combined hash of the checkpoint files the graph reads

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def file(self) -> str:
        return f"{ONNX_DIR}/{self.name}.onnx"


# ---------------------------------------------------------------------------------------------------
# Entry point


def build(options: BuildOptions, wrappers: Mapping[str, WrapperSpec] | None = None,
          contracts_for: ContractsFor | None = None) -> BuildReport:
    """Export, check and record every selected graph; engines where possible; then the manifest.

    `wrappers` (default: the registry, export/wrappers) and `contracts_for` (default: the 11 contracts at
    the checkpoint's sizes) are injectable so the machinery can be tested on a toy graph.
    """
    if options.precision not in PRECISIONS:
        raise InputError(f"--precision {options.precision!r}: expected one of {', '.join(PRECISIONS)}")
    _check_engine_inputs(options)
    layout = open_checkpoint(options.checkpoints)
    out = prepare_out(options.out)
    version = layout.version
    if wrappers is None:
        from .wrappers import all_wrappers

        wrappers = all_wrappers(version)
    dims = model_dims(layout)
    contracts = (contracts_for or partial(checkpoint_contracts, version=version))(dims, layout.config)
    selected = select_graphs(contracts, wrappers, options.graphs)
    previous = previous_manifest(out)
    identity = checkpoint_identity(layout, previous.checkpoint if previous else None)
    plans = {n: make_plan(contracts[n], wrappers[n], dims, layout, identity) for n in contracts if n in wrappers}
    entries, outcome = _export_all(options, layout, out, dims, plans, selected, previous)
    _carry_over(entries, previous, plans, selected, out)
    if options.precision == "fp16":
        from .precision_forms import write_fp16_forms

        forms, form_failed = write_fp16_forms(entries, contracts, dims, out, options.precision_policy)
        entries.update(forms)
        outcome["failed"].update({f"{n} (fp16 form)": why for n, why in form_failed.items()})
    from .gpt_shared import write_shared_gpt

    try:
        shared_gpt = write_shared_gpt(entries, out, previous.shared_gpt if previous else None)
    except Exception as err:  # noqa: BLE001 — the GPT graphs still run one session each; reported, not fatal
        log.error("gpt_shared: FAILED: %s", err, exc_info=not isinstance(err, ToolkitError))
        outcome["failed"]["gpt_shared"] = f"{type(err).__name__}: {err}"
        shared_gpt = None
    manifest = Manifest(
        checkpoint=identity, dims=dims, precision=options.precision,
        graphs={n: entries[n] for n in contracts if n in entries},
        tools=tool_versions(), gpt=gpt_tokens(layout.config), assets=write_assets(layout, out),
        vocoder=vocoder_layout(load_bigvgan_config(layout.require("bigvgan") / "config.json")),
        dit_rows_alone=True,                       # export/wrappers/audio.py:DiTStepGraph (rows_alone)
        version=version, shared_gpt=shared_gpt,
    )
    engine_results = run_engines(manifest, out, options.precision, options.precision_policy)
    path = write_manifest(manifest, out)
    log.info("wrote %s (%d graphs)", path, len(manifest.graphs))
    return BuildReport(manifest, path, engine_results, **outcome)


def _export_all(options: BuildOptions, layout: CheckpointLayout, out: Path, dims: ModelDims,
                plans: Mapping[str, GraphPlan], selected: Sequence[str], previous: Manifest | None
                ) -> tuple[dict[str, GraphEntry], dict]:
    """Reuse or export each selected graph; one failed graph does not stop the others.
    -> (entries, {exported, reused, failed})."""
    entries: dict[str, GraphEntry] = {}
    exported: list[str] = []
    reused: list[str] = []
    failed: dict[str, str] = {}
    todo = [n for n in selected if options.force or not reusable(previous, plans[n], out)]
    models = _load_models(layout, todo)
    for i, name in enumerate(selected, 1):
        tag = f"[{i}/{len(selected)}] {name}"
        if name not in todo:
            assert previous is not None
            entries[name] = previous.graphs[name]
            reused.append(name)
            log.info("%s: unchanged, reused %s", tag, plans[name].file)
            continue
        t0 = time.perf_counter()
        try:
            entries[name] = produce_graph(plans[name], models, dims, out, options.lint, tag)
        except Exception as err:  # noqa: BLE001 — reported per graph; the build goes on with the others
            log.error("%s: FAILED after %.1f s: %s", tag, time.perf_counter() - t0, err,
                      exc_info=not isinstance(err, ToolkitError))
            failed[name] = f"{type(err).__name__}: {err}"
            continue
        exported.append(name)
        log.info("%s: done in %.1f s", tag, time.perf_counter() - t0)
    return entries, {"exported": exported, "reused": reused, "failed": failed}


def _load_models(layout: CheckpointLayout, todo: Sequence[str]):
    """The eager models, once, only when something must be exported."""
    if not todo:
        return None
    from .eager import EagerModels

    with_gpt = any("gpt" in GRAPH_ROLES.get(n, all_roles(layout.version)) for n in todo)
    log.info("loading the eager models from %s (%d graph(s) to export)", layout.root, len(todo))
    return EagerModels.load(layout.root, with_gpt=with_gpt)


def _carry_over(entries: dict[str, GraphEntry], previous: Manifest | None, plans: Mapping[str, GraphPlan],
                selected: Sequence[str], out: Path) -> None:
    """Graphs not selected this time stay in the manifest if they are still current."""
    if previous is None:
        return
    for name, entry in previous.graphs.items():
        if name in selected or name in entries:
            continue
        if name in plans and reusable(previous, plans[name], out):
            entries[name] = entry
        else:
            log.warning("%s: dropped from the manifest (its checkpoint, contract or export code changed, or its "
                        "file is gone); rebuild it with --graphs %s", name, name)


# ---------------------------------------------------------------------------------------------------
# Inputs: checkpoint, output directory, graph selection


def open_checkpoint(path: str | Path) -> CheckpointLayout:
    """The checkpoint layout, after checking that every file the graphs and the runtime assets read is there
    (all problems at once)."""
    layout = CheckpointLayout.open(path)
    problems = [f"config.yaml has no '{s}' section" for s in ("gpt", "semantic_codec", "s2mel")
                if getattr(layout.config, s) is None]
    try:
        version = layout.version
    except CheckpointError as err:             # no readable gpt.pth: report it with the rest
        problems.append(str(err))
        version = "2.0"
    for role in asset_roles(version):
        try:
            layout.require(role)
        except CheckpointError as err:
            problems.append(str(err))
    for role in all_roles(version):
        try:
            if not role_files(layout, role):
                problems.append(f"{role}: {layout.require(role)} holds no files")
        except CheckpointError as err:
            problems.append(str(err))
    if problems:
        raise CheckpointError(f"{layout.root}: not a usable IndexTTS2 checkpoint directory:\n  - "
                              + "\n  - ".join(problems))
    return layout


def prepare_out(out: str | Path) -> Path:
    """Create OUT/onnx and prove it writable before any expensive work."""
    out = Path(out)
    try:
        (out / ONNX_DIR).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out / ONNX_DIR, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(f"--out {out}: cannot write there ({err.strerror or err}); choose a writable "
                         "directory") from err
    return out


def select_graphs(contracts: Mapping[str, GraphContract], wrappers: Mapping[str, WrapperSpec],
                  requested: Sequence[str] | None) -> list[str]:
    orphans = sorted(set(wrappers) - set(contracts))
    if orphans:
        raise ContractError(f"wrappers registered for graphs that have no contract: {orphans}")
    if requested is None:
        missing = [n for n in contracts if n not in wrappers]
        if missing:
            log.warning("no export wrapper registered for: %s (not exported)", ", ".join(missing))
        selected = [n for n in contracts if n in wrappers]
        if not selected:
            raise InputError("no graph has an export wrapper yet (export/wrappers): nothing to build")
        return selected
    unknown = [n for n in requested if n not in contracts]
    if unknown:
        raise InputError(f"--graphs: unknown graph(s) {unknown}; known: {', '.join(contracts)}")
    unwrapped = [n for n in requested if n not in wrappers]
    if unwrapped:
        raise InputError(f"--graphs: no export wrapper registered for {unwrapped}")
    return [n for n in contracts if n in requested]


def previous_manifest(out: Path) -> Manifest | None:
    """The manifest of an earlier build in OUT, if it is readable (else a warning and a full build)."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(out, check_files=False)
    except ToolkitError as err:
        log.warning("ignoring the existing manifest: %s", err)
        return None


# ---------------------------------------------------------------------------------------------------
# Identity and fingerprints


def role_files(layout: CheckpointLayout, role: str) -> list[Path]:
    """The files of one checkpoint role: the file itself, or the regular files of its directory."""
    path = layout.require(role)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path]


def checkpoint_identity(layout: CheckpointLayout, previous: CheckpointIdentity | None) -> CheckpointIdentity:
    """sha256 of config.yaml and of every file the graphs read. A file whose size and mtime equal the
    previous manifest's (same checkpoint path) keeps its recorded hash instead of being re-read."""
    root = layout.root.resolve()
    known = previous.files if previous is not None and previous.path == str(root) else {}
    files: dict[str, CheckpointFile] = {}
    t0 = time.perf_counter()
    for role in all_roles(layout.version):
        for path in role_files(layout, role):
            rel = path.relative_to(layout.root).as_posix()
            stat = path.stat()
            old = known.get(rel)
            if old is not None and old.size == stat.st_size and old.mtime_ns == stat.st_mtime_ns:
                files[rel] = old
            else:
                files[rel] = CheckpointFile(sha256_file(path), stat.st_size, stat.st_mtime_ns)
    log.info("checkpoint %s: %d files identified in %.1f s", root, len(files), time.perf_counter() - t0)
    return CheckpointIdentity(str(root), sha256_file(layout.root / "config.yaml"), files)


def graph_checkpoint_files(layout: CheckpointLayout, identity: CheckpointIdentity, name: str) -> dict[str, str]:
    rels = [p.relative_to(layout.root).as_posix() for role in GRAPH_ROLES.get(name, all_roles(layout.version))
            for p in role_files(layout, role)]
    return {rel: identity.files[rel].sha256 for rel in sorted(rels)}


def code_version(spec: WrapperSpec) -> str:
    """sha256 over the export code that shapes a graph: CODE_SOURCES plus the wrapper's own module."""
    paths = {p for pattern in CODE_SOURCES for p in REPO_ROOT.glob(pattern)}
    for fn in (spec.build, spec.feed, *([spec.export_build] if spec.export_build else [])):
        try:
            src = inspect.getsourcefile(fn)
        except TypeError:
            src = None
        if src:
            paths.add(Path(src).resolve())
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def make_plan(contract: GraphContract, spec: WrapperSpec, dims: ModelDims, layout: CheckpointLayout,
              identity: CheckpointIdentity) -> GraphPlan:
    files = graph_checkpoint_files(layout, identity, contract.name)
    checkpoint_sha = _sha_json({"config": identity.config_sha256, "files": files})
    versions = tool_versions()
    facts = {
        "graph": contract.name,
        "inputs": [asdict(t) for t in contract.inputs],
        "outputs": [asdict(t) for t in contract.outputs],
        "ranges": {a: asdict(r) for a, r in contract.ranges.items()},
        "dims": asdict(dims),
        "checkpoint": checkpoint_sha,
        "code": code_version(spec),
        "exporter": spec.exporter,
        "export_sizes": dict(spec.export_sizes),
        "opset": OPSET,
        "tools": {t: versions.get(t, "") for t in FINGERPRINT_TOOLS},
    }
    return GraphPlan(contract, spec, _sha_json(facts), checkpoint_sha)


def reusable(previous: Manifest | None, plan: GraphPlan, out: Path) -> bool:
    """True when the previous build's file for this graph is intact and made from the same inputs."""
    if previous is None or plan.name not in previous.graphs:
        return False
    entry = previous.graphs[plan.name]
    if entry.fingerprint != plan.fingerprint or entry.file != plan.file:
        return False
    path = out / entry.file
    if not path.is_file() or sha256_file(path) != entry.sha256:
        return False
    return all((path.parent / f).is_file() and sha256_file(path.parent / f) == h
               for f, h in entry.external_data.items())


def _sha_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# One graph


def produce_graph(plan: GraphPlan, models, dims: ModelDims, out: Path, lint: bool, tag: str) -> GraphEntry:
    """Export -> metadata -> checks -> manifest entry."""
    from . import graph_checks
    from .dummy import feed_for

    path = out / plan.file
    t0 = time.perf_counter()
    _export_graph(plan, models, dims, path)
    log.info("%s: exported (%s) in %.1f s", tag, plan.spec.exporter, time.perf_counter() - t0)
    graph_checks.stamp_metadata(path, {
        "indextts2.graph": plan.name,
        "indextts2.contract_version": str(_contract_version()),
        "indextts2.checkpoint_sha256": plan.checkpoint_sha256,
        "indextts2.fingerprint": plan.fingerprint,
        "indextts2.exporter": plan.spec.exporter,
    })
    t1 = time.perf_counter()
    graph_checks.check_model(path, plan.contract, dims)
    lint_result = "not run (--no-lint)"
    if lint:
        lint_result = graph_checks.lint(path, feed_for(plan.contract, plan.spec, dims, "opt", rng=1))
    log.info("%s: checker, shape inference and I/O check passed; lint: %s (%.1f s)", tag, lint_result,
             time.perf_counter() - t1)
    return graph_entry(
        plan.contract, dims, file=plan.file, sha256=sha256_file(path), opset=OPSET, exporter=plan.spec.exporter,
        fingerprint=plan.fingerprint, lint=lint_result,
        external_data={f: sha256_file(path.parent / f) for f in graph_checks.external_data_files(path)},
    )


def _export_graph(plan: GraphPlan, models, dims: ModelDims, path: Path) -> None:
    """Trace the wrapper at the contract's trace point and write `path` (replacing older files)."""
    import torch

    from .dummy import feed_for
    from .graph_checks import external_data_files
    from .onnx_export import export_legacy, export_onnx

    if path.exists():
        for f in external_data_files(path):
            (path.parent / f).unlink(missing_ok=True)
        path.unlink()
    feed = feed_for(plan.contract, plan.spec, dims, "trace", rng=0)
    sample = tuple(torch.from_numpy(feed[n]) for n in plan.contract.input_names)
    module = plan.spec.build_for_export(models).eval()
    if plan.spec.exporter == "dynamo":
        export_onnx(module, plan.contract, sample, path)
    elif plan.spec.exporter == "legacy":
        export_legacy(module, plan.contract, sample, path)
    else:
        raise ContractError(f"graph '{plan.name}': unknown exporter {plan.spec.exporter!r}")


def _contract_version() -> int:
    from runtime.contracts import CONTRACT_VERSION

    return CONTRACT_VERSION


# ---------------------------------------------------------------------------------------------------
# Manifest facts, engines


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in REPORTED_TOOLS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def gpt_tokens(cfg: IndexTTS2Config) -> GptTokens:
    g = cfg.gpt
    if g is None:
        return GptTokens()
    return GptTokens(start_mel_token=g.start_mel_token, stop_mel_token=g.stop_mel_token,
                     start_text_token=g.start_text_token, stop_text_token=g.stop_text_token,
                     number_text_tokens=g.number_text_tokens, max_text_tokens=g.max_text_tokens,
                     max_mel_tokens=g.max_mel_tokens)


#: BigVGAN's geometry that config.json does not carry: conv_pre / conv_post kernels and the anti-aliased
#: activation's 2x resamplers with their filter (export/models/bigvgan.py, alias_free.py). The filter's taps
#: are the model's own constant; the kernels and the ratio are literals in the model code, repeated here rather
#: than named there (export/models is part of every graph's fingerprint: a new constant there would re-export
#: every graph of every existing export). tests/streaming holds them to the modules.
BIGVGAN_CONV_PRE_KERNEL = 7
BIGVGAN_CONV_POST_KERNEL = 7
BIGVGAN_RESAMPLE_RATIO = 2
BIGVGAN_RESAMPLE_TAPS = FILTER_TAPS


def vocoder_layout(cfg: BigVGANConfig) -> VocoderLayout:
    """The vocoder's layer geometry for the manifest (the runtime's chunked vocoding computes its
    receptive field from it: runtime/streaming/vocoder.py)."""
    return VocoderLayout(
        hop_length=math.prod(cfg.upsample_rates), conv_pre_kernel=BIGVGAN_CONV_PRE_KERNEL,
        upsample_rates=tuple(cfg.upsample_rates), upsample_kernel_sizes=tuple(cfg.upsample_kernel_sizes),
        resblock_kernel_sizes=tuple(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=tuple(tuple(d) for d in cfg.resblock_dilation_sizes),
        conv_post_kernel=BIGVGAN_CONV_POST_KERNEL, resample_ratio=BIGVGAN_RESAMPLE_RATIO,
        resample_taps=BIGVGAN_RESAMPLE_TAPS,
    )


def _check_engine_inputs(options: BuildOptions) -> None:
    """An INT8 request or a bad policy file is reported before any export work."""
    if options.precision == "int8":
        raise InputError("--precision int8: " + INT8_BY_CALIBRATION.format(out=options.out))
    if options.precision_policy is not None:
        from engines.precision import load_policy

        load_policy(options.precision_policy)


def run_engines(manifest: Manifest, out: Path, precision: str, policy_path: Path | None = None) -> EngineResults:
    """TensorRT plans (reused when unchanged) where TensorRT and a GPU are present; otherwise every graph is
    skipped with the reason, and the build succeeds. A failed engine is recorded as such after every other
    graph was tried (a refusal before any graph, e.g. no usable GPU, fails them all with its reason); the
    ONNX graphs and the manifest stay valid (the runtime can still use ONNX Runtime). `policy_path`: the
    precision policy (default: the shipped one)."""
    import engines

    ok, reason = engines.available()
    if not ok:
        return EngineResults.all_skipped(manifest.graphs, precision, reason)
    try:
        results = engines.build_all(manifest, out, precision, policy_path)
    except engines.EngineBuildFailures as err:
        results = err.results
    except ToolkitError as err:
        results = EngineResults.all_failed(manifest.graphs, precision, f"{type(err).__name__}: {err}")
    if not results.ok:
        log.error(results.summary())
    return results


# ---------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoints", required=True, type=Path, help="IndexTTS2 checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (onnx/, manifest.json, engines)")
    p.add_argument("--precision", default="fp16", choices=PRECISIONS,
                   help="engine precision; fp16 also writes each graph's fp16 form onnx/fp16/ (precision in the "
                        "graph); int8 engines: python -m calibration int8")
    p.add_argument("--graphs", default=None, help="comma-separated graph names (default: all)")
    p.add_argument("--force", action="store_true", help="re-export even if nothing changed")
    p.add_argument("--no-lint", action="store_true", help="skip polygraphy's lint")
    p.add_argument("--precision-policy", type=Path, default=None,
                   help="fp32 islands of the fp16 graphs (default: engines/policy_default.json; a calibration "
                        "run writes CALIB/precision_policy.json)")
    p.add_argument("--calibration", type=Path, default=None, help=argparse.SUPPRESS)   # gone: refused in main
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _configure_logging(verbose: bool) -> None:
    """Our progress at INFO; the exporter's chatter (onnxscript optimizer, torch.onnx registry, a torch
    FutureWarning) only with --verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    for name in ("export", "runtime", "engines"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used.*", category=UserWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.verbose)
    if args.calibration is not None:                     # the INT8 route moved to the calibration layer
        print(f"error: --calibration: {INT8_BY_CALIBRATION.format(out=args.out)}", file=sys.stderr)
        return 2
    graphs = tuple(g.strip() for g in args.graphs.split(",") if g.strip()) if args.graphs else None
    options = BuildOptions(args.checkpoints, args.out, args.precision, graphs, args.force, not args.no_lint,
                           args.precision_policy)
    t0 = time.perf_counter()
    try:
        report = build(options)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported: {', '.join(report.exported) or '-'}")
    print(f"reused: {', '.join(report.reused) or '-'}")
    for name, why in report.failed.items():
        print(f"FAILED {name}: {why}")
    print(report.engines.summary())
    print(f"manifest: {report.manifest_path} ({time.perf_counter() - t0:.1f} s)")
    return 1 if report.failed or report.engines_failed else 0


if __name__ == "__main__":
    sys.exit(main())
