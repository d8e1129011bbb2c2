"""The fp16 form of every exported graph: `OUT/onnx/fp16/<graph>.onnx`, the graph strongly typed engines
and ONNX Runtime CUDA run (precision in the graph; engines/mixed_precision.py).

Made from the float32 file and the precision policy (the shipped default, or a calibration run's
`precision_policy.json` given as `--precision-policy`), checked like every exported graph (onnx.checker,
strict shape inference, the contract's I/O: names, dtypes, ranks — the runtime feeds the same arrays to
either form), and recorded in the manifest entry's `forms["fp16"]` with the float32 file's and the
policy's sha256. A form whose float32 file and policy are unchanged is reused without loading anything.
Torch-free: only onnx and numpy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from runtime.contracts import GraphContract, ModelDims
from runtime.errors import ContractError
from runtime.manifest import ONNX_DIR, GraphEntry, GraphForm, sha256_file

log = logging.getLogger("export.build")

FP16 = "fp16"
TWO_GIB = 2 ** 31 - 1024


def form_file(name: str, kind: str = FP16) -> str:
    return f"{ONNX_DIR}/{kind}/{name}.onnx"


def recipe(policy_sha256: str) -> str:
    """What a form is made with besides its float32 file: the policy and the pass's own code."""
    import hashlib

    import engines.mixed_precision as mp

    code = hashlib.sha256(Path(mp.__file__).read_bytes()).hexdigest()
    return hashlib.sha256(f"{policy_sha256}:{code}".encode()).hexdigest()


def reusable_form(entry: GraphEntry, recipe_sha256: str, out: Path, kind: str = FP16) -> bool:
    """The recorded form exists, was made from this float32 file with this recipe, and its files are there."""
    form = entry.forms.get(kind)
    if form is None or form.made_from != entry.sha256 or form.recipe != recipe_sha256:
        return False
    path = out / form.file
    return path.is_file() and all((path.parent / f).is_file() for f in form.external_data) \
        and sha256_file(path) == form.sha256


def write_fp16_forms(entries: Mapping[str, GraphEntry], contracts: Mapping[str, GraphContract], dims: ModelDims,
                     out: Path, policy_path: Path | None = None) -> tuple[dict[str, GraphEntry], dict[str, str]]:
    """Every entry with its fp16 form made (or reused). -> (entries, {graph: failure}); a failed graph keeps
    its entry without the form and the others go on."""
    from engines.precision import load_policy

    policy = load_policy(policy_path)
    digest = recipe(policy.sha256())
    result: dict[str, GraphEntry] = {}
    failed: dict[str, str] = {}
    for i, (name, entry) in enumerate(entries.items(), 1):
        tag = f"[{i}/{len(entries)}] {name}"
        if reusable_form(entry, digest, out):
            log.info("%s: fp16 form unchanged, reused %s", tag, entry.forms[FP16].file)
            result[name] = entry
            continue
        t0 = time.perf_counter()
        try:
            form = make_fp16_form(entry, contracts[name], dims, out, policy, digest)
        except Exception as err:  # noqa: BLE001 — reported per graph
            log.error("%s: fp16 form FAILED: %s", tag, err, exc_info=not isinstance(err, ContractError))
            failed[name] = f"{type(err).__name__}: {err}"
            result[name] = replace(entry, forms={k: v for k, v in entry.forms.items() if k != FP16})
            continue
        log.info("%s: fp16 form %s: %d fp16 / %d fp32 nodes, %d Casts (%.1f s)", tag, form.file,
                 form.counts["fp16_nodes"], form.counts["fp32_nodes"], form.counts["casts_added"],
                 time.perf_counter() - t0)
        result[name] = replace(entry, forms={**entry.forms, FP16: form})
    return result, failed


def make_fp16_form(entry: GraphEntry, contract: GraphContract, dims: ModelDims, out: Path, policy,
                   recipe_sha256: str = "") -> GraphForm:
    """Load the float32 graph, apply the policy's islands, check, save; -> the manifest's record."""
    import onnx

    from engines.mixed_precision import float_io_preserved, precision_summary, to_mixed_precision

    from . import graph_checks

    model = onnx.load(str(entry.path(out)))
    mixed = to_mixed_precision(model, entry.name, policy)
    problems = float_io_preserved(model, mixed.model)
    del model
    if problems:
        raise ContractError(f"graph '{entry.name}': the fp16 form changed the graph's signature: {'; '.join(problems)}")
    rel = form_file(entry.name)
    path = out / rel
    save(mixed.model, path)
    graph_checks.check_model(path, contract, dims)
    return GraphForm(kind=FP16, file=rel, sha256=sha256_file(path), made_from=entry.sha256,
                     policy_sha256=policy.sha256(), policy=str(policy.source),
                     external_data={f: sha256_file(path.parent / f) for f in graph_checks.external_data_files(path)},
                     counts=dict(precision_summary(mixed)), recipe=recipe_sha256)


def save(model, path: Path) -> None:
    """Write `model`, its weights in `<file>.data` beside it when one protobuf could not hold them. A stale
    data file is removed first (onnx appends to an existing one)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    big = sum(init.ByteSize() for init in model.graph.initializer) > TWO_GIB // 2
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
