"""The one interface every runtime backend implements (ORT, TensorRT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output. `shape` holds ints for fixed dims and labels for dynamic ones."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> TensorInfo:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@runtime_checkable
class Backend(Protocol):
    """`load` a model file, then `run` validated feeds. `run` must be safe to call from threads."""

    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    @classmethod
    def load(cls, path: str, **options) -> Backend: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
