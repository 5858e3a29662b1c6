"""Random feeds within an artifact's (or a bare graph's) declared inputs, for commands that
need sample inputs and were given none."""

from __future__ import annotations

import numpy as np


def input_infos(model, manifest: dict) -> list:
    """The manifest's inputs (with dim labels), else the graph's."""
    import onnx

    from ffnx.runtime.backends.base import TensorInfo

    if manifest.get("inputs"):
        return [TensorInfo.from_json(i) for i in manifest["inputs"]]
    out = []
    for v in model.graph.input:
        tt = v.type.tensor_type
        out.append(
            TensorInfo(
                v.name,
                onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                tuple(d.dim_param or d.dim_value for d in tt.shape.dim),
            )
        )
    return out


def random_feeds(model, manifest: dict, dims: dict, samples: int) -> list[dict[str, np.ndarray]]:
    from ffnx.runtime.engine import random_inputs

    infos = input_infos(model, manifest)
    return [random_inputs(infos, manifest, dims, seed=s) for s in range(samples)]


def npz_feeds(path: str, names: list[str], option: str) -> list[dict[str, np.ndarray]]:
    """Samples from an .npz: arrays named like the inputs (one sample) or name_0, name_1, …"""
    from ffnx.errors import InputError

    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {option} {path}: {e}") from e
    if all(n in arrays for n in names):
        return [{n: arrays[n] for n in names}]
    feeds: list[dict[str, np.ndarray]] = []
    while all(f"{n}_{len(feeds)}" in arrays for n in names):
        feeds.append({n: arrays[f"{n}_{len(feeds)}"] for n in names})
    if not feeds:
        raise InputError(f"{option} {path} has arrays {sorted(arrays)}; expected {names}")
    return feeds
