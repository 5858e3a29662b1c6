"""What TensorRT's ONNX parser will refuse, found before the parser runs.

`check_graph` lists one line per problem:
- an op_type outside the parser's supported list (`data/trt_supported_ops.txt`, which names
  its source). The parser ignores domains, so `com.microsoft::FusedMatMul` counts as unknown;
- `ScatterND` with `reduction` other than "none" and `NonZero` on a bool input: the parser
  rejects both, and both are what torch's export of a python MoE loop produces
  (`index_add_` -> ScatterND(reduction="add"), `torch.where(mask)` -> NonZero(bool));
- ffnx plugin nodes (`ffnx.plugins.schema.OPS`) without `plugin_namespace="ffnx"` /
  `plugin_version="1"`, with a missing required input, or with an empty-named optional input in
  the middle of the input list; FfnxMoE group-limited routing that the schema or the CUDA
  kernels (at most MAX_GROUPS groups) do not take.

Empty-named optional inputs: the parser turns an input named "" into a null tensor and passes
it on to `addPluginV3` (onnx-tensorrt `ModelImporter.cpp` parseNode: "Empty input names
indicate optional inputs which have not been supplied" -> `nodeInputs.emplace_back(nullptr)`;
`onnxOpImporters.cpp` addPluginWithCreator: `if (input.isNullTensor()) pluginInputs.push_back
(nullptr)`). TensorRT documents no behaviour for null plugin inputs, so `materialize_optional_
inputs` replaces each one by a zero-element initializer (shape [0]); the ffnx plugins read a
zero-volume optional input as absent. Trailing absent inputs are simply dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ffnx.plugins import schema

OPS_FILE = Path(__file__).parent / "data" / "trt_supported_ops.txt"
BOOL_PRODUCERS = {
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor",
    "IsNaN", "IsInf",
}  # fmt: skip
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
MAX_GROUPS = 32  # FfnxMoE n_group the CUDA routing kernel takes (moe.cu MAX_GROUPS)


@lru_cache(maxsize=1)
def supported_ops() -> frozenset[str]:
    """op_types TensorRT's ONNX parser imports natively (see the data file's header)."""
    lines = OPS_FILE.read_text().splitlines()
    return frozenset(s.strip() for s in lines if s.strip() and not s.startswith("#"))


def _label(node: onnx.NodeProto, where: str) -> str:
    name = node.name or "<unnamed>"
    return f"{where}node {name!r} ({node.op_type})"


def _walk(graph: onnx.GraphProto, where: str = "") -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node, subgraphs (If/Loop/Scan bodies) included, with a location prefix."""
    for node in graph.node:
        yield node, where
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _walk(sub, f"{where}{node.name or node.op_type}/{attr.name}: ")


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX elem type, from declarations plus (best-effort) shape inference."""
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # inference is an aid here; unknown types fall back to producer ops
        inferred = g
    for vi in [*inferred.input, *inferred.value_info, *inferred.output, *g.input, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _text(v) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def is_ffnx(node: onnx.NodeProto) -> bool:
    return node.op_type in schema.OPS or node.domain == schema.DOMAIN


def has_ffnx_nodes(model: onnx.ModelProto) -> bool:
    return any(is_ffnx(n) for n, _ in _walk(model.graph))


def has_qdq(model: onnx.ModelProto) -> bool:
    """True when the graph is explicitly quantized (Q/DQ nodes)."""
    return any(n.op_type in QDQ_OPS for n, _ in _walk(model.graph))


def _check_ffnx(node: onnx.NodeProto, where: str) -> list[str]:
    label = _label(node, where)
    spec = schema.OPS.get(node.op_type)
    if spec is None:
        return [f"{label}: unknown ffnx op; known: {', '.join(schema.OPS)}"]
    out = []
    for key, want in (
        ("plugin_namespace", schema.PLUGIN_NAMESPACE),
        ("plugin_version", schema.PLUGIN_VERSION),
    ):
        got = _text(_attr(node, key))
        if got != want:
            out.append(
                f"{label}: attribute {key}={got!r}, TensorRT's parser needs {want!r} to find "
                "the ffnx plugin (re-export with --target trt)"
            )
    if len(node.input) > len(spec.inputs):
        out.append(f"{label}: {len(node.input)} inputs, the schema has {len(spec.inputs)}")
    last = max((i for i, n in enumerate(node.input) if n), default=-1)
    for i, port in enumerate(spec.inputs):
        given = i < len(node.input) and node.input[i] != ""
        if not port.optional and not given:
            out.append(f"{label}: required input {i} ({port.name}) is missing")
        elif port.optional and not given and i < last:
            out.append(
                f"{label}: optional input {i} ({port.name}) is an empty name, which the parser "
                "passes as a null tensor; fill it with materialize_optional_inputs()"
            )
    if node.op_type == schema.MOE.op_type:
        out += _group_problems(node, label)
    return out


def _group_problems(node: onnx.NodeProto, label: str) -> list[str]:
    """FfnxMoE group-limited routing the plugin would refuse (checked when num_experts is set)."""
    attrs = {a.name: _text(helper.get_attribute_value(a)) for a in node.attribute}
    n = int(attrs.get("n_group", 1))
    if n <= 1 or int(attrs.get("num_experts", 0)) <= 0:
        return []
    err = schema.group_error(attrs)
    if err is None and n > MAX_GROUPS:
        err = f"n_group={n}: the CUDA kernels take at most {MAX_GROUPS} groups (use --target ort)"
    return [f"{label}: group-limited routing: {err}"] if err else []


def _check_node(
    node: onnx.NodeProto, where: str, types: dict[str, int], producers: dict[str, str]
) -> list[str]:
    label = _label(node, where)
    if node.op_type == "ScatterND":
        reduction = _text(_attr(node, "reduction", "none"))
        if reduction != "none":
            return [
                f"{label}: reduction={reduction!r} is not supported by TensorRT's parser "
                "(from a torch index_add_/scatter_add_ loop; export MoE layers with "
                "--target trt to get the FfnxMoE plugin instead)"
            ]
    if node.op_type == "NonZero" and node.input:
        src = node.input[0]
        if types.get(src) == TensorProto.BOOL or producers.get(src) in BOOL_PRODUCERS:
            return [
                f"{label}: NonZero on a bool input is not supported by TensorRT's parser "
                "(from torch.where(mask)/nonzero in an MoE loop; export with --target trt "
                "to get the FfnxMoE plugin instead)"
            ]
    if node.op_type not in supported_ops():
        dom = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
        return [f"{label}: {dom}{node.op_type} is not supported by TensorRT's ONNX parser"]
    return []


def check_graph(model: onnx.ModelProto) -> list[str]:
    """Problems TensorRT's ONNX parser would hit, one line each; [] when the graph is clean."""
    types = elem_types(model)
    functions = {(f.domain, f.name): f for f in model.functions}
    problems: list[str] = []

    def visit(nodes: Iterator[tuple[onnx.NodeProto, str]], seen: frozenset) -> None:
        nodes = list(nodes)
        producers = {o: n.op_type for n, _ in nodes for o in n.output}
        for node, where in nodes:
            key = (node.domain, node.op_type)
            if is_ffnx(node):
                problems.extend(_check_ffnx(node, where))
            elif key in functions and key not in seen:
                # The parser imports model-local functions by expanding their bodies.
                body = functions[key]
                sub = [(n, f"{where}{body.name}: ") for n in body.node]
                visit(iter(sub), seen | {key})
            else:
                problems.extend(_check_node(node, where, types, producers))

    visit(_walk(model.graph), frozenset())
    return problems


def materialize_optional_inputs(model: onnx.ModelProto) -> int:
    """Rewrite ffnx nodes so the parser never sees an empty input name (in place).

    Trailing empty inputs are dropped; each inner one becomes a shared zero-element initializer
    of the port's dtype (int64 ports: int64; fp32-only ports: float32; other float ports:
    hidden's dtype). Returns the number of inputs filled. Subgraphs are not rewritten.
    """
    g = model.graph
    types = elem_types(model)
    names = {t.name for t in g.initializer}
    filled = 0
    for node in g.node:
        spec = schema.OPS.get(node.op_type)
        if spec is None:
            continue
        inputs = list(node.input)
        while inputs and inputs[-1] == "":
            inputs.pop()
        for i, name in enumerate(inputs):
            if name or i >= len(spec.inputs) or not spec.inputs[i].optional:
                continue
            dtypes = spec.inputs[i].dtypes
            if dtypes == ("int64",):
                elem = TensorProto.INT64
            elif dtypes == ("float32",):
                elem = TensorProto.FLOAT
            else:
                elem = types.get(inputs[0], TensorProto.FLOAT)
            np_dtype = helper.tensor_dtype_to_np_dtype(elem)
            absent = f"ffnx_absent_{np.dtype(np_dtype).name}"
            if absent not in names:
                g.initializer.append(numpy_helper.from_array(np.zeros(0, np_dtype), absent))
                names.add(absent)
            inputs[i] = absent
            filled += 1
        del node.input[:]
        node.input.extend(inputs)
    return filled
