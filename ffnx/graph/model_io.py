"""ONNX models of any size in and out of memory.

Protobuf cannot serialize a message over 2 GiB (`EncodeError`), yet a model whose weights pass
that (a 0.6 B-parameter LLM in fp32) lives in memory as a ModelProto without trouble. So every
step that serializes a model goes through here:

  save_model     writes `path` (atomically); past LIMIT bytes of tensor data, the data goes to
                 one `<name>.data` beside it (ONNX external data, each tensor 4 KiB-aligned),
                 else a stale `<name>.data` is removed
  session_path   a model over LIMIT saved to a temporary directory for ONNX Runtime
  infer_shapes   onnx shape inference, and `check`, the onnx checker: run on the model with its
                 large tensors detached (shapes and types need no values)
  digest         sha256 of the model's structure and every tensor's bytes

`detached(model)` is the one mechanism: inside it, each tensor of more than SMALL bytes held as
`raw_data` is marked as ONNX external data and its bytes are held aside; on exit they are put
back, so the model is unchanged.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from ffnx import artifact

LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB; room for the graph itself
SMALL = 1024  # tensors up to this stay inline (shape constants shape inference may read)
ALIGN = 4096  # offsets in the .data file (ONNX Runtime maps aligned external data)
_DETACHED = "ffnx-detached"  # the location a detached tensor names while in memory


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's values (dims x element size; external data included)."""
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and Constant values, subgraphs included."""

    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from walk(a.g)
                for g in a.graphs:
                    yield from walk(g)

    yield from walk(model.graph)


def data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor values the model holds in memory (external references not counted)."""
    return sum(tensor_bytes(t) for t in all_tensors(model) if not _external(t))


def is_big(model: onnx.ModelProto) -> bool:
    return data_bytes(model) > LIMIT


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


@contextmanager
def detached(model: onnx.ModelProto) -> Iterator[list[tuple[onnx.TensorProto, bytes]]]:
    """The model with its large raw tensors marked external and their bytes held aside (yields
    [(tensor, bytes)] in `all_tensors` order); restored on exit."""
    moved = []
    try:
        for t in all_tensors(model):
            if not _external(t) and t.HasField("raw_data") and tensor_bytes(t) > SMALL:
                moved.append((t, t.raw_data))
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                t.external_data.add(key="location", value=_DETACHED)
        yield moved
    finally:
        for t, data in moved:
            _restore(t, data)


def _reattach(model: onnx.ModelProto, moved: list[tuple[onnx.TensorProto, bytes]]) -> None:
    """Give a model derived from a detached one (same tensors, same order) its bytes back."""
    pending = iter(moved)
    for t in all_tensors(model):
        if _external(t) and any(e.value == _DETACHED for e in t.external_data):
            src, data = next(pending)
            assert src.name == t.name, (src.name, t.name)
            _restore(t, data)


def _restore(t: onnx.TensorProto, data: bytes) -> None:
    del t.external_data[:]
    t.ClearField("data_location")  # DEFAULT, as it was (only DEFAULT tensors are detached)
    t.raw_data = data


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """`onnx.shape_inference.infer_shapes` for a model of any size (a new model)."""
    if not is_big(model):
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    with detached(model) as moved:
        out = onnx.shape_inference.infer_shapes(model, **kwargs)
    _reattach(out, moved)
    return out


def check(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model` for a model of any size (a large model's big tensors are
    checked as one-element stand-ins: the checker without full_check reads no tensor shapes)."""
    if not is_big(model):
        onnx.checker.check_model(model)
        return
    with detached(model) as moved:
        light = onnx.ModelProto()
        light.CopyFrom(model)
    for t in all_tensors(light):  # a tensor's bytes are not the checker's business
        if _external(t) and any(e.value == _DETACHED for e in t.external_data):
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            del t.dims[:]  # one element in place of the values (the checker's own check
            t.dims.append(1)  # runs no shape inference)
            t.raw_data = b"\0" * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    del moved
    onnx.checker.check_model(light)


def digest(model: onnx.ModelProto) -> str:
    """sha256 of the model: its structure and the bytes of every tensor."""
    h = hashlib.sha256()
    with detached(model) as moved:
        h.update(model.SerializeToString())
        for _, data in moved:
            h.update(data)
    return h.hexdigest()


def data_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".data")


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path` atomically; over LIMIT its tensor data goes to `<name>.data`
    (written first, each under a temporary name until complete). Returns `path`."""
    path = Path(path)
    data = data_path(path)
    if not is_big(model):
        artifact.write_bytes_atomic(path, model.SerializeToString())
        data.unlink(missing_ok=True)  # a stale one from a larger model of the same name
        return path
    with detached(model) as moved, artifact.atomic_path(data) as tmp:
        offset = 0
        with open(tmp, "wb") as f:
            for t, blob in moved:
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(blob)
                del t.external_data[:]
                for key, value in (("location", data.name), ("offset", str(offset)),
                                   ("length", str(len(blob)))):  # fmt: skip
                    t.external_data.add(key=key, value=value)
                offset += len(blob)
        light = model.SerializeToString()  # references the final data name
    artifact.write_bytes_atomic(path, light)
    return path


@contextmanager
def session_path(model: onnx.ModelProto) -> Iterator[Path]:
    """The model saved (with external data) in a temporary directory, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="ffnx-model-") as d:
        yield save_model(model, Path(d) / "model.onnx")
