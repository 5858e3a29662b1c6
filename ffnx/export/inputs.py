"""Example inputs at other shapes: the second verification shape and benchmark shapes."""

from __future__ import annotations

import numpy as np
import torch

from ffnx.models.spec import ModelSpec


def example_dims(spec: ModelSpec) -> dict[str, int]:
    dims: dict[str, int] = {}
    for name, axes in spec.dynamic.items():
        for axis, label in axes.items():
            dims.setdefault(label, int(spec.inputs[name].shape[int(axis)]))
    return dims


def other_dims(spec: ModelSpec) -> dict[str, int]:
    """A second size per dynamic label, inside its range and different from the example.

    Sizes 0/1 are avoided only when the example itself is larger (torch.export specialises them).
    """
    out = {}
    for label, n in example_dims(spec).items():
        m = n // 2 + 1 if n > 2 else n + 1
        hi = spec.max_dims.get(label)
        if hi is not None and m > hi:
            m = max(1, n - 1)
        out[label] = m
    return out


def inputs_for(spec: ModelSpec, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs with dynamic axes resized to `dims` (spec.make_inputs when the spec has one)."""
    if spec.make_inputs is not None:
        return spec.make_inputs(dims)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, ex in spec.inputs.items():
        shape = list(ex.shape)
        for axis, label in spec.dynamic.get(name, {}).items():
            shape[int(axis)] = dims.get(label, shape[int(axis)])
        if ex.dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float32).to(ex.dtype)
        elif ex.dtype == torch.bool:
            out[name] = torch.randint(0, 2, shape, generator=g).bool()
        else:
            lo, hi = int_range(ex)
            out[name] = torch.randint(lo, hi, shape, generator=g, dtype=ex.dtype)
    return out


def int_range(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) of an integer example input (token ids: the vocabulary seen in the example)."""
    if t.numel() == 0:
        return 0, 1
    return int(t.min()), int(t.max()) + 1


def to_numpy(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in inputs.items()}


def _flat_outputs(out) -> list[tuple[str | None, torch.Tensor]]:
    """(key or None, tensor) per tensor output, in the order torch.onnx flattens them."""
    if isinstance(out, torch.Tensor):
        return [(None, out)]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):  # dict, transformers ModelOutput
        items = out.items()
        return [(str(k), v) for k, v in items if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(None, o) for o in out if isinstance(o, torch.Tensor)]
    return []


def output_names(spec: ModelSpec) -> list[str]:
    """Graph output names: the spec's declared names, else the forward's dict keys /
    ModelOutput fields, else "output" (one output) or "output_<i>"."""
    declared = getattr(spec, "output_names", None)
    if declared:
        return list(declared)
    with torch.no_grad():
        flat = _flat_outputs(spec.module(*spec.inputs.values()))
    if len(flat) == 1 and flat[0][0] is None:
        return ["output"]
    return [k if k is not None else f"output_{i}" for i, (k, _) in enumerate(flat)]


def torch_outputs(module: torch.nn.Module, inputs: dict[str, torch.Tensor], names: list[str]):
    with torch.no_grad():
        out = module(*inputs.values())
    if isinstance(out, torch.Tensor):
        out = (out,)
    elif isinstance(out, dict):
        out = tuple(out.values())
    elif hasattr(out, "to_tuple"):
        out = out.to_tuple()
    flat = [o for o in out if isinstance(o, torch.Tensor)]
    return {n: o.detach().cpu().numpy() for n, o in zip(names, flat)}
