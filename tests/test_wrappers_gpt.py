"""GPT-side graph wrappers: each of the five graphs exported (dynamo, opset 18) from the tiny demo checkpoint
and run by ONNX Runtime against the eager wrapper at two shapes; greedy and beam decoding driven through ORT
sessions of gpt_prefill + gpt_decode give the eager codes; feed rules make valid inputs; the graphs keep
finite masks and TensorRT-parsable operators."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.demo import write_demo
from export.eager import EagerModels
from export.gpt_executor import EagerGptSteps, geometry_of
from export.onnx_export import export_onnx
from export.wrappers.gpt import WRAPPERS, GptLimits
from runtime.contracts import GraphContract, ModelDims, build_contracts
from runtime.gpt.generate import GenerationConfig, generate
from runtime.gpt.kv_cache import KVCache
from runtime.gpt.steps import Feed, GptGeometry

ort = pytest.importorskip("onnxruntime")

GRAPHS = ("speaker_conditioner", "emotion_conditioner", "gpt_prefill", "gpt_decode", "gpt_latent")
SHAPES = {   # the contract minimum and a typical / batched shape (tiny weights: kept short for CPU time)
    "speaker_conditioner": ({"batch": 1, "feat_len": 3}, {"batch": 3, "feat_len": 250}),
    "emotion_conditioner": ({"batch": 1, "feat_len": 3}, {"batch": 3, "feat_len": 250}),
    "gpt_prefill": ({"batch": 1, "text_len": 1}, {"batch": 3, "text_len": 40}),
    "gpt_decode": ({"batch": 1, "cache_len": 38}, {"batch": 3, "cache_len": 300}),
    "gpt_latent": ({"batch": 1, "text_len": 1, "code_len": 1}, {"batch": 2, "text_len": 40, "code_len": 120}),
}
#: Operators the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md) that these graphs may use.
TRT_OPS = {"Add", "Clip", "Concat", "Conv", "Div", "Erf", "Expand", "Gather", "Gemm", "LayerNormalization", "Less",
           "LessOrEqual", "MatMul", "Mul", "Not", "Pow", "Range", "ReduceL2", "ReduceSum", "Relu", "Reshape", "Shape",
           "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> EagerModels:
    return EagerModels.load(write_demo(tmp_path_factory.mktemp("gptwrap") / "ckpt", "tiny", seed=0))


@pytest.fixture(scope="module")
def dims(models: EagerModels) -> ModelDims:
    from export.dims import model_dims

    return model_dims(models.layout, models)


@pytest.fixture(scope="module")
def contracts(dims: ModelDims) -> dict[str, GraphContract]:
    return build_contracts(dims)


@pytest.fixture(scope="module")
def exported(models: EagerModels, dims: ModelDims, contracts: dict[str, GraphContract],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each graph exported once, from a sample at its export sizes."""
    out = tmp_path_factory.mktemp("gpt_onnx")
    paths = {}
    for name in GRAPHS:
        spec, contract = WRAPPERS[name], contracts[name]
        sample = spec.feed(contract, dims, spec.export_sizes, np.random.default_rng(0))
        paths[name] = export_onnx(spec.build(models), contract,
                                  [torch.from_numpy(sample[n]) for n in contract.input_names], out / f"{name}.onnx")
    return paths


def _session(path: Path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _eager(models: EagerModels, name: str, contract: GraphContract, feed: Feed) -> list[np.ndarray]:
    with torch.inference_mode():
        outs = WRAPPERS[name].build(models)(*[torch.from_numpy(feed[n]) for n in contract.input_names])
    return [o.numpy() for o in outs]


def test_registry_is_exactly_the_gpt_graphs() -> None:
    assert set(WRAPPERS) == set(GRAPHS)
    assert all(WRAPPERS[g].exporter == "dynamo" for g in GRAPHS)
    assert all(min(WRAPPERS[g].export_sizes.values()) >= 2 for g in GRAPHS)


@pytest.mark.parametrize("name", GRAPHS)
def test_feeds_match_the_contract(name: str, dims: ModelDims, contracts: dict[str, GraphContract]) -> None:
    contract = contracts[name]
    for sizes in SHAPES[name]:
        feed = WRAPPERS[name].feed(contract, dims, sizes, np.random.default_rng(1))
        assert list(feed) == list(contract.input_names)
        for spec in contract.inputs:
            assert feed[spec.name].shape == spec.concrete(dims, sizes), spec.name
            assert feed[spec.name].dtype == np.dtype(spec.dtype), spec.name


def test_feed_values_are_valid(dims: ModelDims, contracts: dict[str, GraphContract]) -> None:
    limits = GptLimits.from_dims(dims)
    rng = np.random.default_rng(2)
    prefill = WRAPPERS["gpt_prefill"].feed(contracts["gpt_prefill"], dims, {"batch": 2, "text_len": 50}, rng)
    assert prefill["text_ids"].min() >= 2 and prefill["text_ids"].max() < limits.text_vocab
    latent = WRAPPERS["gpt_latent"].feed(contracts["gpt_latent"], dims,
                                         {"batch": 2, "text_len": 9, "code_len": 30}, rng)
    assert latent["text_ids"].min() >= 0 and latent["text_ids"].max() < limits.text_vocab
    assert latent["codes"].min() >= 0 and latent["codes"].max() < limits.codebook
    dec = WRAPPERS["gpt_decode"].feed(contracts["gpt_decode"], dims, {"batch": 4, "cache_len": 120}, rng)
    filled = dec["kv_mask"].sum(1).astype(int)
    assert filled[0] == 120 and filled.min() >= 38
    for row, n in zip(dec["kv_mask"], filled):             # ones first, then zeros
        assert (row[:n] == 1).all() and (row[n:] == 0).all()
    assert (dec["mel_pos"][:, 0] >= 2).all() and (dec["mel_pos"][:, 0] <= filled - 36).all()
    assert dec["mel_ids"].max() < limits.codebook


def test_decode_signature_is_the_contract(models: EagerModels, contracts: dict[str, GraphContract]) -> None:
    module = WRAPPERS["gpt_decode"].build(models)
    names = [p.replace("kv_cache_", "kv_cache.") for p in inspect.signature(module.forward).parameters]
    assert tuple(names) == contracts["gpt_decode"].input_names


def test_limits_from_dims_are_the_checkpoint_config(models: EagerModels, dims: ModelDims) -> None:
    assert GptLimits.from_dims(dims) == GptLimits.of(models.gpt)


@pytest.mark.parametrize("name", GRAPHS)
def test_onnx_matches_eager(name: str, models: EagerModels, dims: ModelDims,
                            contracts: dict[str, GraphContract], exported: dict[str, Path]) -> None:
    contract, session = contracts[name], _session(exported[name])
    assert [i.name for i in session.get_inputs()] == list(contract.input_names)
    for k, sizes in enumerate(SHAPES[name]):
        feed = WRAPPERS[name].feed(contract, dims, sizes, np.random.default_rng(10 + k))
        got = session.run(list(contract.output_names), feed)
        want = _eager(models, name, contract, feed)
        for out, g, w in zip(contract.output_names, got, want):
            atol, rtol = contract.tolerance(out)
            assert g.shape == w.shape == contract.outputs[contract.output_names.index(out)].concrete(dims, sizes)
            np.testing.assert_allclose(g, w, atol=atol, rtol=rtol, err_msg=f"{name}.{out} at {sizes}")


def test_decode_ignores_padding_rows(dims: ModelDims, contracts: dict[str, GraphContract],
                                     exported: dict[str, Path]) -> None:
    """Cache rows under kv_mask 0 may hold anything: new random values there change nothing."""
    contract, session = contracts["gpt_decode"], _session(exported["gpt_decode"])
    rng = np.random.default_rng(3)
    feed = WRAPPERS["gpt_decode"].feed(contract, dims, {"batch": 3, "cache_len": 64}, rng)
    feed["kv_mask"][:, 50:] = 0.0
    before = session.run(None, feed)
    for spec in contract.inputs[2:-1]:
        feed[spec.name][:, :, :, 50:] = 100.0 * rng.standard_normal(feed[spec.name][:, :, :, 50:].shape)
    for b, a in zip(before, session.run(None, feed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_is_trt_friendly(name: str, exported: dict[str, Path]) -> None:
    """Opset 18, only TensorRT-parsable operators, every float constant finite (masks use -1e4, not -inf)."""
    model = onnx.load(str(exported[name]))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    ops = {n.op_type for n in model.graph.node}
    assert ops <= TRT_OPS, f"operators outside the TensorRT list: {sorted(ops - TRT_OPS)}"
    consts = [numpy_helper.to_array(t) for t in model.graph.initializer]
    consts += [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"]
    assert all(np.isfinite(c).all() for c in consts if c.dtype.kind == "f")


class OrtGptSteps:
    """runtime.gpt.steps.GptSteps over ONNX Runtime sessions of the two exported step graphs."""

    def __init__(self, prefill: Path, decode: Path, geometry: GptGeometry) -> None:
        self.geometry = geometry
        self._prefill, self._decode = _session(prefill), _session(decode)

    @staticmethod
    def _run(session: "ort.InferenceSession", feed: Feed) -> Feed:
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name: feed[i.name] for i in session.get_inputs()}
        return dict(zip(names, session.run(names, inputs)))

    def prefill(self, feed: Feed) -> Feed:
        return self._run(self._prefill, feed)

    def decode(self, feed: Feed) -> Feed:
        return self._run(self._decode, feed)

    def new_cache(self, kv, beams, max_rows, buckets):
        return KVCache.from_prefill(kv, beams, max_rows, buckets)

    def new_batch_cache(self, max_rows, buckets):
        return None

    def close(self) -> None:
        pass


@pytest.mark.parametrize("config", [GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0,
                                                     max_mel_tokens=40),
                                    GenerationConfig(do_sample=False, num_beams=3, max_mel_tokens=24)],
                         ids=["greedy", "beam3"])
def test_generation_through_ort_matches_eager(config: GenerationConfig, models: EagerModels,
                                              exported: dict[str, Path]) -> None:
    """runtime.gpt.generate.generate gives the same codes through ORT prefill + decode as through the eager model
    (the beam case feeds batch 3 and reorders the cache between steps)."""
    rng = np.random.default_rng(4)
    cfg = models.gpt.cfg
    spk = {"spk_latent": rng.standard_normal((1, 32, cfg.model_dim)).astype(np.float32)}
    emovec = rng.standard_normal((1, cfg.model_dim)).astype(np.float32)
    text = np.concatenate([[0, 1], rng.integers(2, 300, 20)]).astype(np.int64)   # 0 / 1 are dropped by generate
    eager = generate(EagerGptSteps(models.gpt), spk, emovec, text, config, cache_buckets=(64, 128))
    onnx_steps = OrtGptSteps(exported["gpt_prefill"], exported["gpt_decode"], geometry_of(models.gpt))
    got = generate(onnx_steps, spk, emovec, text, config, cache_buckets=(64, 128))
    assert len(eager.codes) > 10
    np.testing.assert_array_equal(got.codes, eager.codes)
    if config.num_beams > 1:
        np.testing.assert_allclose(got.score, eager.score, rtol=1e-4)
