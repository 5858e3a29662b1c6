"""ONNX models of any size in and out of memory.

Protobuf cannot serialize a message over 2 GiB (`EncodeError`), yet a model whose weights pass
that (a 0.6 B-parameter LLM in fp32) lives in memory as a ModelProto without trouble. So every
step that serializes a model goes through here:

  save_model     writes `path` (atomically); past LIMIT bytes of tensor data, the data goes to
                 one `<name>.data` beside it (ONNX external data, each tensor 4 KiB-aligned),
                 else a stale `<name>.data` is removed
  session_path   a model over LIMIT saved to a temporary directory for ONNX Runtime
  infer_shapes   onnx shape inference, and `check`, the onnx checker: run on `structure(model)`
                 (shapes and types need no values)
  is_big         past LIMIT: measured choices (the speed guard, the attention form), which
                 would hold the model in memory several times over, are not taken
  digest         sha256 of the model's structure and every tensor's bytes

`structure(model)` is the one mechanism: a copy of the model whose large main-graph initializers
keep their name, type and dims but no values. The model itself is never modified (protobuf's upb
runtime frees a cleared field's bytes only with the whole message: clearing the weights and
setting them back grew the model by its size on every save). A large tensor's bytes are read one
at a time, a transient copy, to be written out or hashed.
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
_VALUELESS = "ffnx-valueless"  # the location `structure` gives the tensors it leaves empty


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


def is_big_graph(graph) -> bool:
    """`is_big` for an onnx-graphsurgeon graph (its constants past LIMIT)."""
    return constant_bytes(graph) > LIMIT


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
        if _large(t):
            meta = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            meta.data_location = onnx.TensorProto.EXTERNAL
            meta.external_data.add(key="location", value=_VALUELESS)
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
    h = hashlib.sha256(structure(model).SerializeToString())
    for t in _valueless(model):
        h.update(t.raw_data)
    return h.hexdigest()


def _valueless(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The initializers `structure` keeps without values, in order."""
    return [t for t in model.graph.initializer if _large(t)]


def _large(t: onnx.TensorProto) -> bool:
    return not _external(t) and t.HasField("raw_data") and tensor_bytes(t) > SMALL


def data_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".data")


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path` atomically; over LIMIT the values of its large initializers go
    to `<name>.data` (written first, under a temporary name until complete). Returns `path`."""
    path = Path(path)
    data = data_path(path)
    if not is_big(model):
        artifact.write_bytes_atomic(path, model.SerializeToString())
        data.unlink(missing_ok=True)  # a stale one from a larger model of the same name
        return path
    light = structure(model)
    metas = [t for t in light.graph.initializer if _external(t)]
    with artifact.atomic_path(data) as tmp, open(tmp, "wb") as f:
        for t, meta in zip(_valueless(model), metas):
            f.write(b"\0" * (-f.tell() % ALIGN))
            offset, blob = f.tell(), t.raw_data  # a transient copy of one tensor
            f.write(blob)
            del meta.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)),
                               ("length", str(len(blob)))):  # fmt: skip
                meta.external_data.add(key=key, value=value)
            del blob
    artifact.write_bytes_atomic(path, light.SerializeToString())
    return path


@contextmanager
def session_path(model: onnx.ModelProto) -> Iterator[Path]:
    """The model saved (with external data) in a temporary directory, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="ffnx-model-") as d:
        yield save_model(model, Path(d) / "model.onnx")
