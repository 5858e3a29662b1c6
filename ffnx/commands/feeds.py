"""Sample inputs for commands: `--data FILE.npz` (the one reader, `read_data`) or random feeds
within an artifact's (or a bare graph's) declared inputs."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

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


def read_data(path: str | Path, names: list[str]) -> list[dict[str, np.ndarray]]:
    """The samples of a `--data` .npz: arrays named like the inputs (one sample), or name_0,
    name_1, ... (one sample per index, in order). Every command reads --data through this."""
    from ffnx.errors import InputError

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = dict(z)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read --data {path}: {e}") from e
    if all(n in arrays for n in names):
        return [{n: arrays[n] for n in names}]
    feeds: list[dict[str, np.ndarray]] = []
    while all(f"{n}_{len(feeds)}" in arrays for n in names):
        feeds.append({n: arrays[f"{n}_{len(feeds)}"] for n in names})
    if not feeds:
        raise InputError(
            f"--data {path} has arrays {sorted(arrays)}; expected {names} (one sample) or "
            f"{[n + '_0' for n in names]}, ... (several)"
        )
    return feeds


def sample_feeds(
    data: str | None, model, manifest: dict, dims: dict, samples: int
) -> tuple[list[dict[str, np.ndarray]], str]:
    """(feeds, where they came from): --data, else `samples` random inputs within the declared
    dims (said on stderr)."""
    if data:
        return read_data(data, [i.name for i in model.graph.input]), f"data:{Path(data).name}"
    from ffnx.commands import ui

    ui.err.print("[yellow]no --data given: using random inputs within the declared dims[/]")
    return random_feeds(model, manifest, dims, samples), "random"


@contextmanager
def explained_random_inputs(command: str, random: bool, data_option: bool = True):
    """Random inputs that a graph cannot run on (inputs whose sizes depend on each other, such
    as a KV-cache decoder's mask and past) get the fix appended to the error."""
    from ffnx.errors import InputError

    try:
        yield
    except InputError as e:
        if not random:
            raise
        fix = "give --data FILE.npz with inputs it runs on, or " if data_option else ""
        raise InputError(
            f"{e} (random inputs within the declared dims; {fix}{command} the artifact "
            "directory, whose manifest relates the dims)"
        ) from e
