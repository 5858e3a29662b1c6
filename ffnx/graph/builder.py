"""The one graph builder: passes and lowerings add onnx-graphsurgeon nodes with it, so a rewrite
reads like the math it builds.

Every node and tensor is named `<prefix>/<hint>_<n>`, unique in the graph it was built on (a
lowering's prefix is `<ffnx node name>/<lowering>`, so `ffnx inspect` can group a lowered layer).
Inputs may be tensors, numpy arrays or python scalars (they become constants) or None (an absent
optional input).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

GELU_ERF, GELU_TANH = "gelu", "gelu_tanh"


def i64(*v) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


class Builder:
    """Adds nodes and constants to `graph` under unique names starting with `prefix`."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix
        self.names = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        self.i = 0

    def name(self, hint: str) -> str:
        while True:
            self.i += 1
            s = f"{self.prefix}/{hint}_{self.i}"
            if s not in self.names:
                self.names.add(s)
                return s

    def const(self, value, hint: str = "c") -> gs.Constant:
        value = np.asarray(value)  # not ascontiguousarray: it turns scalars into [1]
        return gs.Constant(self.name(hint), value if value.flags.c_contiguous else value.copy())

    def _tensor(self, v) -> gs.Tensor:
        if isinstance(v, gs.Tensor):
            return v
        if isinstance(v, np.ndarray):
            return self.const(v)
        if isinstance(v, (bool, np.generic)):  # a numpy scalar keeps its dtype
            return self.const(np.asarray(v))
        if isinstance(v, int):
            return self.const(i64(v).reshape(()))
        if isinstance(v, float):
            return self.const(f32(v).reshape(()))
        raise TypeError(f"cannot make a tensor of {type(v).__name__}")

    def op(self, op: str, *inputs, n_out: int = 1, outputs=None, domain: str | None = None,
           **attrs):  # fmt: skip
        """Append one `op` node and return its output (a list when it has several); `outputs`
        are existing tensors for it to write, else `n_out` fresh ones."""
        ins = [gs.Variable.empty() if i is None else self._tensor(i) for i in inputs]
        outs = (
            list(outputs)
            if outputs is not None
            else [gs.Variable(self.name(op.lower())) for _ in range(n_out)]
        )
        node = gs.Node(op, name=self.name(op), attrs=attrs, inputs=ins, outputs=outs, domain=domain)
        self.graph.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    # Shorthands for the ops lowerings use most.
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

    def linear(self, x: gs.Tensor, weight: np.ndarray, bias: np.ndarray | None, out=None):
        y = self.op("MatMul", x, self.const(weight, "w"), outputs=None if bias is not None else out)
        if bias is None:
            return y
        return self.op("Add", y, self.const(bias, "b"), outputs=out)

    def activation(self, kind: str, x: gs.Tensor, dtype=np.float32) -> gs.Tensor:
        """act(x) in the form the torch exporter emits (ONNX Runtime fuses these)."""
        c = lambda v, h: self.const(np.array(v, dtype), h)
        if kind == "relu":
            return self.op("Relu", x)
        if kind == "silu":
            return self.op("Mul", x, self.op("Sigmoid", x))
        if kind == GELU_ERF:
            e = self.op("Erf", self.op("Div", x, c(math.sqrt(2), "sqrt2")))
            half = self.op("Mul", c(0.5, "half"), self.op("Add", e, c(1.0, "one")))
            return self.op("Mul", x, half)
        if kind == GELU_TANH:
            cube = self.op("Mul", c(0.044715, "k"), self.op("Pow", x, c(3.0, "three")))
            inner = self.op("Mul", c(math.sqrt(2 / math.pi), "s"), self.op("Add", x, cube))
            t = self.op("Add", self.op("Tanh", inner), c(1.0, "one"))
            return self.op("Mul", x, self.op("Mul", c(0.5, "half"), t))
        if kind == "bilinear":
            return x
        raise ValueError(f"unknown activation {kind!r}")

    def redirect(self, t: gs.Tensor, out: gs.Tensor) -> None:
        """Make the node producing fresh tensor `t` write `out` instead."""
        node = t.inputs[0]
        node.outputs.clear()
        node.outputs.append(out)

    def norm(self, kind: str, x: gs.Tensor, eps: float, gamma, beta, dtype) -> gs.Tensor:
        """A last-axis LayerNorm/RMSNorm of x: the ONNX op when the opset has it, else the
        decomposition ONNX Runtime fuses (Pow, ReduceMean, Add, Sqrt, Div, Mul[, Add]),
        computed in float32 for half-precision inputs (as LayerNormalization's stash_type)."""
        opset, dtype = self.graph.opset, np.dtype(dtype)
        g = self.const(gamma.astype(dtype), "gamma") if gamma is not None else None
        b = self.const(beta.astype(dtype), "beta") if beta is not None else None
        if kind == "layernorm" and opset >= 17 and g is not None:
            ins = [x, g] + ([b] if b is not None else [])
            return self.op("LayerNormalization", *ins, axis=-1, epsilon=float(eps))
        if kind == "rmsnorm" and opset >= 23 and g is not None:
            y = self.op("RMSNormalization", x, g, axis=-1, epsilon=float(eps))
            return y if b is None else self.op("Add", y, b)
        low = dtype.itemsize < 4
        ct = np.float32 if low else dtype
        if low:
            x = self.op("Cast", x, to=1)
        c = lambda v, h: self.const(np.array(v, ct), h)
        axes = np.array([-1], np.int64)
        mean = lambda t: (
            self.op("ReduceMean", t, self.const(axes, "axes"), keepdims=1)
            if opset >= 18
            else self.op("ReduceMean", t, axes=[-1], keepdims=1)
        )
        if kind == "layernorm":
            x = self.op("Sub", x, mean(x))
        var = mean(self.op("Pow", x, c(2.0, "two")))
        y = self.op("Div", x, self.op("Sqrt", self.op("Add", var, c(eps, "eps"))))
        if low:
            y = self.op("Cast", y, to=int(onnx_dtype(dtype)))
        if g is not None:
            y = self.op("Mul", y, g)
        if b is not None:
            y = self.op("Add", y, b)
        return y


def onnx_dtype(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
