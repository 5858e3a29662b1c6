"""A small emitter of onnx-graphsurgeon nodes: lowerings read like the math they build.

Every node and tensor a lowering adds is named `<prefix>/<op>_<n>`, the prefix being
`<ffnx node name>/<lowering>` so that `ffnx inspect` can group a lowered layer's nodes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def i64(*v) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


class Builder:
    """Appends nodes to `graph` (or an `If` branch); numpy/python values become constants."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self._n = graph, prefix, 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, hint: str = "const") -> gs.Constant:
        value = np.asarray(value)  # not ascontiguousarray: it turns scalars into [1]
        return gs.Constant(self.name(hint), value if value.flags.c_contiguous else value.copy())

    def _tensor(self, v) -> gs.Tensor:
        if isinstance(v, gs.Tensor):
            return v
        if isinstance(v, np.ndarray):
            return self.const(v)
        if isinstance(v, (bool, np.bool_)):
            return self.const(np.asarray(v))
        if isinstance(v, int):
            return self.const(i64(v).reshape(()))
        if isinstance(v, float):
            return self.const(f32(v).reshape(()))
        raise TypeError(f"cannot make a tensor of {type(v).__name__}")

    def op(self, op: str, *inputs, n_out: int = 1, domain: str | None = None, **attrs):
        """One node; inputs may be tensors, numpy arrays or scalars (None: absent optional)."""
        ins = [gs.Variable.empty() if i is None else self._tensor(i) for i in inputs]
        outs = [gs.Variable(self.name(op.lower())) for _ in range(n_out)]
        node = gs.Node(op, name=self.name(op), attrs=attrs, inputs=ins, outputs=outs, domain=domain)
        self.graph.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    # Shorthands for the ops every lowering uses.
    def reshape(self, x, *shape):
        return self.op("Reshape", x, i64(*shape))

    def unsqueeze(self, x, *axes):
        return self.op("Unsqueeze", x, i64(*axes))

    def reduce_sum(self, x, axis: int, keepdims: int = 0):
        return self.op("ReduceSum", x, i64(axis), keepdims=keepdims)

    def matmul(self, a, b):
        return self.op("MatMul", a, b)

    def mul(self, a, b):
        return self.op("Mul", a, b)

    def add(self, a, b):
        return a if b is None else self.op("Add", a, b)
