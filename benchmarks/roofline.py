"""The decode step's memory roofline: the time it takes just to read the bytes a step must read, at the
memory bandwidth measured in the same run.

A GPT decode step at batch <= 3 does ~2 flops per weight byte read, far below what a CPU (or GPU) can
compute per byte it can fetch, so its floor is bytes / bandwidth. The bytes per token are every weight
the step streams through (the initializers of the `gpt_decode` graph, except tables it only gathers rows
from: the embeddings and position tables, of which a step touches one row each) plus, as a second line,
the KV cache it attends over at the measured cache length.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GATHER_OPS = {"Gather", "GatherElements", "GatherND"}


@dataclass(frozen=True)
class DecodeBytes:
    weights: int            # streamed per step
    gathered_tables: int    # embedding / position tables (one row per step is read; not counted above)
    kv_cache: int           # the cache inputs of the measured feed


def decode_weight_bytes(onnx_path: Path) -> tuple[int, int]:
    """(bytes of weights a decode step streams, bytes of tables it only gathers from) of an ONNX graph.
    Reads the graph structure only; the sizes come from the initializers' shapes."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, set[str]] = defaultdict(set)

    def visit(g: "onnx.GraphProto") -> None:
        for node in g.node:
            for name in node.input:
                consumers[name].add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(graph)
    streamed = gathered = 0
    for init in graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        nbytes = int(np.prod(init.dims, dtype=np.int64)) * itemsize
        ops = consumers.get(init.name, set())
        if ops and ops <= GATHER_OPS:
            gathered += nbytes
        else:
            streamed += nbytes
    return streamed, gathered


def kv_bytes(feed: dict[str, np.ndarray]) -> int:
    """Bytes of the KV-cache inputs (`kv_cache.<i>`) of a decode feed."""
    return int(sum(v.nbytes for k, v in feed.items() if k.startswith("kv_cache.")))


@dataclass(frozen=True)
class Roofline:
    bandwidth_gbs: float
    bytes: DecodeBytes
    weights_ms: float           # weights / bandwidth
    weights_and_kv_ms: float    # (weights + KV cache) / bandwidth

    @classmethod
    def of(cls, onnx_path: Path, decode_feed: dict[str, np.ndarray], bandwidth_gbs: float) -> "Roofline":
        streamed, gathered = decode_weight_bytes(onnx_path)
        kv = kv_bytes(decode_feed)
        per_ms = bandwidth_gbs * 1e9 / 1e3
        return cls(bandwidth_gbs, DecodeBytes(streamed, gathered, kv), streamed / per_ms, (streamed + kv) / per_ms)
