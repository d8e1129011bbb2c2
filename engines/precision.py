"""FP16 with FP32 islands (DESIGN.md §5): which nodes of each graph stay float32, as data.

Why data: which nodes must stay in float32 is a finding (from reading the models, later from calibration),
not code. A `PrecisionPolicy` is a JSON file of rules per graph; the default one ships as
engines/policy_default.json and covers the spots DESIGN §5 names (normalization statistics, softmax,
reductions, BigVGAN's SnakeBeta, the length regulator's index arithmetic, the DiT time embedding, CAMPPlus
statistics pooling, the codec's codebook search). A calibration run writes a `precision_policy.json` that
replaces it when passed explicitly (`export.build --precision-policy FILE`).

Where it acts: precision lives in the graph. The mixed-precision pass (engines/mixed_precision.py) writes
each graph's fp16 form with the policy's nodes in float32 and explicit Casts at the borders, and TensorRT
builds that graph strongly typed (TensorRT 11 removed per-layer precision and the precision flags); the
calibration's emulation is derived from the same form. The policy's sha256 is recorded with every form and
enters every fp16/int8 plan's key.

Form (`version` 1)::

    {"version": 1,
     "graphs": {"<graph name or *>": [
        {"pattern": "<fnmatch on the node name>",       # required, case-sensitive (fnmatchcase)
         "ops": ["<ONNX op type>", ...],                # optional: the node's op must be one of these
         "types": ["<TensorRT LayerType name>", ...],   # optional, older files: the op's main TensorRT layer
         "exclude": ["<fnmatch>", ...],                 # optional: names that never match this rule
         "dtype": "fp32",                               # the only island type so far
         "why": "<reason, shown in logs and the form's record>"}]}}

Rules under "*" apply to every graph; rules under a graph name only to that graph. The first matching
rule gives the reason. Node names: the exporter names nodes `<module path>/<op name>` (e.g.
`bigvgan.resblocks.0.activations.2.act/sin_8`, `cfm.estimator.transformer.layers.3.attention_norm/mean_12`),
so patterns are written against that form with leading wildcards; calibration's measured rules are exact
node names, escaped for fnmatch. `types` (TensorRT LayerType names, from the weakly typed era) are matched
through the approximate op -> layer table engines.mixed_precision.ONNX_TO_TRT_LAYER; new rules use `ops`.
A node's `metadata` label (TensorRT parsers' `[ONNX Layer: <node>]`) is still matched when present.

Never forced, whatever the rules say: nodes whose outputs are all non-float (INT32/INT64/BOOL: shape and
index arithmetic) and Constant/Shape nodes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from runtime.errors import InputError

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
