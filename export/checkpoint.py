"""Reading original checkpoint files and loading them strictly into the eager modules.

Every loader in `export/` goes through these few functions, so that the rules are the same for every
file: `.pt/.pth/.bin` are read with `weights_only=True`; a missing or truncated file is a
`CheckpointError` naming it; legacy weight norm (`X.weight_g`, `X.weight_v`) is folded to `X.weight`
at load (`W = g * v / ||v||`, norm over every dim but 0, no epsilon: what `remove_weight_norm` does);
and a state dict that does not fit the module (missing keys, unexpected keys, shape mismatches) is an
error listing all of them, minus the keys the original code is documented to ignore.
"""

from __future__ import annotations

import fnmatch
import logging
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from runtime.errors import CheckpointError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def read_torch_file(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, with file problems reported as CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): {err}") from err
    except Exception as err:  # pickle.UnpicklingError and friends for non-weights content
        raise CheckpointError(f"{path}: cannot be read with weights_only=True: {err}") from err


def read_torch_keys(path: str | Path) -> list[str]:
    """The state dict keys of a `.pt/.pth` file (or of its `['model']` entry) without reading the tensors: the
    file is memory-mapped (PyTorch's zip format), so a 1.8 GB gpt.pth costs a fraction of a second."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError):           # the legacy (non-zip) format cannot be mapped: read it
        obj = read_torch_file(path)
    except (EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): {err}") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return [str(k) for k in obj]


def read_safetensors(path: str | Path) -> StateDict:
    """Read a `.safetensors` file into a CPU state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as safetensors (truncated or corrupt?): {err}") from err


def as_state_dict(obj: Any, path: str | Path, where: str = "") -> StateDict:
    """Check that `obj` is a flat mapping of names to tensors."""
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor){' at ' + where if where else ''}, "
                              f"got {type(obj).__name__}")
    return dict(obj)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Remove `prefix` from every key that has it (upstream strips an optional `module.`)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Replace every `X.weight_g` / `X.weight_v` pair by `X.weight = g * v / ||v||`.

    The norm is taken over all dims but 0 (the dim `weight_norm(dim=0)` keeps; for ConvTranspose1d
    that is the input-channel axis, which is how its weights are stored), with no epsilon.
    """
    out: StateDict = {}
    for key, value in state.items():
        base, _, leaf = key.rpartition(".")
        prefix = base + "." if base else ""
        if leaf == "weight_g":
            v = state.get(prefix + "weight_v")
            if v is None:
                raise CheckpointError(f"weight norm: {key} has no matching {prefix}weight_v")
            dims = tuple(range(1, v.dim()))
            norm = v.double().pow(2).sum(dim=dims, keepdim=True).sqrt()
            out[prefix + "weight"] = (value.double() * v.double() / norm).to(v.dtype)
        elif leaf == "weight_v":
            if prefix + "weight_g" not in state:
                raise CheckpointError(f"weight norm: {key} has no matching {prefix}weight_g")
        else:
            out[key] = value
    return out


def unfold_weight_norm(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> StateDict:
    """Inverse of `fold_weight_norm` for the given weight names: `X.weight` → `X.weight_g`, `X.weight_v`.

    Used by the demo-checkpoint generator to write the original (weight-norm) layout. `v = W` and
    `g = ||W||` reproduce W exactly when folded.
    """
    out = dict(state)
    for name in names:
        w = out.pop(name)
        prefix = name[: -len("weight")]
        dims = tuple(range(1, w.dim()))
        out[prefix + "weight_g"] = w.pow(2).sum(dim=dims, keepdim=True).sqrt()
        out[prefix + "weight_v"] = w.clone()
    return out


def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    ignore: Iterable[str] = (),
) -> None:
    """Load `state` into `module`, strictly.

    `ignore` lists fnmatch patterns of checkpoint keys the original code ignores (training-only parts,
    old buffers); they are dropped with a debug log. Anything else that does not match the module's
    parameters and buffers exactly (name and shape) raises one CheckpointError listing every problem.
    """
    ignore = tuple(ignore)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected, mismatched = [], []
    for key, value in state.items():
        if key not in expected:
            if not any(fnmatch.fnmatchcase(key, pat) for pat in ignore):
                unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}")
    if missing or unexpected or mismatched:
        lines = [f"{source}: state dict does not match the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = items[:20]
                more = f" ... (+{len(items) - 20} more)" if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)
        lines.append("  (is this file from another model or model size, or is config.yaml for another checkpoint?)")
        raise CheckpointError("\n".join(lines))
    filtered = {k: v for k, v in state.items() if k in expected}
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(filtered[key].to(target.dtype))
    log.debug("%s: loaded %d tensors", source, len(filtered))
