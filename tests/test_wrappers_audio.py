"""Export wrappers of the audio-side graphs: each graph exported with its wrapper (dynamo, opset 18) from a
tiny demo checkpoint, then ONNX Runtime vs the eager wrapper on valid inputs at two shapes, plus the
graph-level checks TensorRT needs (operator set, no infinite constants) and the length regulator's
data-dependent output length and float32 nearest-index rule.

Exports cost ~85 s in all on 2 shared cores; each graph is exported once per module (cached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from export.eager import EagerModels
from export.onnx_export import export_onnx, run_onnx
from export.wrappers.audio import WRAPPERS
from runtime.contracts import ModelDims, build_contracts

GRAPHS = ("semantic_encoder", "semantic_codec", "campplus", "length_regulator", "dit_step", "bigvgan")

# Two shapes per graph: the contract minimum at batch 1, a typical length at batch 2.
SHAPES: dict[str, tuple[dict[str, int], ...]] = {
    "semantic_encoder": ({"batch": 1, "feat_len": 3}, {"batch": 2, "feat_len": 250}),
    "semantic_codec": ({"batch": 1, "feat_len": 1}, {"batch": 2, "feat_len": 250}),
    "campplus": ({"batch": 1, "fbank_len": 3}, {"batch": 2, "fbank_len": 500}),
    "length_regulator": ({"batch": 1, "seq_len": 1, "mel_len": 1}, {"batch": 2, "seq_len": 300, "mel_len": 516}),
    "dit_step": ({"batch": 1, "mel_len": 3}, {"batch": 2, "mel_len": 800}),
    "bigvgan": ({"batch": 1, "mel_len": 1}, {"batch": 2, "mel_len": 200}),
}
# Long shapes (contract maxima where affordable on CPU): run with -m slow.
LONG_SHAPES: dict[str, dict[str, int]] = {
    "semantic_encoder": {"batch": 4, "feat_len": 1024},
    "semantic_codec": {"batch": 4, "feat_len": 1024},
    "campplus": {"batch": 4, "fbank_len": 1500},
    "length_regulator": {"batch": 4, "seq_len": 1815, "mel_len": 3200},
    "dit_step": {"batch": 1, "mel_len": 4500},
    "bigvgan": {"batch": 2, "mel_len": 3200},
}

# Operators of these graphs, each checked against ONNX-TensorRT's operator support list (TensorRT 10):
# a new operator type in an export must be checked there and added here deliberately.
TRT10_CHECKED_OPS = frozenset({
    # Abs, Greater, GatherElements (FP32/FP16/INT32/INT64; indices >= 0, as the clamp makes them): dit_step's
    # per-row reflection (export/models/wavenet.py:reflect_pad_rows)
    "Abs", "GatherElements", "Greater",
    "Add", "ArgMax", "BatchNormalization", "Cast", "Clip", "Concat", "Conv", "ConvTranspose", "Cos", "Div",
    "Equal", "Erf", "Expand", "Floor", "Gather", "Gemm", "GreaterOrEqual", "InstanceNormalization",
    "LayerNormalization", "Less", "MatMul", "Mish", "Mul", "Neg", "Not", "Pad", "Pow", "Range", "Reciprocal",
    "ReduceL2", "ReduceMax", "ReduceMean", "ReduceProd", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid",
    "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> EagerModels:
    from export.demo import write_demo

    root = write_demo(tmp_path_factory.mktemp("audio_wrappers") / "ckpt", size="tiny", seed=0)
    return EagerModels.load(root, with_gpt=False)


@pytest.fixture(scope="module")
def dims(models: EagerModels) -> ModelDims:
    from export.dims import model_dims

    return model_dims(models.layout, models)


@pytest.fixture(scope="module")
def exported(models: EagerModels, dims: ModelDims,
             tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[torch.nn.Module, Path]]:
    """graph name -> (eager wrapper, ONNX file), exported on first use."""
    out = tmp_path_factory.mktemp("onnx")
    cache: dict[str, tuple[torch.nn.Module, Path]] = {}

    def get(name: str) -> tuple[torch.nn.Module, Path]:
        if name not in cache:
            spec, contract = WRAPPERS[name], build_contracts(dims)[name]
            module = spec.build(models).eval()                 # the eager reference
            feed = spec.feed(contract, dims, spec.export_sizes, np.random.default_rng(0))
            sample = tuple(torch.from_numpy(feed[n]) for n in contract.input_names)
            cache[name] = (module, export_onnx(spec.build_for_export(models).eval(), contract, sample,
                                               out / f"{name}.onnx"))
        return cache[name]

    return get


def _compare(name: str, module: torch.nn.Module, path: Path, dims: ModelDims, sizes: dict[str, int],
             seed: int = 1) -> dict[str, float]:
    """ORT vs eager on one valid feed; asserts the contract tolerances, returns max abs error per output."""
    contract = build_contracts(dims)[name]
    feed = WRAPPERS[name].feed(contract, dims, sizes, np.random.default_rng(seed))
    with torch.no_grad():
        want = module(*(torch.from_numpy(feed[n]) for n in contract.input_names))
    got = run_onnx(path, feed)
    errors = {}
    for spec, w in zip(contract.outputs, want):
        w, g = w.numpy(), got[spec.name]
        assert g.shape == w.shape == spec.concrete(dims, sizes), (spec.name, g.shape, w.shape)
        assert g.dtype == np.dtype(spec.dtype), (spec.name, g.dtype)
        if g.dtype.kind == "i":
            assert np.array_equal(g, w), f"{name}.{spec.name}: integer output differs at {sizes}"
            errors[spec.name] = 0.0
            continue
        atol, rtol = contract.tolerance(spec.name)
        err = np.abs(g.astype(np.float64) - w)
        assert np.all(err <= atol + rtol * np.abs(w)), f"{name}.{spec.name} at {sizes}: max abs {err.max():.3g}"
        errors[spec.name] = float(err.max())
    return errors


def test_registry_is_the_six_audio_graphs() -> None:
    contracts = build_contracts()
    assert set(WRAPPERS) == set(GRAPHS)
    for name, spec in WRAPPERS.items():
        axes = contracts[name].axes()
        assert set(spec.export_sizes) == set(axes), name
        assert all(spec.export_sizes[a] >= 2 for a in axes), name
        assert spec.exporter == "dynamo", name


@pytest.mark.parametrize("name", GRAPHS)
def test_feeds_are_valid_at_the_contract_extremes(name: str) -> None:
    """Exact shapes and dtypes at min / opt / max of every axis (real model sizes), plus the value rules."""
    dims = ModelDims()
    contract = build_contracts(dims)[name]
    for pick in ("min", "opt", "max"):
        sizes = {a: getattr(contract.ranges[a], pick) for a in contract.axes()}
        feed = WRAPPERS[name].feed(contract, dims, sizes, np.random.default_rng(3))
        assert list(feed) == list(contract.input_names)
        for spec in contract.inputs:
            assert feed[spec.name].shape == spec.concrete(dims, sizes), (name, spec.name, pick)
            assert feed[spec.name].dtype == np.dtype(spec.dtype), (name, spec.name)
        _check_values(name, feed, sizes)


def _check_values(name: str, feed: dict[str, np.ndarray], sizes: dict[str, int]) -> None:
    if name == "semantic_encoder":
        mask = feed["attention_mask"]
        assert mask[0].all() and set(np.unique(mask)) <= {0, 1}
        assert np.all(np.diff(mask, axis=1) <= 0) and np.all(mask.sum(1) >= min(3, sizes["feat_len"]))
    elif name == "length_regulator":
        assert feed["ylens"].max() == sizes["mel_len"] and feed["ylens"].min() >= 1
    elif name == "dit_step":
        t_len, x_lens, p_lens = sizes["mel_len"], feed["x_lens"], feed["prompt_lens"]
        assert x_lens.max() == t_len and np.all(x_lens >= 1) and np.all((0 <= p_lens) & (p_lens < x_lens))
        assert np.all((0 <= feed["t"]) & (feed["t"] < 1)) and np.all((0 < feed["dt"]) & (feed["dt"] <= 0.1))
        assert feed["cfg_rate"].tolist() == [pytest.approx(0.7)]
        after_prompt = np.arange(t_len)[None, :] >= p_lens[:, None]
        assert np.all(feed["prompt_x"] * after_prompt[:, None, :] == 0)
        assert np.all(feed["x"] * ~after_prompt[:, None, :] == 0)


@pytest.mark.parametrize("name", GRAPHS)
def test_onnx_matches_eager(name: str, exported, dims: ModelDims) -> None:
    module, path = exported(name)
    for sizes in SHAPES[name]:
        _compare(name, module, path, dims, sizes)


@pytest.mark.slow
@pytest.mark.parametrize("name", GRAPHS)
def test_onnx_matches_eager_long(name: str, exported, dims: ModelDims) -> None:
    module, path = exported(name)
    _compare(name, module, path, dims, LONG_SHAPES[name])


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_is_tensorrt_friendly(name: str, exported) -> None:
    """Opset 18, only operators checked against TensorRT 10's list, no inf/NaN constants, and no float
    constant beyond the FP16 range (an FP16 engine would turn it into inf)."""
    import onnx
    from onnx import numpy_helper

    _, path = exported(name)
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}.get("", 0) >= 18
    ops = {n.op_type for n in model.graph.node}
    assert ops <= TRT10_CHECKED_OPS, f"{name}: unchecked operators {sorted(ops - TRT10_CHECKED_OPS)}"
    constants = [numpy_helper.to_array(t) for t in model.graph.initializer]
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                constants.append(numpy_helper.to_array(attr.t))
            elif attr.type == onnx.AttributeProto.FLOAT:
                constants.append(np.array([attr.f], dtype=np.float32))
    for value in constants:
        if value.dtype.kind == "f" and value.size:
            assert np.isfinite(value).all(), f"{name}: non-finite constant"
            assert np.abs(value).max() <= 65504, f"{name}: constant beyond the FP16 range"


def _exact_floor_index(t_in: int, t_out: torch.Tensor) -> torch.Tensor:
    """floor(dst * T_in / T_out) in exact integer arithmetic (NOT what PyTorch's nearest computes)."""
    return torch.div(torch.arange(t_out) * t_in, t_out, rounding_mode="floor")


def test_length_regulator_output_length_is_data(exported, dims: ModelDims) -> None:
    """One export serves every max(ylens): the output axis is symbolic and follows ylens; the float32
    nearest rule (26 -> 44 frames reads source 12 at frame 22, exact integer floor would read 13)
    survives export."""
    import onnx

    from export.models import length_regulator as lr

    module, path = exported("length_regulator")
    out_dim = onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim[1]
    assert out_dim.dim_param and not out_dim.dim_value
    sizes = {"batch": 1, "seq_len": 26, "mel_len": 44}
    _compare("length_regulator", module, path, dims, sizes)
    assert lr.nearest_source_index(26, torch.tensor(44))[22] == 12

    contract = build_contracts(dims)["length_regulator"]
    feed = WRAPPERS["length_regulator"].feed(contract, dims, sizes, np.random.default_rng(1))
    got = run_onnx(path, feed)["cond"]
    original = lr.nearest_source_index
    try:
        lr.nearest_source_index = _exact_floor_index
        with torch.no_grad():
            other = module(*(torch.from_numpy(feed[n]) for n in contract.input_names))[0].numpy()
    finally:
        lr.nearest_source_index = original
    assert np.abs(got - other).max() > 1e-2, "the check cannot tell the float32 rule from exact floor"
