"""The GPT graphs as one ONNX file whose weights are stored and held once: `OUT/onnx/cpu/gpt_shared.onnx`.

Why: `gpt_prefill`, `gpt_decode` (and 2.0's `gpt_latent`) carry the same ~1.8 GB of GPT weights; three ONNX
Runtime sessions hold three copies (issue 22: 8.9 GiB of models on ONNX Runtime against eager's 6.0).
Measured on the full-size 2.0 export (benchmarks/RESULTS.md, "CPU plan"): sharing the initializers
between sessions (SessionOptions.add_initializer) does not help, because every session pre-packs its own copy
for its MatMul kernels (+1.9 GiB on top of 5.4), and turning pre-packing off makes the decode step ~3x
slower; ONNX Runtime's cross-session pre-packed weights container is not reachable from Python. One session
pre-packs an initializer once for all its kernels, and runs only the nodes of the branch an `If` takes, so
the graphs become the branches of one model:

    branch (int64 scalar) -> If(branch == 0, <graph 0>, <empty>), If(branch == 1, <graph 1>, <empty>), ...

Every If is a direct subgraph of the top-level graph: ONNX Runtime pre-packs an outer-scope weight only for
kernels one scope down (onnxruntime/core/framework/session_state.cc, the outer-scope walk in the pre-packing
of constant initializers), so a nested chain of Ifs would leave the deeper branches unpacked (slower) and keep
the raw weights beside the packed ones; with one level, all branches share one packed copy (the packed
weights of one session are cached by content) and the raw copy is freed.

Inputs are the graphs' inputs named `<graph>/<input>`, each with an empty default (an initializer of the
same name), so a call feeds only its own graph's inputs; outputs are `<graph>/<output>` (empty tensors from
the Ifs not taken). Initializers with the same name and the same bytes in two or
more graphs are stored once in the outer graph; the others are renamed `<graph>/<name>`. Nothing is
computed differently: each branch is its graph's nodes, renamed. The runtime side (which call feeds which
branch) is runtime/executors/gpt_session.py; the manifest records the file, its branches and the float32
files it was made from (`Manifest.shared_gpt`), and a stale file is not used.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from runtime.manifest import ONNX_DIR, GraphEntry, SharedGptGraph, sha256_file

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("export.build")

SHARED_FILE = f"{ONNX_DIR}/cpu/gpt_shared.onnx"
SHARED_GRAPH_NAME = "gpt_shared"
BRANCH_INPUT = "branch"
#: the GPT graphs of each IndexTTS2 version that share the GPT's weights, in branch order
GPT_GRAPHS = ("gpt_decode", "gpt_prefill", "gpt_latent")


def shared_fingerprint(made_from: Mapping[str, str]) -> str:
    return hashlib.sha256(";".join(f"{g}={s}" for g, s in sorted(made_from.items())).encode()).hexdigest()


def recipe() -> str:
    """What the file is made with besides the float32 graphs: this module's code."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def reusable(record: SharedGptGraph | None, entries: Mapping[str, GraphEntry], out: Path) -> bool:
    """The recorded file was made from exactly these float32 files, by this code, and is intact."""
    if record is None or record.recipe != recipe():
        return False
    made_from = {g: entries[g].sha256 for g in record.branches if g in entries}
    path = out / record.file
    return (dict(record.made_from) == made_from and len(made_from) == len(record.branches)
            and path.is_file() and all((path.parent / f).is_file() for f in record.external_data)
            and sha256_file(path) == record.sha256)


def write_shared_gpt(entries: Mapping[str, GraphEntry], out: Path,
                     previous: SharedGptGraph | None = None) -> SharedGptGraph | None:
    """Write (or reuse) the shared GPT file of the GPT graphs among `entries`; None when fewer than two."""
    branches = tuple(g for g in GPT_GRAPHS if g in entries)
    if len(branches) < 2:
        return None
    if reusable(previous, entries, out):
        log.info("gpt_shared: unchanged, reused %s", previous.file)
        return previous
    import onnx

    from export import graph_checks
    from export.precision_forms import save

    t0 = time.perf_counter()
    models = {g: onnx.load(str(entries[g].path(out))) for g in branches}
    graph_fingerprints = {g: {p.key: p.value for p in models[g].metadata_props}.get("indextts2.fingerprint", "")
                          for g in branches}
    merged, shared_bytes = merge_graphs(models, branches)
    del models
    made_from = {g: entries[g].sha256 for g in branches}
    _set_metadata(merged, shared_fingerprint(made_from), graph_fingerprints)
    path = out / SHARED_FILE
    save(merged, path)
    del merged
    record = SharedGptGraph(file=SHARED_FILE, sha256=sha256_file(path), branches=branches, made_from=made_from,
                            external_data={f: sha256_file(path.parent / f)
                                           for f in graph_checks.external_data_files(path)},
                            shared_bytes=shared_bytes, fingerprint=shared_fingerprint(made_from), recipe=recipe())
    log.info("gpt_shared: %s from %s in %.1f s (%.2f GiB of weights stored once for all of them)", SHARED_FILE,
             ", ".join(branches), time.perf_counter() - t0, shared_bytes / 2**30)
    return record


def merge_graphs(models: Mapping[str, "onnx.ModelProto"], branches: Sequence[str]) -> tuple["onnx.ModelProto", int]:
    """One model whose `If` branches are the given graphs (module docstring). -> (model, bytes of the weights
    stored once instead of in every graph that has them)."""
    import onnx
    from onnx import TensorProto, helper

    shared, shared_bytes = _shared_initializers(models, branches)
    outer_inits: dict[str, TensorProto] = {}
    bodies = []
    inputs, outputs, defaults = [], [], []
    for g in branches:
        graph = models[g].graph
        rename = _renamer(g, shared)
        for init in graph.initializer:
            name = rename(init.name)
            if name not in outer_inits:
                t = TensorProto()
                t.CopyFrom(init)
                t.name = name
                outer_inits[name] = t
        nodes = []
        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"{g}: node {node.name} ({node.op_type}) has a subgraph; merging supports flat graphs")
            n = onnx.NodeProto()
            n.CopyFrom(node)
            n.name = f"{g}/{node.name}"
            n.input[:] = [rename(x) if x else x for x in node.input]
            n.output[:] = [rename(x) if x else x for x in node.output]
            nodes.append(n)
        value_info = []
        for vi in graph.value_info:
            v = onnx.ValueInfoProto()
            v.CopyFrom(vi)
            v.name = rename(vi.name)
            value_info.append(v)
        for inp in graph.input:
            v = onnx.ValueInfoProto()
            v.CopyFrom(inp)
            v.name = f"{g}/{inp.name}"
            inputs.append(v)
            defaults.append(_empty_default(v))
        bodies.append((g, nodes, value_info, [f"{g}/{o.name}" for o in graph.output]))
        for out in graph.output:
            outputs.append(_unknown_shape(f"{g}/{out.name}", out))
    # one If per graph, every one a direct subgraph of the top-level graph: ONNX Runtime pre-packs an outer-scope
    # weight only for kernels one scope down (nested Ifs would run unpacked and keep the raw copy too)
    top_nodes = []
    for i, (g, nodes, value_info, own) in enumerate(bodies):
        kinds = {o.name: o for o in outputs if o.name in own}
        then_graph = helper.make_graph(nodes, f"{g}_branch", [], [_unknown_shape(o, kinds[o]) for o in own],
                                       value_info=value_info)
        empties = []
        else_outputs = []
        for o in own:
            ttype = kinds[o].type.tensor_type
            filler = f"{g}/skipped:{o}"
            empty = helper.make_tensor(filler + ":value", ttype.elem_type, [0] * len(ttype.shape.dim), [])
            empties.append(helper.make_node("Constant", [], [filler], name=filler, value=empty))
            else_outputs.append(_unknown_shape(filler, kinds[o]))
        else_graph = helper.make_graph(empties, f"{g}_skipped", [], else_outputs)
        index = helper.make_tensor(f"branch/index:{i}:value", TensorProto.INT64, [], [i])
        top_nodes += [helper.make_node("Constant", [], [f"branch/index:{i}"], name=f"branch/index:{i}", value=index),
                      helper.make_node("Equal", [BRANCH_INPUT, f"branch/index:{i}"], [f"branch/is:{i}"],
                                       name=f"branch/is:{i}"),
                      helper.make_node("If", [f"branch/is:{i}"], own, name=f"branch/if:{i}",
                                       then_branch=then_graph, else_branch=else_graph)]
    branch_input = helper.make_tensor_value_info(BRANCH_INPUT, TensorProto.INT64, [])
    top = helper.make_graph(top_nodes, SHARED_GRAPH_NAME, [branch_input, *inputs], outputs,
                            initializer=[*outer_inits.values(), *defaults])
    first = models[branches[0]]
    model = helper.make_model(top, opset_imports=list(first.opset_import))
    model.ir_version = first.ir_version
    return model, shared_bytes


def _shared_initializers(models: Mapping[str, "onnx.ModelProto"], branches: Sequence[str]) -> tuple[set[str], int]:
    """Names whose tensor (dims, type, bytes) is identical in every graph that has it, in at least two graphs."""
    seen: dict[str, list] = {}
    for g in branches:
        for init in models[g].graph.initializer:
            seen.setdefault(init.name, []).append(init)
    shared, size = set(), 0
    for name, inits in seen.items():
        if len(inits) < 2:
            continue
        first = inits[0]
        key = (tuple(first.dims), first.data_type, _payload(first))
        if all((tuple(t.dims), t.data_type, _payload(t)) == key for t in inits[1:]):
            shared.add(name)
            size += len(key[2])
    return shared, size


def _payload(t) -> bytes:
    from onnx import numpy_helper

    return t.raw_data if t.raw_data else numpy_helper.to_array(t).tobytes()


def _renamer(graph: str, shared: set[str]):
    def rename(name: str) -> str:
        return name if name in shared else f"{graph}/{name}"
    return rename


def _unknown_shape(name: str, like) -> "onnx.ValueInfoProto":
    """A value of `like`'s element type and rank whose dims are all unknown (branches differ in shape)."""
    from onnx import helper

    ttype = like.type.tensor_type
    return helper.make_tensor_value_info(name, ttype.elem_type, [None] * len(ttype.shape.dim))


def _empty_default(value_info) -> "onnx.TensorProto":
    """An initializer named like the input, of its type, with every dynamic axis 0 (static dims kept): the input
    may then be left out of a call that runs another branch."""
    from onnx import helper

    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value_info.type.tensor_type.shape.dim]
    size = 1
    for d in dims:
        size *= d
    return helper.make_tensor(value_info.name, value_info.type.tensor_type.elem_type, dims, [0] * size)


def _set_metadata(model, fingerprint: str, graph_fingerprints: Mapping[str, str]) -> None:
    """The file's own identity, and each branch's build fingerprint (`indextts2.fingerprint.<graph>`: the
    runtime checks a branch against its manifest entry as it checks a graph file of its own)."""
    from onnx import helper

    del model.metadata_props[:]
    helper.set_model_props(model, {"indextts2.graph": SHARED_GRAPH_NAME, "indextts2.fingerprint": fingerprint,
                                   **{f"indextts2.fingerprint.{g}": f for g, f in graph_fingerprints.items()}})
