"""`OrtBackend`: ONNX Runtime (CPU EP; CUDA EP when onnxruntime-gpu and a GPU are present)."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np

from ffnx.errors import ArtifactError, BackendError, InputError, first_line
from ffnx.runtime.backends.base import TensorInfo

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(bfloat16)": "bfloat16",
}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime") from e
    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
            installed.add(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        raise BackendError(
            "both onnxruntime and onnxruntime-gpu are installed and overwrite each other; "
            "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    return ort


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in (arg.shape or ()))
    return TensorInfo(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


def default_providers(device: str = "auto") -> list[str]:
    ort = _import_ort()
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise BackendError(
            "CUDA execution provider unavailable: install onnxruntime-gpu (only it) on a GPU host"
        )
    return ["CPUExecutionProvider"]


class OrtBackend:
    """One InferenceSession; `InferenceSession.run` is thread-safe, so `run` needs no lock."""

    name = "ort"

    def __init__(self, session, path: str):
        self.session = session
        self.path = path
        self.inputs = [_info(a) for a in session.get_inputs()]
        self.outputs = [_info(a) for a in session.get_outputs()]
        self.providers = session.get_providers()

    @classmethod
    def load(
        cls,
        path: str,
        threads: int | None = None,
        device: str = "auto",
        providers: list[str] | None = None,
    ) -> OrtBackend:
        ort = _import_ort()
        if not os.path.exists(path):
            raise ArtifactError(f"{path} does not exist")
        so = ort.SessionOptions()
        so.log_severity_level = 4  # failures come back as exceptions, worded as one line here
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        try:
            sess = ort.InferenceSession(
                str(path), sess_options=so, providers=providers or default_providers(device)
            )
        except Exception as e:  # ORT raises its own exception types; report them as one line
            first = first_line(e)
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {first}") from e
        return cls(sess, str(path))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        try:
            return dict(zip(names, self.session.run(names, feeds)))
        except Exception as e:  # ORT's own exception types: one line naming the file
            raise InputError(f"ONNX Runtime cannot run {self.path} on these inputs: "
                             f"{first_line(e)}") from e  # fmt: skip
