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
  is_big         past LIMIT: measured choices (the speed guard, the attention form), which
                 would hold the model in memory several times over, are not taken
  digest         sha256 of the model's structure and every tensor's bytes

`detached(model, file)` is the one mechanism: inside it, each tensor of more than SMALL bytes
held as `raw_data` has its bytes in `file` and is marked as ONNX external data there; on exit each
reads its bytes back, so the model is unchanged. The bytes move one tensor at a time, so a large
model costs no second copy of its weights in memory (`save_model` writes the `.data` file that
way directly).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

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
def detached(model: onnx.ModelProto, data: Path, location: str = "") -> Iterator[Path]:
    """The model with the bytes of its large raw tensors moved to the file `data` (each
    ALIGN-aligned) and those tensors marked as external data there (`location`: the name they
    record; default the file's own); each reads its bytes back on exit. One tensor at a time,
    so no second copy of the weights is held in memory."""
    location = location or data.name
    moved = []
    try:
        with open(data, "wb") as f:
            for t in all_tensors(model):
                if _external(t) or not t.HasField("raw_data") or tensor_bytes(t) <= SMALL:
                    continue
                f.write(b"\0" * (-f.tell() % ALIGN))
                offset, blob = f.tell(), t.raw_data
                f.write(blob)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", str(offset)),
                                   ("length", str(len(blob)))):  # fmt: skip
                    t.external_data.add(key=key, value=value)
                moved.append(t)
                del blob
        yield data
    finally:
        _reattach(moved, data, location)


def _reattach(tensors, data: Path, location: str) -> None:
    """Read the bytes of `tensors` (external data in `data` under `location`) back in."""
    with open(data, "rb") as f:
        for t in tensors:
            ext = {e.key: e.value for e in t.external_data}
            if ext.get("location") != location:
                continue
            f.seek(int(ext["offset"]))
            blob = f.read(int(ext["length"]))
            del t.external_data[:]
            t.ClearField("data_location")  # DEFAULT, as it was (only DEFAULT tensors move)
            t.raw_data = blob


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """`onnx.shape_inference.infer_shapes` for a model of any size. A model past LIMIT is not
    copied: it gets the inferred value_info and output types of its main graph, in place."""
    if not is_big(model):
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    out = onnx.shape_inference.infer_shapes(structure(model), **kwargs)
    del model.graph.value_info[:]
    model.graph.value_info.extend(out.graph.value_info)
    for mine, inferred in zip(model.graph.output, out.graph.output):
        mine.type.CopyFrom(inferred.type)
    return model


def constant_bytes(graph) -> int:
    """Bytes of an onnx-graphsurgeon graph's constants (from shapes: nothing is loaded)."""
    consts = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    return sum(int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize for t in consts)


def structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without the values of its main graph's initializers over SMALL
    bytes (name, type and dims kept, marked external): for analyses of shapes and ops, cheap at
    any size. (Subgraphs and Constant nodes are copied whole.)"""
    light = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _assign(light, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _assign(light.graph, fd, value)
    for t in model.graph.initializer:
        if t.HasField("raw_data") and tensor_bytes(t) > SMALL:
            meta = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            meta.data_location = onnx.TensorProto.EXTERNAL
            meta.external_data.add(key="location", value=_DETACHED)
        else:
            light.graph.initializer.add().CopyFrom(t)
    return light


def _assign(msg, fd, value) -> None:
    field = getattr(msg, fd.name)
    if hasattr(field, "extend"):  # repeated
        field.extend(value)
    elif fd.message_type:
        field.CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def check(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model` for a model of any size (a large model's big tensors are
    checked as one-element stand-ins: the checker without full_check reads no tensor shapes)."""
    if not is_big(model):
        onnx.checker.check_model(model)
        return
    light = structure(model)
    for t in light.graph.initializer:
        if _external(t):
            del t.external_data[:]
            t.ClearField("data_location")
            del t.dims[:]
            t.dims.append(1)
            t.raw_data = b"\0" * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    onnx.checker.check_model(light)


def digest(model: onnx.ModelProto) -> str:
    """sha256 of the model: its structure and the bytes of every tensor."""
    h = hashlib.sha256()
    with _tmpdir() as d, detached(model, d / "w.data", _DETACHED) as data:
        h.update(model.SerializeToString())
        h.update(artifact.sha256(data).encode())
    return h.hexdigest()


def data_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".data")


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path` atomically; over LIMIT its tensor data goes to `<name>.data`
    (written first, under a temporary name until complete). Returns `path`."""
    path = Path(path)
    data = data_path(path)
    if not is_big(model):
        artifact.write_bytes_atomic(path, model.SerializeToString())
        data.unlink(missing_ok=True)  # a stale one from a larger model of the same name
        return path
    with artifact.atomic_path(data) as tmp, detached(model, tmp, data.name):
        light = model.SerializeToString()  # references the final data name
    artifact.write_bytes_atomic(path, light)
    return path


@contextmanager
def _tmpdir() -> Iterator[Path]:
    """A temporary directory (on disk: detached bytes, models for ONNX Runtime)."""
    with tempfile.TemporaryDirectory(prefix="ffnx-model-") as d:
        yield Path(d)


@contextmanager
def session_path(model: onnx.ModelProto) -> Iterator[Path]:
    """The model saved (with external data) in a temporary directory, removed on exit."""
    with _tmpdir() as d:
        yield save_model(model, d / "model.onnx")
