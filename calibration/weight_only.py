"""The weight-only int8 form of the GPT decode step for the CPU: `OUT/onnx/cpu/gpt_decode.int8w.onnx`.

Why: the decode step reads every GPT weight once per generated token, so on a CPU its time is the time to
stream ~1.8 GB of float32 weights (benchmarks/roofline.py). ONNX Runtime's `MatMulNBits` keeps the weights in
8 bits (symmetric, one float32 scale per block of 32 input rows) and computes with int8 dot products
(`accuracy_level` 4: activations quantized per block on the fly), a quarter of the bytes per step. Measured
on the full-size demo (benchmarks/RESULTS.md, "CPU plan"): about half the step time, logits within ~1 % of
float32. 4 bits halve the bytes again but moved the logits by ~11 %, for no further speed here; not offered.

Only the MatMuls with a constant weight are quantized (ONNX Runtime's MatMulNBitsQuantizer); the graph's
inputs, outputs and metadata are those of the float32 graph, so the runtime feeds it as it feeds that one.
Whether a plan may use it is decided by the same end-to-end gates as bf16 (benchmarks/cpu_plan.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from runtime.manifest import ONNX_DIR, GraphEntry, sha256_file

log = logging.getLogger(__name__)

WEIGHT_ONLY = "int8w"
BITS = 8
BLOCK = 32
#: the graphs a weight-only form is offered for: the step that streams its weights every token
GRAPHS = ("gpt_decode",)


def form_file(graph: str) -> str:
    return f"{ONNX_DIR}/cpu/{graph}.{WEIGHT_ONLY}.onnx"


def write_weight_only(entry: GraphEntry, root: Path) -> dict[str, Any]:
    """Write the weight-only int8 form of `entry`'s float32 graph under `root` -> its record for the plan:
    {"file", "sha256", "external_data": {name: sha256}, "made_from": the float32 file's sha256, "bits", "block"}."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    t0 = time.perf_counter()
    model = onnx.load(str(entry.path(root)))
    meta = {p.key: p.value for p in model.metadata_props}
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=4, bits=BITS)
    quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK, is_symmetric=True, accuracy_level=4,
                                     algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    del out.metadata_props[:]
    onnx.helper.set_model_props(out, meta)          # the float32 graph's identity: graph name, fingerprint
    rel = form_file(entry.name)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(out, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    quantized = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    log.info("%s: weight-only int8 form %s (%d MatMuls quantized) in %.1f s", entry.name, rel, quantized,
             time.perf_counter() - t0)
    return {"file": rel, "sha256": sha256_file(path), "external_data": {data.name: sha256_file(data)},
            "made_from": entry.sha256, "bits": BITS, "block": BLOCK, "quantized_matmuls": quantized}
