"""The manifest of an export directory: what `export.build` wrote and everything the runtime and the
engine builder need to use it, as dataclasses with a versioned JSON form.

Why: the runtime never imports `export/` (DESIGN.md §1, STYLE.md practice 6), so every fact it needs
about the graphs — files and hashes, I/O signatures at this checkpoint's sizes, the shape ranges of
engine profiles, the KV-cache layout, the GPT's special tokens, the sampling and flow defaults — is
written here once, by the export side, and read back here. A manifest of another format or contract
version is refused with a `ContractError` that says to rebuild; a missing or altered graph file is a
`CheckpointError` naming it. Torch-free (stdlib only).

Layout of `OUT/`: `manifest.json`, `onnx/<graph>.onnx` (float32; + `<graph>.onnx.data` over 2 GB), the
graphs' precision forms `onnx/<form>/<graph>.onnx` (`fp16`: the mixed-precision graph TensorRT and ONNX
Runtime CUDA run, engines/mixed_precision.py; `int8`: its explicitly quantized form), `assets/` (what
the runtime needs besides the graphs, torch-free: `bpe.model`, `glossary.yaml` when the checkpoint has
one, `emotion_matrices.npz` = feat1.pt / feat2.pt as float32 arrays).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from runtime.contracts import (
    CONTRACT_VERSION,
    DERIVED_AXES,
    DYNAMIC_AXES,
    AxisRange,
    GraphContract,
    ModelDims,
    TensorSpec,
)
from runtime.emotion import DEFAULT_EMO_NUM
from runtime.errors import CheckpointError, ContractError
from runtime.gpt.generate import GenerationConfig

FORMAT = "indextts2-engines/manifest"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ONNX_DIR = "onnx"
ASSETS_DIR = "assets"

Dim = int | str


# ---------------------------------------------------------------------------------------------------
# Parts


@dataclass(frozen=True)
class TensorSignature:
    """One graph input or output: static dims resolved to ints, dynamic and derived axes by name."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @classmethod
    def of(cls, spec: TensorSpec, dims: ModelDims) -> "TensorSignature":
        shape = tuple(d if isinstance(d, int) or d in DYNAMIC_AXES or d in DERIVED_AXES else dims.resolve(d)
                      for d in spec.shape)
        return cls(spec.name, spec.dtype, shape)

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape at given dynamic axis sizes (derived axes computed from theirs)."""
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif d in DERIVED_AXES:
                free, scale, offset = DERIVED_AXES[d]
                out.append(scale * int(sizes[free]) + offset)
            else:
                out.append(int(sizes[d]))
        return tuple(out)


@dataclass(frozen=True)
class GraphForm:
    """A precision form of a graph, derived from its float32 file: `fp16` (mixed precision: fp16 tensors,
    the precision policy's fp32 islands, explicit Casts; same inputs and outputs as the float32 graph) or
    `int8` (the fp16 form with QuantizeLinear/DequantizeLinear nodes, calibration/int8_qdq.py; a graph the
    INT8 gate refused has its fp16 form's file as int8 form, `graph_form` "fp16-mixed" says so to the engine
    builder and `note` says why). `made_from`: the float32
    file's sha256; `policy_sha256`: the precision policy's; `counts`: fp16 / fp32 nodes, Casts (and quantized
    nodes, Q/DQ nodes) added."""

    kind: str
    file: str
    sha256: str
    made_from: str
    policy_sha256: str
    external_data: Mapping[str, str] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)
    policy: str = ""                               # where the policy was read from, for the record
    recipe: str = ""                               # hash of the policy and the pass's code (reuse key)
    note: str = ""                                 # e.g. why an int8 form is the fp16 graph (INT8 gate refusal)
    graph_form: str = ""                           # what the file is when not its kind's usual graph: "fp16-mixed"
                                                   # for an int8 form that is the fp16 graph ("" = the kind's own)


#: Graph forms, by the engine precision that runs them ("fp32" is the graph file itself).
GRAPH_FORMS = ("fp16", "int8")


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph. `file` and `external_data` are relative to the manifest's directory."""

    name: str
    file: str
    sha256: str
    opset: int
    exporter: str                                  # "dynamo" or "legacy"
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    ranges: Mapping[str, AxisRange]                # per dynamic axis: engine profile min / opt / max
    fingerprint: str                               # what the file was built from (export.build reuse key)
    external_data: Mapping[str, str] = field(default_factory=dict)   # file -> sha256
    lint: str = ""                                 # polygraphy lint outcome, for the record
    forms: Mapping[str, GraphForm] = field(default_factory=dict)     # "fp16" / "int8" -> its file
    form_kind: str = "fp32"                        # which form this entry's `file` is (see `form`)
    graph_form: str = ""                           # the form's `graph_form` (a view's attribute, see `form`)

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.file

    def form(self, kind: str) -> "GraphEntry":
        """This graph as the file of form `kind` ("fp32": itself): the same signature and ranges, that
        form's file, hash and external data. Executors and the engine builder take the result as they take
        any entry. A missing form is a CheckpointError saying how to make it."""
        if kind == "fp32" or kind == self.form_kind:
            return self
        if kind not in self.forms:
            how = ("python -m export.build --precision fp16" if kind == "fp16" else
                   "python -m calibration int8 --engines OUT --calib CALIB")
            raise CheckpointError(f"graph '{self.name}' has no {kind} form in this export (it has: "
                                  f"{', '.join(['fp32', *self.forms])}); make it with {how}")
        f = self.forms[kind]
        return dataclasses.replace(self, file=f.file, sha256=f.sha256, external_data=dict(f.external_data),
                                   forms={}, form_kind=kind, graph_form=f.graph_form)

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input: (min, opt, max) concrete shapes — an engine optimization profile."""
        points = [{a: getattr(r, p) for a, r in self.ranges.items()} for p in ("min", "opt", "max")]
        return {t.name: tuple(t.concrete(s) for s in points) for t in self.inputs}  # type: ignore[misc]


@dataclass(frozen=True)
class SharedGptGraph:
    """The GPT graphs as the branches of one ONNX file whose weights are stored and held once
    (export/gpt_shared.py): what ONNX Runtime on the CPU loads instead of one session per GPT graph.
    `branches`: graph names in branch-index order; `made_from`: graph -> the float32 file's sha256 it was
    made from (a file made from other graphs is stale and not used); `shared_bytes`: weight bytes it stores
    once instead of in every graph."""

    file: str
    sha256: str
    branches: tuple[str, ...]
    made_from: Mapping[str, str]
    fingerprint: str
    external_data: Mapping[str, str] = field(default_factory=dict)
    shared_bytes: int = 0
    recipe: str = ""                               # sha256 of the merging code (export.build's reuse key)

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.file

    def current(self, graphs: Mapping[str, "GraphEntry"]) -> bool:
        """Made from exactly the float32 files the manifest lists now."""
        return all(g in graphs and graphs[g].sha256 == s for g, s in self.made_from.items()) \
            and set(self.made_from) == set(self.branches)


@dataclass(frozen=True)
class CheckpointFile:
    sha256: str
    size: int
    mtime_ns: int          # with `size`, lets a re-run skip re-hashing an untouched file


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which checkpoint the graphs come from: its path and the hash of every file that was read."""

    path: str
    config_sha256: str
    files: Mapping[str, CheckpointFile]            # path relative to the checkpoint directory -> hash


@dataclass(frozen=True)
class GptTokens:
    """The GPT's special tokens and length limits (the decode loop needs them; DESIGN.md §3)."""

    start_mel_token: int = 8192
    stop_mel_token: int = 8193
    start_text_token: int = 0
    stop_text_token: int = 1
    number_text_tokens: int = 12000
    max_text_tokens: int = 600
    max_mel_tokens: int = 1815


@dataclass(frozen=True)
class KVCacheLayout:
    """How the decode graphs exchange K/V (gpt_prefill `kv`, gpt_decode `kv_cache.<i>` / `kv_new`)."""

    dtype: str = "float32"
    layout: tuple[str | int, ...] = ("layers", 2, "batch", "heads", "cache_len", "head_dim")
    input_template: str = "kv_cache.{layer}"       # per-layer decode input: one (2,B,heads,S,head_dim) slice
    prefill_output: str = "kv"
    decode_output: str = "kv_new"


@dataclass(frozen=True)
class SynthesisDefaults:
    sample_rate: int = 22050
    hop_length: int = 256
    euler_steps: int = 25
    cfg_rate: float = 0.7


@dataclass(frozen=True)
class VocoderLayout:
    """The BigVGAN generator's layer geometry: everything its receptive field is computed from
    (runtime/streaming/vocoder.py, chunked vocoding), and nothing else (no channel counts, no weights).

    The forward pass it describes (export/models/bigvgan.py, UPSTREAM §3.5): `conv_pre` (kernel
    `conv_pre_kernel`, 'same' padding); per stage i a ConvTranspose1d (stride `upsample_rates[i]` = u, kernel
    `upsample_kernel_sizes[i]` = k, padding (k - u) / 2: output exactly u times longer), then one AMPBlock1
    per `resblock_kernel_sizes[j]` (run in parallel on the same input, averaged), each a chain of residual
    steps over `resblock_dilation_sizes[j]`: x += conv2(A(conv1_d(A(x)))) with conv1 (kernel k, dilation d)
    and conv2 (kernel k, dilation 1), both 'same'; then A and `conv_post` (kernel `conv_post_kernel`,
    'same'). A = anti-aliased SnakeBeta: up-sample by `resample_ratio` r with a `resample_taps`-tap filter K
    (upstream UpSample1d: a transposed conv, stride r, kernel K, padding (K - r) / 2, replicate-padded
    input), pointwise snake, down-sample by r (upstream DownSample1d: a conv, stride r, kernel K, left
    padding K / 2 - 1 for even K, replicate). `hop_length` = prod(upsample_rates) output samples per frame.

    Recorded by export.build from the checkpoint's BigVGAN config.json (and the model's fixed kernels); a
    manifest written before it has none (`Manifest.vocoder` is None)."""

    hop_length: int
    conv_pre_kernel: int
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    conv_post_kernel: int
    resample_ratio: int
    resample_taps: int

    def __post_init__(self) -> None:
        problems = []
        hop = 1
        for u in self.upsample_rates:
            hop *= u
        if hop != self.hop_length:
            problems.append(f"hop_length {self.hop_length} != prod(upsample_rates) {hop}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            problems.append("upsample_rates and upsample_kernel_sizes differ in length")
        elif any(u < 1 or k < u or (k - u) % 2 for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes)):
            problems.append("an upsample stage with kernel k < rate u or (k - u) odd")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        kernels = (self.conv_pre_kernel, self.conv_post_kernel, *self.resblock_kernel_sizes)
        if any(k < 1 or k % 2 == 0 for k in kernels):
            problems.append(f"conv kernels must be odd and positive ('same' padding), got {kernels}")
        if any(d < 1 for ds in self.resblock_dilation_sizes for d in ds):
            problems.append("a dilation < 1")
        if self.resample_ratio < 1 or self.resample_taps < self.resample_ratio or self.resample_taps % 2:
            problems.append(f"resampler: {self.resample_taps} taps at ratio {self.resample_ratio} (taps must be even "
                            "and >= ratio)")
        if problems:
            raise ValueError("vocoder layout: " + "; ".join(problems))


@dataclass(frozen=True)
class AssetFile:
    """A non-graph file the runtime reads; `file` is relative to the manifest's directory."""

    file: str
    sha256: str


@dataclass(frozen=True)
class RuntimeAssets:
    """What the runtime needs from the checkpoint besides the graphs, copied into the export directory so
    the runtime never reads the checkpoint (and never needs torch to read `.pt` files).

    `emotion_llm`: absolute path of the checkpoint's emotion LLM directory (qwen0.6bemo4-merge), not
    copied (1.2 GB); "" when the checkpoint has none. Emotion from text is the one runtime feature that
    needs transformers + torch on the host (UPSTREAM §2.11: it is an LLM, not an exported graph)."""

    bpe: AssetFile | None = None
    tiktoken: AssetFile | None = None              # IndexTTS-2.5's tokenizer ranks (instead of bpe)
    glossary: AssetFile | None = None
    emotion_matrices: AssetFile | None = None      # npz: feat1 (sum(emo_num), 192), feat2 (sum(emo_num), D)
    emo_num: tuple[int, ...] = DEFAULT_EMO_NUM
    emotion_llm: str = ""

    def files(self) -> dict[str, AssetFile]:
        return {k: v for k, v in (("bpe", self.bpe), ("tiktoken", self.tiktoken), ("glossary", self.glossary),
                                  ("emotion_matrices", self.emotion_matrices)) if v is not None}


# ---------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Manifest:
    checkpoint: CheckpointIdentity
    dims: ModelDims
    precision: str                                 # engine precision requested (fp16 / fp32 / int8): its graph form
    graphs: Mapping[str, GraphEntry]
    tools: Mapping[str, str]                       # package -> version used to export
    gpt: GptTokens = GptTokens()
    kv_cache: KVCacheLayout = KVCacheLayout()
    sampling: GenerationConfig = GenerationConfig()   # upstream infer_v2 defaults (beam sampling, 3 beams)
    synthesis: SynthesisDefaults = SynthesisDefaults()
    assets: RuntimeAssets = RuntimeAssets()
    vocoder: VocoderLayout | None = None           # None: exported before the layout was recorded
    # dit_step computes each row as its batch-1 call (export/models/dit.py, rows_alone): rows of different
    # lengths may share a call (runtime/scheduler/euler_batch.py). False: exported before that
    dit_rows_alone: bool = False
    version: str = "2.0"                           # the IndexTTS2 version of the checkpoint (its graph set)
    shared_gpt: SharedGptGraph | None = None       # None: exported before export/gpt_shared.py
    contract_version: int = CONTRACT_VERSION
    format_version: int = FORMAT_VERSION

    def graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            raise ContractError(f"graph '{name}' is not in the manifest (it has: {', '.join(sorted(self.graphs))}); "
                                f"export it with python -m export.build --graphs {name}")
        return self.graphs[name]

    def to_json(self) -> dict[str, Any]:
        data = plain_json(dataclasses.asdict(self))
        data["graphs"] = {n: _graph_json(g) for n, g in self.graphs.items()}
        data["derived_axes"] = {k: list(v) for k, v in DERIVED_AXES.items()}
        if self.vocoder is None:
            data.pop("vocoder")                    # as a manifest written before the layout existed
        if self.shared_gpt is None:
            data.pop("shared_gpt")
        head = {"format": FORMAT, "format_version": data.pop("format_version"),
                "contract_version": data.pop("contract_version")}
        return {**head, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = MANIFEST_NAME) -> "Manifest":
        _check_versions(data, source)
        try:
            return cls(
                checkpoint=_checkpoint_from(data["checkpoint"]),
                dims=ModelDims(**{k: int(v) for k, v in data["dims"].items()}),
                precision=str(data["precision"]),
                graphs={n: _graph_from(g) for n, g in data["graphs"].items()},
                tools={str(k): str(v) for k, v in data["tools"].items()},
                gpt=_flat(GptTokens, data["gpt"]),
                kv_cache=_flat(KVCacheLayout, data["kv_cache"]),
                sampling=_flat(GenerationConfig, data["sampling"]),
                synthesis=_flat(SynthesisDefaults, data["synthesis"]),
                assets=_assets_from(data.get("assets", {})),
                vocoder=_vocoder_from(data.get("vocoder")),
                dit_rows_alone=bool(data.get("dit_rows_alone", False)),
                version=str(data.get("version", "2.0")),
                shared_gpt=_shared_gpt_from(data.get("shared_gpt")),
                contract_version=int(data["contract_version"]),
                format_version=int(data["format_version"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ContractError(f"{source}: malformed manifest ({type(err).__name__}: {err}); "
                                "rebuild it with python -m export.build") from err


def graph_entry(contract: GraphContract, dims: ModelDims, **facts: Any) -> GraphEntry:
    """A GraphEntry whose signature and ranges come from `contract` at `dims`; `facts` fill the rest."""
    return GraphEntry(
        name=contract.name,
        inputs=tuple(TensorSignature.of(t, dims) for t in contract.inputs),
        outputs=tuple(TensorSignature.of(t, dims) for t in contract.outputs),
        ranges=dict(contract.ranges),
        **facts,
    )


# ---------------------------------------------------------------------------------------------------
# Files


def write_manifest(manifest: Manifest, out: str | Path) -> Path:
    """Write `out/manifest.json` atomically (a reader never sees a half-written file)."""
    out = Path(out)
    target = out / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(manifest.to_json(), fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_manifest(where: str | Path, check_files: bool = True, check_hashes: bool = False) -> Manifest:
    """Read `where/manifest.json` (or `where` itself if it is the file).

    `check_files`: every graph file (and external data file) must exist. `check_hashes`: and its sha256
    must equal the recorded one (reads every file).
    """
    path = Path(where)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: manifest not found; create it with "
                              "python -m export.build --checkpoints CKPT --out DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err}); rebuild it with python -m export.build") from err
    if not isinstance(data, dict):
        raise ContractError(f"{path}: not a manifest (top level is {type(data).__name__})")
    manifest = Manifest.from_json(data, str(path))
    if check_files or check_hashes:
        problems = file_problems(manifest, path.parent, check_hashes)
        if problems:
            raise CheckpointError(f"{path.parent}: " + "; ".join(problems)
                                  + "; rebuild with python -m export.build")
    return manifest


def file_problems(manifest: Manifest, root: str | Path, check_hashes: bool = False) -> list[str]:
    """Missing (or, with `check_hashes`, altered) graph files, one message each."""
    problems: list[str] = []
    for entry in manifest.graphs.values():
        files = {entry.file: entry.sha256}
        files.update({str(Path(entry.file).parent / f): h for f, h in entry.external_data.items()})
        for form in entry.forms.values():
            files[form.file] = form.sha256
            files.update({str(Path(form.file).parent / f): h for f, h in form.external_data.items()})
        problems += _missing_or_altered(root, files, f"graph '{entry.name}'", check_hashes)
    shared = manifest.shared_gpt
    if shared is not None:
        files = {shared.file: shared.sha256}
        files.update({str(Path(shared.file).parent / f): h for f, h in shared.external_data.items()})
        problems += _missing_or_altered(root, files, "shared GPT graph", check_hashes)
    for role, asset in manifest.assets.files().items():
        p = Path(root) / asset.file
        if not p.is_file():
            problems.append(f"runtime asset '{role}': file {asset.file} is missing")
        elif check_hashes and sha256_file(p) != asset.sha256:
            problems.append(f"runtime asset '{role}': {asset.file} does not match its recorded sha256")
    return problems


def _missing_or_altered(root: str | Path, files: Mapping[str, str], what: str, check_hashes: bool) -> list[str]:
    problems = []
    for rel, digest in files.items():
        p = Path(root) / rel
        if not p.is_file():
            problems.append(f"{what}: file {rel} is missing")
        elif check_hashes and sha256_file(p) != digest:
            problems.append(f"{what}: {rel} does not match its recorded sha256")
    return problems


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# JSON helpers


def _check_versions(data: Mapping[str, Any], source: str) -> None:
    if data.get("format") != FORMAT:
        raise ContractError(f"{source}: not an IndexTTS2 engines manifest (format {data.get('format')!r}, "
                            f"expected {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ContractError(f"{source}: manifest format version {data.get('format_version')!r}, this toolkit reads "
                            f"version {FORMAT_VERSION}; rebuild with python -m export.build")
    if data.get("contract_version") != CONTRACT_VERSION:
        raise ContractError(f"{source}: graphs were exported for contract version {data.get('contract_version')!r}, "
                            f"this toolkit expects {CONTRACT_VERSION}; rebuild with python -m export.build --force")


def _shared_gpt_from(d: Mapping[str, Any] | None) -> SharedGptGraph | None:
    if d is None:
        return None
    return SharedGptGraph(file=str(d["file"]), sha256=str(d["sha256"]), branches=tuple(str(b) for b in d["branches"]),
                          made_from={str(k): str(v) for k, v in d["made_from"].items()},
                          fingerprint=str(d["fingerprint"]),
                          external_data={str(k): str(v) for k, v in d.get("external_data", {}).items()},
                          shared_bytes=int(d.get("shared_bytes", 0)), recipe=str(d.get("recipe", "")))


def plain_json(obj: Any) -> Any:
    """Tuples -> lists, recursively (JSON has no tuples)."""
    if isinstance(obj, dict):
        return {k: plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    return obj


def _graph_json(g: GraphEntry) -> dict[str, Any]:
    data = plain_json(dataclasses.asdict(g))
    data["ranges"] = {a: [r.min, r.opt, r.max] for a, r in g.ranges.items()}
    data.pop("form_kind")                          # a view's attributes, never written
    data.pop("graph_form")
    if not g.forms:
        data.pop("forms")
    for form in data.get("forms", {}).values():
        for key in ("note", "graph_form"):
            if not form.get(key):
                form.pop(key, None)                # written only when there is something to say
    return data


def _signature_from(d: Mapping[str, Any]) -> TensorSignature:
    return TensorSignature(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


def _graph_from(d: Mapping[str, Any]) -> GraphEntry:
    return GraphEntry(
        name=str(d["name"]), file=str(d["file"]), sha256=str(d["sha256"]), opset=int(d["opset"]),
        exporter=str(d["exporter"]),
        inputs=tuple(_signature_from(t) for t in d["inputs"]),
        outputs=tuple(_signature_from(t) for t in d["outputs"]),
        ranges={a: AxisRange(*(int(v) for v in r)) for a, r in d["ranges"].items()},
        fingerprint=str(d["fingerprint"]),
        external_data={str(k): str(v) for k, v in d.get("external_data", {}).items()},
        lint=str(d.get("lint", "")),
        forms={str(k): _form_from(v) for k, v in d.get("forms", {}).items()},
    )


def _form_from(d: Mapping[str, Any]) -> GraphForm:
    return GraphForm(kind=str(d["kind"]), file=str(d["file"]), sha256=str(d["sha256"]),
                     made_from=str(d["made_from"]), policy_sha256=str(d["policy_sha256"]),
                     external_data={str(k): str(v) for k, v in d.get("external_data", {}).items()},
                     counts={str(k): int(v) for k, v in d.get("counts", {}).items()}, policy=str(d.get("policy", "")),
                     recipe=str(d.get("recipe", "")), note=str(d.get("note", "")),
                     graph_form=str(d.get("graph_form", "")))


def _checkpoint_from(d: Mapping[str, Any]) -> CheckpointIdentity:
    files = {str(k): CheckpointFile(str(v["sha256"]), int(v["size"]), int(v["mtime_ns"]))
             for k, v in d["files"].items()}
    return CheckpointIdentity(str(d["path"]), str(d["config_sha256"]), files)


def _assets_from(d: Mapping[str, Any]) -> RuntimeAssets:
    def asset(v: Any) -> AssetFile | None:
        return None if v is None else AssetFile(str(v["file"]), str(v["sha256"]))

    return RuntimeAssets(bpe=asset(d.get("bpe")), tiktoken=asset(d.get("tiktoken")), glossary=asset(d.get("glossary")),
                         emotion_matrices=asset(d.get("emotion_matrices")),
                         emo_num=tuple(int(n) for n in d.get("emo_num", DEFAULT_EMO_NUM)),
                         emotion_llm=str(d.get("emotion_llm", "")))


def _vocoder_from(d: Mapping[str, Any] | None) -> VocoderLayout | None:
    """The vocoder layout, or None for a manifest written before it was recorded (no key, or null)."""
    if d is None:
        return None
    return VocoderLayout(
        hop_length=int(d["hop_length"]), conv_pre_kernel=int(d["conv_pre_kernel"]),
        upsample_rates=tuple(int(v) for v in d["upsample_rates"]),
        upsample_kernel_sizes=tuple(int(v) for v in d["upsample_kernel_sizes"]),
        resblock_kernel_sizes=tuple(int(v) for v in d["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(tuple(int(v) for v in ds) for ds in d["resblock_dilation_sizes"]),
        conv_post_kernel=int(d["conv_post_kernel"]), resample_ratio=int(d["resample_ratio"]),
        resample_taps=int(d["resample_taps"]),
    )


def _flat(cls: type, d: Mapping[str, Any]) -> Any:
    """A flat dataclass from a mapping; list values become tuples, unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise KeyError(f"{cls.__name__}: unknown keys {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
