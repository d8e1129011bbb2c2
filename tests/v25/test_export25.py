"""`python -m export.build` on an IndexTTS-2.5 checkpoint: the 2.5 graph set, the version and the tokenizer in
the manifest, and ONNX Runtime vs eager parity of the graphs 2.5 adds (its other graphs are 2.0's wrappers,
verified by the 2.0 export tests)."""

from __future__ import annotations

from runtime.contracts import graph_names
from runtime.manifest import read_manifest


def test_the_2_5_export_holds_its_graph_set(tiny25_export) -> None:
    out, report = tiny25_export
    manifest = read_manifest(out, check_files=True, check_hashes=True)
    assert manifest.version == "2.5"
    assert tuple(manifest.graphs) == graph_names("2.5")
    assert manifest.assets.tiktoken is not None and manifest.assets.bpe is None
    assert manifest.graph("gpt_prefill").inputs[0].name == "style"


def test_new_graphs_match_eager(tiny25_export) -> None:
    from export.verify import verify

    out, _ = tiny25_export
    rows = verify(out, graphs=["gpt_prefill", "semantic_decoder"])
    assert rows and all(rows), "\n".join(str(r) for r in rows if not r)
