"""Matchers for normalisation subgraphs.

Norm: LayerNormalization / RMSNormalization ops and their decompositions
    x / √(mean(x²) + ε) [·γ] [+β] (Div or Reciprocal·Mul), with x = Sub(z, ReduceMean(z)) for LN.

Matchers return None for anything they do not recognise; they never modify the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.ffn_match import last_axis, reduce_axes, scalar, used_outside
from ffnx.graph.tensors import const, producer

# Norms ------------------------------------------------------------------------------------


@dataclass
class Norm:
    """y = γ ⊙ (x − [mean(x)]) / √(mean((x − [mean])²) + ε) + β over the last axis of x."""

    kind: str  # "layernorm" | "rmsnorm"
    x: gs.Tensor
    y: gs.Tensor
    gamma: np.ndarray | None
    beta: np.ndarray | None
    eps: float
    nodes: list[gs.Node]

    @property
    def op(self) -> bool:
        """True for a single LayerNormalization/RMSNormalization node."""
        return len(self.nodes) == 1


def find_norms(graph: gs.Graph) -> list[Norm]:
    """Every last-axis LayerNorm/RMSNorm (op or decomposed) in the graph, in node order."""
    out = []
    for n in list(graph.nodes):
        m = None
        if n.op in ("LayerNormalization", "RMSNormalization"):
            m = _norm_op(n)
        elif n.op == "ReduceMean":
            m = _norm_decomposed(n, graph)
        if m is not None:
            out.append(m)
    return out


def _norm_op(n: gs.Node) -> Norm | None:
    x = n.inputs[0]
    if not last_axis(n.attrs.get("axis", -1), x) or len(n.outputs) < 1:
        return None
    if any(o.outputs for o in n.outputs[1:]):  # mean/inv-std outputs used: not a plain norm
        return None
    gamma = const(n.inputs[1]) if len(n.inputs) > 1 else None
    beta = const(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
    if (
        len(n.inputs) > 1
        and gamma is None
        or len(n.inputs) > 2
        and n.inputs[2].name
        and beta is None
    ):
        return None
    kind = "layernorm" if n.op == "LayerNormalization" else "rmsnorm"
    return Norm(kind, x, n.outputs[0], gamma, beta, float(n.attrs.get("epsilon", 1e-5)), [n])


def _reduces_last(n: gs.Node) -> bool:
    axes = reduce_axes(n)
    return (
        axes is not None
        and len(axes) == 1
        and n.attrs.get("keepdims", 1) == 1
        and last_axis(axes[0], n.inputs[0])
    )


def _sole(t: gs.Tensor, ops: tuple[str, ...]) -> gs.Node | None:
    """The only reader of `t` when its op is one of `ops`."""
    return t.outputs[0] if len(t.outputs) == 1 and t.outputs[0].op in ops else None


def _is_in(n: gs.Node, nodes) -> bool:
    return any(n is m for m in nodes)


def _norm_decomposed(rm: gs.Node, graph: gs.Graph) -> Norm | None:
    """ReduceMean(x²) → Add ε → Sqrt → Div(x, ·) or Reciprocal → Mul(x, ·), then ·γ, +β."""
    if not _reduces_last(rm):
        return None
    sq = producer(rm.inputs[0], ("Pow", "Mul"))
    if sq is None or len(rm.inputs[0].outputs) != 1:
        return None
    x = sq.inputs[0]
    if sq.op == "Pow" and scalar(sq.inputs[1]) != 2.0 or sq.op == "Mul" and sq.inputs[1] is not x:
        return None
    add = _sole(rm.outputs[0], ("Add",))
    other = [i for i in add.inputs if i is not rm.outputs[0]] if add is not None else []
    eps = scalar(other[0]) if len(other) == 1 else None
    sqrt = _sole(add.outputs[0], ("Sqrt",)) if eps is not None else None
    if sqrt is None:
        return None
    nodes = [sq, rm, add, sqrt]
    d = _sole(sqrt.outputs[0], ("Div", "Reciprocal"))
    if d is not None and d.op == "Reciprocal":
        nodes.append(d)
        d = _sole(d.outputs[0], ("Mul",))
        if d is None or x not in d.inputs:
            return None
    elif d is None or d.inputs[0] is not x:
        return None
    nodes.append(d)
    y, gamma, beta = d.outputs[0], None, None
    for op in ("Mul", "Add"):
        nxt = _sole(y, (op,)) if y not in graph.outputs else None
        other = [i for i in nxt.inputs if i is not y] if nxt is not None else []
        v = const(other[0]) if len(other) == 1 else None
        if v is None or v.ndim > 1 and any(s != 1 for s in v.shape[:-1]):
            break
        gamma, beta = (v.reshape(-1), beta) if op == "Mul" else (gamma, v.reshape(-1))
        nodes.append(nxt)
        y = nxt.outputs[0]
    if used_outside(nodes, [y], graph):
        return None
    sub = producer(x, "Sub")
    mean = producer(sub.inputs[1], "ReduceMean") if sub is not None else None
    if mean is not None and mean.inputs[0] is sub.inputs[0] and _reduces_last(mean):
        z = sub.inputs[0]
        readers = list(x.outputs) + list(mean.outputs[0].outputs)
        if all(_is_in(c, (sq, d, sub)) for c in readers) and x not in graph.outputs:
            return Norm("layernorm", z, y, gamma, beta, eps, [mean, sub] + nodes)
    return Norm("rmsnorm", x, y, gamma, beta, eps, nodes)
