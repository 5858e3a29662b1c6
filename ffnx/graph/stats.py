"""Node, parameter and FLOP counts of an ONNX graph (pass reports, `ffnx inspect`).

FLOPs count multiply-adds as 2 for MatMul/Gemm/Conv at concrete input sizes (dynamic dims set
to their example sizes, then onnx shape inference); other ops are not counted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from ffnx.graph.model_io import infer_shapes, structure


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(_op_name(n) for n in model.graph.node).most_common())


def _op_name(n: onnx.NodeProto) -> str:
    return f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type


def param_count(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        total += int(np.prod(init.dims)) if init.dims else 1
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    total += int(np.prod(a.t.dims)) if a.t.dims else 1
    return total


def concrete_shapes(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, list[int]]:
    """Shape of every tensor with dynamic input dims bound to `dims` (unknown labels -> 1)."""
    m = structure(model)  # weights not copied: shapes only
    del m.graph.value_info[:]
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_value = int(dims.get(d.dim_param, 1))
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    try:
        m = infer_shapes(m, data_prop=True)
    except Exception:  # shape inference is best effort for stats (custom ops, odd graphs)
        return {}
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        s = vi.type.tensor_type.shape
        if all(d.HasField("dim_value") for d in s.dim):
            shapes[vi.name] = [d.dim_value for d in s.dim]
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def flop_count(model: onnx.ModelProto, dims: dict[str, int]) -> int | None:
    shapes = concrete_shapes(model, dims)
    if not shapes:
        return None
    total = 0
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2:
            a, b = shapes.get(n.input[0]), shapes.get(n.input[1])
            out = shapes.get(n.output[0])
            if not a or not b or out is None:  # unknown, or rank 0 (not a real product)
                continue
            k = a[-1] if n.op_type == "MatMul" or not _attr(n, "transA") else a[0]
            total += 2 * int(np.prod(out)) * int(k)
        elif n.op_type == "Conv" and len(n.input) >= 2:
            w, out = shapes.get(n.input[1]), shapes.get(n.output[0])
            if w is not None and out is not None:
                total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return total


def _attr(n: onnx.NodeProto, name: str, default=0):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def graph_stats(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> dict:
    return {
        "nodes": len(model.graph.node),
        "params": param_count(model),
        "flops": flop_count(model, dims or {}),
    }
