"""TensorRT plans for an IndexTTS-2.5 export, on the CPU through the fake TensorRT of tests/trt/fake_builder.py
(as tests/test_engines.py does for 2.0): every graph of the 2.5 set builds, with optimization profiles from the
2.5 contracts — the DiT and BigVGAN mel axes sized for duration factor 2, the codec decoder over up to
max_mel_tokens codes, the prefill's style and language inputs, the decode buckets of 2.0."""

from __future__ import annotations

import shutil

from engines import build_all
from engines.builder import profile_calls
from runtime.contracts import CODE, GEN_MEL_25, MEL25
from runtime.manifest import read_manifest
from runtime.trt.engine_plan import GpuInfo, decode_buckets

from tests.trt.fake_builder import fake_trt_for

RTX3090 = GpuInfo("NVIDIA GeForce RTX 3090", "8.6")


def _shapes(entry) -> dict[str, tuple]:
    ((_, calls),) = profile_calls(entry)
    return {name: (lo, opt, hi) for name, lo, opt, hi in calls}


def test_every_2_5_graph_gets_a_plan_with_the_2_5_profiles(tiny25_export, tmp_path) -> None:
    root = tmp_path / "out"
    shutil.copytree(tiny25_export[0], root)                 # the plans are written beside the graphs
    manifest = read_manifest(root)
    trt = fake_trt_for(manifest, form="fp32")
    results = build_all(manifest, root, "fp32", trt=trt, gpu=RTX3090)
    assert results.ok and [o.graph for o in results.outcomes] == list(manifest.graphs)
    assert [p.name for p in results.plans] == [f"{g}.fp32.plan" for g in manifest.graphs]
    assert len(trt.builds) == 9 and not {"gpt_latent", "semantic_codec", "speaker_conditioner"} & set(manifest.graphs)

    # what each build's profiles were: the builder's set_shape calls equal the contracts' ranges
    built = {o.graph: config for o, (_, config) in zip(results.outcomes, trt.builds)}
    for graph, config in built.items():
        assert [p.shapes for p in config.profiles] == [list(c) for _, c in profile_calls(manifest.graph(graph))]

    d = manifest.dims
    dit = _shapes(manifest.graph("dit_step"))
    assert dit["x"][2] == (4, 80, MEL25.max) and MEL25.max == 13_779 == int(2 * 1815 * 1.72 * 2) + 1292
    assert dit["cond"][2] == (4, MEL25.max, d.content_dim)
    assert _shapes(manifest.graph("bigvgan"))["mel"][2][2] == GEN_MEL_25 == 12_487
    codes = _shapes(manifest.graph("semantic_decoder"))["codes"]
    assert codes[0] == (1, CODE.min) and codes[2] == (4, d.max_mel_tokens)   # up to the checkpoint's code limit
    regulator = _shapes(manifest.graph("length_regulator"))
    assert regulator["s"][2][1] == 2 * CODE.max == 3630                  # S_infer = 2N codec frames
    prefill = _shapes(manifest.graph("gpt_prefill"))
    assert set(prefill) == {"style", "lang_id", "emovec", "text_ids"}
    assert prefill["lang_id"] == ((1,), (1,), (4,)) and prefill["style"][2] == (4, d.style_dim)
    decode = [label for label, _ in profile_calls(manifest.graph("gpt_decode"))]
    assert decode == [f"cache_len={b}" for b in decode_buckets(manifest.graph("gpt_decode"))]
