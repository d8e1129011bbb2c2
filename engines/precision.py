"""FP16 with FP32 islands (DESIGN.md §5), as data plus one seam that applies it to a TensorRT network.

Why data: which layers must stay in float32 is a finding (from reading the models, later from
calibration), not code. A `PrecisionPolicy` is a JSON file of rules per graph; the default one ships as
engines/policy_default.json and covers the spots DESIGN §5 names (normalization statistics, softmax,
BigVGAN's SnakeBeta, the length regulator's index arithmetic, the DiT time embedding). A later
calibration issue writes a `precision_policy.json` that replaces it when passed explicitly. The
policy's sha256 is part of every fp16/int8 plan's EngineKey, so changing a rule rebuilds the plans.

Form (`version` 1)::

    {"version": 1,
     "graphs": {"<graph name or *>": [
        {"pattern": "<fnmatch on the layer name>",      # required, case-sensitive (fnmatchcase)
         "types": ["<TensorRT LayerType name>", ...],   # optional: the layer's type must be one of these
         "exclude": ["<fnmatch>", ...],                 # optional: names that never match this rule
         "dtype": "fp32",                               # the only island type so far
         "why": "<reason, shown in logs and the plan record>"}]}}

Rules under "*" apply to every graph; rules under a graph name only to that graph. The first matching
rule gives the reason. Layer names: the TensorRT ONNX parser names each layer after its ONNX node, and
the exporter names nodes `<module path>/<op name>` (e.g. `bigvgan.resblocks.0.activations.2.act/sin_8`,
`cfm.estimator.transformer.layers.3.attention_norm/mean_12`), so patterns are written against that form
with leading wildcards. A layer's `metadata` (TensorRT 10 parsers set it to `[ONNX Layer: <node>]`;
seen in third-party tooling, not in NVIDIA's API docs) is matched too when present, and so is the node
name inside it, which covers extra layers the parser creates for one node. Calibration's measured rules
(calibration/policy_writer.py) are exact node names, escaped for fnmatch.

Never forced, whatever the rules say: layers whose outputs are all non-float (INT32/INT64/BOOL: shape
and index arithmetic; TensorRT requires shape tensors in INT32/INT64) and CONSTANT/SHAPE layers. This
filter is a heuristic (TENSORRT_API.md §2), not a documented TensorRT rule.

Applying (`apply_precision`): `layer.precision = trt.float32` and `layer.set_output_type(j, trt.float32)`
for each float output of a selected layer. These are only hints unless the builder config has
`BuilderFlag.OBEY_PRECISION_CONSTRAINTS` (engines/builder.py sets it whenever islands were applied), and
TensorRT 10.12 deprecated both calls together with weak typing ("superseded by strong typing"); the
binding may emit DeprecationWarning, which is silenced here once and noted in the log. Strongly typed
networks reject these calls; the builder never creates one for fp16 (the ONNX graphs are float32, so a
strongly typed fp16 build needs Cast nodes in the graph — the strong-typing route of a later issue).
Docs: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Graph/LayerBase.html
and https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/precision-control.html
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from runtime.errors import InputError
from runtime.trt.api import enum_name

log = logging.getLogger(__name__)

POLICY_VERSION = 1
ALL_GRAPHS = "*"
DEFAULT_POLICY_PATH = Path(__file__).resolve().with_name("policy_default.json")
#: The file a calibration run writes; used only when passed explicitly (build_all(policy_path=...)).
POLICY_FILE_NAME = "precision_policy.json"
ISLAND_DTYPES = ("fp32",)

#: TensorRT DataType names of floating-point tensors (trt.DataType.<name>.name).
FLOAT_DTYPES = frozenset({"FLOAT", "HALF", "BF16"})
#: LayerType names never forced to fp32: weights and shapes, not arithmetic.
NEVER_FORCED_TYPES = frozenset({"CONSTANT", "SHAPE"})

_RULE_KEYS = {"pattern", "ops", "types", "exclude", "dtype", "why"}
_TYPE_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_OP_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_METADATA_NODE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


@dataclass(frozen=True)
class LayerInfo:
    """What the policy looks at in one network layer (plain data, so selection is testable without TRT).

    `type`: the TensorRT LayerType name ("SOFTMAX"); `output_dtypes`: DataType names ("FLOAT", "INT64");
    `metadata`: the layer's metadata string ("" when absent)."""

    name: str
    type: str
    output_dtypes: tuple[str, ...]
    metadata: str = ""
    op: str = ""                       # the ONNX op type, for rules with `ops`

    @property
    def labels(self) -> tuple[str, ...]:
        """What rule patterns are matched against: the name, the metadata string, and the ONNX node name the
        metadata carries (`[ONNX Layer: <node>]`), so an exact node-name pattern (what calibration writes)
        also covers the extra layers the parser creates for that node."""
        if not self.metadata:
            return (self.name,)
        found = _METADATA_NODE.search(self.metadata)
        return (self.name, self.metadata) + ((found.group(1),) if found else ())

    @property
    def has_float_output(self) -> bool:
        return any(d in FLOAT_DTYPES for d in self.output_dtypes)


@dataclass(frozen=True)
class PolicyRule:
    pattern: str
    types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dtype: str = "fp32"
    why: str = ""
    ops: tuple[str, ...] = ()

    def matches(self, layer: LayerInfo) -> bool:
        if self.types and layer.type not in self.types:
            return False
        if self.ops and layer.op not in self.ops:
            return False
        labels = layer.labels
        if not any(fnmatch.fnmatchcase(s, self.pattern) for s in labels):
            return False
        return not any(fnmatch.fnmatchcase(s, x) for s in labels for x in self.exclude)

    def describe(self, scope: str) -> str:
        where = (f"{scope}:{self.pattern}" + (f" ops={','.join(self.ops)}" if self.ops else "")
                 + (f" types={','.join(self.types)}" if self.types else ""))
        return f"{self.why} [{where}]" if self.why else f"[{where}]"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": self.pattern}
        if self.ops:
            out["ops"] = list(self.ops)
        if self.types:
            out["types"] = list(self.types)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        out["dtype"] = self.dtype
        out["why"] = self.why
        return out


@dataclass(frozen=True)
class PrecisionPolicy:
    """Rules per graph ("*" = every graph). `source` (where it was read from) is not part of its identity."""

    graphs: Mapping[str, tuple[PolicyRule, ...]]
    version: int = POLICY_VERSION
    source: str = field(default="", compare=False)

    def rules_for(self, graph: str) -> list[tuple[str, PolicyRule]]:
        """(scope, rule) pairs that apply to `graph`: the "*" rules first, then the graph's own."""
        rules = [(ALL_GRAPHS, r) for r in self.graphs.get(ALL_GRAPHS, ())]
        if graph != ALL_GRAPHS:
            rules += [(graph, r) for r in self.graphs.get(graph, ())]
        return rules

    def to_json(self) -> dict[str, Any]:
        graphs = {g: [r.to_json() for r in rules] for g, rules in self.graphs.items()}
        return {"version": self.version, "graphs": graphs}

    def sha256(self) -> str:
        """Identity of the rules (canonical JSON; the file's formatting and `source` do not matter)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Any, source: str = "<policy>") -> "PrecisionPolicy":
        """Parse and validate; every problem is listed in one InputError naming `source`."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise InputError(f"precision policy {source}: top level must be an object, got {type(data).__name__}")
        extra = sorted(set(data) - {"version", "graphs"})
        if extra:
            problems.append(f"unknown top-level keys {extra}")
        if data.get("version") != POLICY_VERSION:
            problems.append(f"version {data.get('version')!r}, this toolkit reads version {POLICY_VERSION}")
        graphs_data = data.get("graphs")
        graphs: dict[str, tuple[PolicyRule, ...]] = {}
        if not isinstance(graphs_data, dict):
            problems.append("'graphs' must be an object of graph name -> list of rules")
            graphs_data = {}
        for graph, rules in graphs_data.items():
            if not isinstance(rules, list):
                problems.append(f"graphs.{graph}: must be a list of rules")
                continue
            parsed = []
            for i, rule in enumerate(rules):
                r, bad = _rule_from(rule, f"graphs.{graph}[{i}]")
                problems += bad
                if r is not None:
                    parsed.append(r)
            graphs[str(graph)] = tuple(parsed)
        if problems:
            raise InputError(f"precision policy {source}: " + "; ".join(problems)
                             + f" (see engines/precision.py for the form; the default is {DEFAULT_POLICY_PATH})")
        return cls(graphs, POLICY_VERSION, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "PrecisionPolicy":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise InputError(f"precision policy {path}: file not found") from err
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"precision policy {path}: unreadable ({err})") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"precision policy {path}: not JSON (line {err.lineno}, column {err.colno}: "
                             f"{err.msg})") from err
        return cls.from_json(data, str(path))


def _rule_from(data: Any, where: str) -> tuple[PolicyRule | None, list[str]]:
    if not isinstance(data, dict):
        return None, [f"{where}: a rule must be an object"]
    problems = []
    extra = sorted(set(data) - _RULE_KEYS)
    if extra:
        problems.append(f"{where}: unknown keys {extra} (allowed: {sorted(_RULE_KEYS)})")
    pattern = data.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        problems.append(f"{where}: 'pattern' must be a non-empty string")
    types = data.get("types", [])
    if not isinstance(types, list) or not all(isinstance(t, str) and _TYPE_NAME.match(t) for t in types):
        problems.append(f"{where}: 'types' must be a list of TensorRT LayerType names in capitals "
                        f"(e.g. SOFTMAX), got {types!r}")
    ops = data.get("ops", [])
    if not isinstance(ops, list) or not all(isinstance(t, str) and _OP_NAME.match(t) for t in ops):
        problems.append(f"{where}: 'ops' must be a list of ONNX op types (e.g. Softmax), got {ops!r}")
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(x, str) and x for x in exclude):
        problems.append(f"{where}: 'exclude' must be a list of patterns, got {exclude!r}")
    dtype = data.get("dtype", "fp32")
    if dtype not in ISLAND_DTYPES:
        problems.append(f"{where}: dtype {dtype!r}; supported: {', '.join(ISLAND_DTYPES)}")
    why = data.get("why", "")
    if not isinstance(why, str):
        problems.append(f"{where}: 'why' must be a string")
    if problems:
        return None, problems
    return PolicyRule(pattern, tuple(types), tuple(exclude), dtype, why, tuple(ops)), []


def default_policy() -> PrecisionPolicy:
    """The shipped policy (engines/policy_default.json, package data next to this module)."""
    if not DEFAULT_POLICY_PATH.is_file():
        raise InputError(f"precision policy {DEFAULT_POLICY_PATH}: the default policy is missing from this "
                         "installation (package data not installed); reinstall, or pass a policy file")
    return PrecisionPolicy.from_file(DEFAULT_POLICY_PATH)


def load_policy(path: str | Path | None = None) -> PrecisionPolicy:
    """The policy at `path` (e.g. a calibration run's precision_policy.json), else the shipped default."""
    policy = default_policy() if path is None else PrecisionPolicy.from_file(path)
    log.debug("precision policy %s (sha256 %s)", policy.source, policy.sha256()[:12])
    return policy


# ---------------------------------------------------------------------------------------------------
# Selection (pure)


def forceable(layer: LayerInfo) -> bool:
    """Whether forcing fp32 on `layer` means anything: it computes at least one float output and is not
    a constant or shape layer."""
    return layer.type not in NEVER_FORCED_TYPES and layer.has_float_output


def select_fp32_layers(graph: str, layers: Iterable[LayerInfo], policy: PrecisionPolicy) -> list[tuple[str, str]]:
    """(layer name, reason) of every layer of `graph` the policy keeps in float32, in network order."""
    return [(layer.name, reason) for _, layer, reason in _select(graph, list(layers), policy)]


def _select(graph: str, layers: Sequence[LayerInfo], policy: PrecisionPolicy) -> list[tuple[int, LayerInfo, str]]:
    rules = policy.rules_for(graph)
    out = []
    for i, layer in enumerate(layers):
        if not forceable(layer):
            continue
        for scope, rule in rules:
            if rule.matches(layer):
                out.append((i, layer, rule.describe(scope)))
                break
    return out


# ---------------------------------------------------------------------------------------------------
# The TensorRT seam


def layer_info(layer: Any) -> LayerInfo:
    """LayerInfo of one trt.ILayer (name, type, each output's dtype, metadata when the binding has it)."""
    dtypes = []
    for j in range(int(layer.num_outputs)):
        out = layer.get_output(j)
        dtypes.append(enum_name(out.dtype) if out is not None else "NONE")
    metadata = getattr(layer, "metadata", "") or ""
    return LayerInfo(str(layer.name), enum_name(layer.type), tuple(dtypes), str(metadata))


def network_layers(network: Any) -> list[tuple[Any, LayerInfo]]:
    return [(layer, layer_info(layer)) for layer in (network.get_layer(i) for i in range(int(network.num_layers)))]


def unknown_layer_types(graph: str, policy: PrecisionPolicy, trt: Any) -> list[str]:
    """LayerType names in the rules for `graph` that this TensorRT does not have (a typo never matches)."""
    names = {t for _, r in policy.rules_for(graph) for t in r.types}
    return sorted(t for t in names if not hasattr(trt.LayerType, t))


def apply_precision(network: Any, graph: str, policy: PrecisionPolicy, trt: Any) -> list[tuple[str, str]]:
    """Force the policy's layers of `graph` to float32 in a parsed (weakly typed) network.

    -> [(layer name, reason)] of the layers set. The caller must set BuilderFlag.OBEY_PRECISION_CONSTRAINTS
    when the list is not empty, else TensorRT may still pick fp16 kernels for them."""
    unknown = unknown_layer_types(graph, policy, trt)
    if unknown:
        log.warning("precision policy %s: LayerType(s) %s do not exist in this TensorRT; those rules never match",
                    policy.source, unknown)
    pairs = network_layers(network)
    chosen = _select(graph, [info for _, info in pairs], policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        for i, info, _ in chosen:
            layer = pairs[i][0]
            layer.precision = trt.float32
            for j, dtype in enumerate(info.output_dtypes):
                if dtype in FLOAT_DTYPES:
                    layer.set_output_type(j, trt.float32)
    deprecations = {str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)}
    for message in sorted(deprecations):
        log.debug("TensorRT: %s (per-layer precision is deprecated since 10.12 in favour of strong typing; "
                  "still honoured for weakly typed networks)", message)
    for w in caught:
        if not issubclass(w.category, DeprecationWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return [(info.name, reason) for _, info, reason in chosen]
