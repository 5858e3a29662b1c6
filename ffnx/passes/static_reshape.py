"""Reshape targets computed from shapes at run time -> constants.

Exporters write `x.view(B, S, heads, D)` as Reshape(x, Concat(Slice(Shape(a)), Shape(b), ...)):
every run evaluates a chain of small shape kernels (Shape, Slice, Gather, Concat, Cast, ...) to
rebuild dims the input already has. A decoder step at batch 1 pays a few microseconds per kernel,
on a step of well under a millisecond once the weights are int4; and in a KV-cache decoder these
chains often read the past caches' shapes (torch.export picks one source per symbolic dim),
which then keeps the caches from being one shared buffer.

Rewrite: Reshape(x, s) with s not a constant, x of known shape X and the output of known shape
Y (symbolic dims by name: the exporter's own shapes, else ONNX shape inference with data
propagation, which evaluates Shape/Slice/Concat/Gather chains symbolically) becomes
Reshape(x, c) with

    c[i] = Y[i]   where Y[i] is a positive integer
    c[i] = 0      where Y[i] is a symbol equal to X[i] (Reshape's "copy dim i of the input")
    c[i] = -1     for at most one remaining dim (Reshape infers it from the element count)

and allowzero = 0 (exporters set allowzero = 1: their computed targets hold the dims themselves).

Exact: ONNX Reshape with allowzero = 0 reads 0 as "X[i]" and -1 as "the element count over the
other dims", so c gives Y whenever the shapes hold; a symbolic dim names the same value wherever
it occurs (the model's shape contract, from torch.export's symbolic shapes). A zero-size dim
stays exact through a copy (X[i] = 0 = Y[i]); -1 is undefined on an empty tensor, so a target
with allowzero = 1 (which may have meant one) gets no -1. Conditions, each a reason when it
fails: Y known (rank and every dim a name or an integer); no integer dim 0 (a 0 in c would copy
X[i] instead); at most one dim neither an integer nor a copy, and none under allowzero = 1.
The shape chain is left to cleanup, which removes it where nothing else reads it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph import model_io
from ffnx.graph.export import export_model
from ffnx.graph.tensors import const
from ffnx.passes.base import GraphPass, Match, PassContext


def _known(shape) -> bool:
    return shape is not None and all(d is not None and d != "" for d in shape)


def propagated_shapes(graph: gs.Graph) -> dict[str, list]:
    """Tensor name -> shape from ONNX shape inference with data propagation (main graph);
    empty past model_io.LIMIT (the export would copy every weight) or when inference fails."""
    if model_io.is_big_graph(graph):
        return {}
    try:
        model = onnx.shape_inference.infer_shapes(export_model(graph.copy()), data_prop=True)
    except Exception:  # an op inference cannot handle: keep the shapes the graph has
        return {}
    out = {}
    for vi in (*model.graph.value_info, *model.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_param if d.HasField("dim_param") else
                            d.dim_value if d.HasField("dim_value") else None
                            for d in vi.type.tensor_type.shape.dim]  # fmt: skip
    return out


def constant_target(x_shape, y_shape, allow_infer: bool = True) -> list[int] | str:
    """c for Reshape(x) -> y (module docstring), or why there is none."""
    if not _known(y_shape):
        return "the output shape is not known"
    x_shape = list(x_shape or [])
    target, free = [], 0
    for i, d in enumerate(y_shape):
        if isinstance(d, int | np.integer):
            if d <= 0:
                return f"output dim {i} is {d} (a 0 target would copy the input's dim)"
            target.append(int(d))
        elif i < len(x_shape) and isinstance(x_shape[i], str) and x_shape[i] == d:
            target.append(0)
        else:
            free += 1
            target.append(-1)
    if free > 1:
        return f"{free} output dims are neither constants nor the input's own"
    if free and not allow_infer:
        return "allowzero = 1 and an output dim to infer (-1 is undefined on an empty tensor)"
    return target


class StaticReshape(GraphPass):
    """Reshape targets computed from shapes -> constants (0 copies a dim, -1 infers one)."""

    name = "static_reshape"

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match([n]) for n in graph.nodes if n.op == "Reshape" and len(n.inputs) == 2
                and const(n.inputs[1]) is None]  # fmt: skip

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> dict:
        unknown = any(not _known(t.shape) for m in matches
                      for t in (m.nodes[0].inputs[0], m.nodes[0].outputs[0]))  # fmt: skip
        shapes = propagated_shapes(graph) if unknown else {}
        for m in matches:
            n = m.nodes[0]
            x, y = n.inputs[0], n.outputs[0]
            m.info["x"] = x.shape if _known(x.shape) else shapes.get(x.name)
            m.info["y"] = y.shape if _known(y.shape) else shapes.get(y.name)
        return {}

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        n = m.nodes[0]
        allow_infer = not n.attrs.get("allowzero", 0)
        c = constant_target(m.info["x"], m.info["y"], allow_infer)
        if isinstance(c, str):
            return c
        m.info["target"] = c
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        n = m.nodes[0]
        target = np.asarray(m.info["target"], dtype=np.int64)
        n.inputs[1] = gs.Constant(f"{n.name or n.outputs[0].name}/static_shape", target)
        n.attrs["allowzero"] = 0


PASS = StaticReshape()
