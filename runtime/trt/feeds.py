"""Pure shape and feed rules of the TensorRT executor (tested on the CPU): which optimization profile
admits a feed, which outputs have data-dependent shapes, buffer sizes at a profile's maximum, and the
checks of feeds / output targets that may be device arrays (runtime.trt.cuda.DeviceArray).

Device arrays are bound to TensorRT by address, and TensorRT requires every device address to be 256-byte
aligned (NvInferRuntime.h, setTensorAddress: "The pointer must have at least 256-byte alignment"); a
misaligned view is refused here, naming the tensor, instead of as a bare False from set_tensor_address.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.contracts import DERIVED_AXES
from runtime.errors import ContractError
from runtime.executors.base import (
    check_feed,
    check_outputs,
    check_tensor_shape,
    output_shapes,
)
from runtime.manifest import GraphEntry, TensorSignature
from runtime.trt.cuda import DeviceArray
from runtime.trt.engine_plan import Profile
from runtime.trt.output_allocator import ALIGNMENT


def select_profile(graph: str, profiles: Sequence[Profile], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose ranges admit `shapes`, else ContractError naming, per profile,
    the first input out of its range."""
    for index, profile in enumerate(profiles):
        if profile.admits(shapes):
            return index
    reasons = []
    for profile in profiles:
        for ip in profile.inputs:
            s = tuple(shapes.get(ip.name, ()))
            if len(s) != len(ip.min) or any(not lo <= v <= hi for v, lo, hi in zip(s, ip.min, ip.max)):
                reasons.append(f"profile {profile.label}: input '{ip.name}' shape {s} is outside "
                               f"min {ip.min} .. max {ip.max}")
                break
    raise ContractError(f"graph '{graph}': no optimization profile of the TensorRT engine admits this feed ("
                        + "; ".join(reasons) + "); pass a smaller input, or widen the manifest's ranges and "
                        "rebuild the engines")


def carried_axes(entry: GraphEntry) -> set[str]:
    """Dynamic axes some input carries (an output axis outside this set depends on the data)."""
    axes: set[str] = set()
    for spec in entry.inputs:
        for d in spec.shape:
            if isinstance(d, str):
                axes.add(DERIVED_AXES[d][0] if d in DERIVED_AXES else d)
    return axes


def data_dependent_outputs(entry: GraphEntry) -> tuple[str, ...]:
    """Outputs whose shape the inputs' shapes do not determine (e.g. length_regulator's cond)."""
    carried = carried_axes(entry)
    out = []
    for spec in entry.outputs:
        free = [DERIVED_AXES[d][0] if d in DERIVED_AXES else d for d in spec.shape if isinstance(d, str)]
        if any(a not in carried for a in free):
            out.append(spec.name)
    return tuple(out)


def profile_sizes(entry: GraphEntry, profile: Profile) -> dict[str, int]:
    """Every axis size at the profile's maximum shapes; axes no input carries take their range maximum."""
    sizes = {axis: r.max for axis, r in entry.ranges.items()}
    maxima = {ip.name: ip.max for ip in profile.inputs}
    for spec in entry.inputs:
        for d, v in zip(spec.shape, maxima.get(spec.name, ())):
            if isinstance(d, str) and d not in DERIVED_AXES:
                sizes[d] = int(v)
    return sizes


def tensor_nbytes(spec: TensorSignature, sizes: Mapping[str, int]) -> int:
    return math.prod(spec.concrete(sizes)) * np.dtype(spec.dtype).itemsize


def profile_max_bytes(entry: GraphEntry, profile: Profile) -> dict[str, int]:
    """Bytes of every I/O tensor at the profile's maximum (the size of its buffers)."""
    sizes = profile_sizes(entry, profile)
    return {spec.name: tensor_nbytes(spec, sizes) for spec in (*entry.inputs, *entry.outputs)}


def check_mixed_feed(entry: GraphEntry, feed: Mapping[str, Any]) -> dict[str, int]:
    """check_feed for host arrays, the same rules for DeviceArrays (dtype, rank, static sizes, one size per
    dynamic axis) -> the dynamic axis sizes."""
    host = [name for name, value in feed.items() if not isinstance(value, DeviceArray)]
    sizes = check_feed(entry, feed, names=host)
    for spec in entry.inputs:
        value = feed[spec.name]
        if isinstance(value, DeviceArray):
            check_tensor_shape(f"graph '{entry.name}' input '{spec.name}'", spec, value.dtype, value.shape, sizes)
            check_alignment(entry.name, f"input '{spec.name}'", value)
    return sizes


def check_targets(entry: GraphEntry, outputs: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
    """Output targets: host arrays as check_outputs; DeviceArrays of exactly the shape and dtype written."""
    host = {n: v for n, v in outputs.items() if isinstance(v, np.ndarray)}
    odd = [n for n, v in outputs.items() if not isinstance(v, (np.ndarray, DeviceArray))]
    if odd:
        raise ContractError(f"graph '{entry.name}': output target(s) {odd} must be numpy arrays or DeviceArrays")
    check_outputs(entry, host, sizes)
    want = output_shapes(entry, sizes)
    dtypes = {t.name: np.dtype(t.dtype) for t in entry.outputs}
    for name, target in outputs.items():
        if not isinstance(target, DeviceArray):
            continue
        if name not in want:
            raise ContractError(f"graph '{entry.name}': no output named '{name}' (it has {list(want)})")
        if want[name] is None:
            raise ContractError(f"graph '{entry.name}': output '{name}' has a data-dependent shape; "
                                "it cannot be written into a preallocated device array")
        if target.shape != want[name] or target.dtype != dtypes[name]:
            raise ContractError(f"graph '{entry.name}': device output '{name}' is {target.dtype}{target.shape}, "
                                f"the graph writes {dtypes[name]}{want[name]}")
        check_alignment(entry.name, f"output '{name}'", target)


def check_alignment(graph: str, what: str, value: DeviceArray) -> None:
    """TensorRT takes only 256-byte aligned device addresses."""
    if value.ptr % ALIGNMENT:
        raise ContractError(f"graph '{graph}': device {what} at address {value.ptr:#x} is not {ALIGNMENT}-byte "
                            f"aligned (offset {value.ptr % ALIGNMENT}); TensorRT requires aligned tensor addresses: "
                            "pass a view that starts at a multiple of 256 bytes of its allocation")
