"""Reading a graphsurgeon graph like the math: constant values, producers, sole consumers."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def const(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        return np.asarray(v.values) if isinstance(v, gs.Constant) else None
    return None


def sole_consumer(t: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The only node reading `t`, if `t` is not also a graph output."""
    if len(t.outputs) != 1 or t in graph.outputs:
        return None
    return t.outputs[0]


def producer(t: gs.Tensor, op: str | tuple[str, ...] | None = None) -> gs.Node | None:
    if len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    if op is None or n.op == op or (isinstance(op, tuple) and n.op in op):
        return n
    return None


def other_input(n: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The input of a binary node `n` that is not `t` (None when `t` is not one of two)."""
    if len(n.inputs) != 2 or t not in n.inputs:
        return None
    return n.inputs[1] if n.inputs[0] is t else n.inputs[0]


def unsqueeze_axes(n: gs.Node) -> list[int] | None:
    """The axes of an Unsqueeze: its constant second input (opset >= 13) or its attribute."""
    axes = const(n.inputs[1]) if len(n.inputs) > 1 else n.attrs.get("axes")
    return None if axes is None else [int(a) for a in np.atleast_1d(axes)]


def set_input(n: gs.Node, i: int, t: gs.Tensor) -> None:
    """n.inputs[i] = t, appending when n has only i inputs."""
    if len(n.inputs) > i:
        n.inputs[i] = t
    else:
        n.inputs.append(t)


def known_shape(t: gs.Tensor) -> list | None:
    s = t.shape if isinstance(t, gs.Variable) else None
    return list(s) if s is not None and all(d is not None for d in s) else None


def swap(ts, old: gs.Tensor, new: gs.Tensor) -> None:
    """Replace `old` by `new` in a node's inputs or outputs (gs lists take no slices)."""
    for i, t in enumerate(ts):
        if t is old:
            ts[i] = new
