"""Check feeds against an engine's declared inputs; every message lists what was expected."""

from __future__ import annotations

import numpy as np

from ffnx.errors import InputError
from ffnx.runtime.backends.base import TensorInfo


def _expected(inputs: list[TensorInfo]) -> str:
    return "; ".join(i.describe() for i in inputs)


def validate_feeds(
    feeds: dict[str, object],
    inputs: list[TensorInfo],
    dim_bounds: dict[str, tuple[int, int]] = None,
) -> dict[str, np.ndarray]:
    """Return feeds as contiguous numpy arrays, or raise InputError.

    Checks names (missing and unknown), rank, fixed dims, dtype, consistency of dims sharing a
    dynamic label, and `dim_bounds` {label: (min, max)} when given.
    """
    if not isinstance(feeds, dict):
        raise InputError(f"inputs must be a dict name -> array; expected {_expected(inputs)}")
    names = {i.name for i in inputs}
    unknown = sorted(set(feeds) - names)
    missing = [i.name for i in inputs if i.name not in feeds]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {', '.join(unknown)}")
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        raise InputError(f"{'; '.join(parts)}; expected {_expected(inputs)}")
    out, seen = {}, {}
    for info in inputs:
        arr = feeds[info.name]
        if not isinstance(arr, np.ndarray):
            try:
                arr = np.asarray(arr)
            except Exception as e:
                raise InputError(
                    f"input {info.name!r} is not array-like ({type(arr).__name__})"
                ) from e
        if arr.dtype.name != info.dtype:
            raise InputError(
                f"input {info.name!r} has dtype {arr.dtype.name}, expected {info.describe()}"
            )
        if arr.ndim != len(info.shape):
            raise InputError(
                f"input {info.name!r} has rank {arr.ndim} (shape {list(arr.shape)}), "
                f"expected {info.describe()}"
            )
        for axis, (got, want) in enumerate(zip(arr.shape, info.shape)):
            if isinstance(want, int):
                if got != want:
                    raise InputError(
                        f"input {info.name!r} has shape {list(arr.shape)}: axis {axis} must be "
                        f"{want}; expected {info.describe()}"
                    )
                continue
            if want in seen and seen[want][0] != got:
                raise InputError(
                    f"dim {want!r} is {seen[want][0]} in {seen[want][1]!r} but {got} in "
                    f"{info.name!r}; dims sharing a label must agree"
                )
            seen.setdefault(want, (got, info.name))
            lo, hi = (dim_bounds or {}).get(want, (0, None))
            if got < lo or (hi is not None and got > hi):
                raise InputError(
                    f"input {info.name!r} axis {axis} ({want}) is {got}, outside [{lo}, {hi}]"
                )
        out[info.name] = np.ascontiguousarray(arr)
    return out
