"""Rewrites shared by several passes (one place, not imported from another pass).

merge_linears: linears y_i = x·W_i + b_i on one input x → h = x·[W_1 | … | W_n] + [b_1; …; b_n]
    and a last-axis Split of h into the widths of the y_i. Exact: each column of h is computed
    from the same x with the same weights (float rounding of the dot products unchanged).
sum_terms: the sum tree y = t_1 + … + t_n rooted at an Add (inner Adds of two non-constant
    inputs, each read only by the next Add) → its terms t_i and Adds; `is_sum_root` says
    which Adds are roots. Reassociating the sum is exact in real arithmetic; in floats it
    changes rounding only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import Linear
from ffnx.graph.tensors import const, producer


def merge_linears(graph: gs.Graph, prefix: str, linears: list[Linear]) -> None:
    """Replace linears on one input by x·[W_1 | ... | W_n] + [b_1; ...] (a missing bias is
    zeros) and a last-axis Split whose parts are the old outputs y_i (same tensors, new
    producer). The old MatMul/Add nodes lose their outputs; cleanup removes them."""
    outs = [lin.y for lin in linears]
    for lin in linears:
        for n in lin.nodes:
            n.outputs.clear()
    dt = linears[0].weight.dtype
    b = Builder(graph, prefix)
    w = np.concatenate([lin.weight for lin in linears], axis=1)
    bias = None
    if any(lin.bias is not None for lin in linears):
        parts = [np.zeros(lin.width, dt) if lin.bias is None else lin.bias for lin in linears]
        bias = np.concatenate(parts).astype(dt)
    h = b.linear(linears[0].x, w, bias)
    sizes = np.array([lin.width for lin in linears], np.int64)
    if graph.opset >= 13:
        b.op("Split", h, b.const(sizes, "split"), axis=-1, outputs=outs)
    else:
        b.op("Split", h, axis=-1, split=sizes.tolist(), outputs=outs)


def sum_terms(
    root: gs.Node, graph: gs.Graph, constant_adds: bool = False
) -> tuple[list[gs.Tensor], list[gs.Node]]:
    """Terms and Add nodes of the sum tree rooted at Add `root` (inner Adds read once). An Add
    with a constant input is a term unless `constant_adds` (then the constant is a term)."""
    terms, adds = [], []

    def walk(t: gs.Tensor, is_root: bool) -> None:
        p = producer(t, "Add")
        inner_ok = is_root or (len(t.outputs) == 1 and t not in graph.outputs)
        plain = (
            p is not None
            and len(p.inputs) == 2
            and (constant_adds or all(const(i) is None for i in p.inputs))
        )
        if plain and inner_ok:
            adds.append(p)
            for i in p.inputs:
                walk(i, False)
        else:
            terms.append(t)

    walk(root.outputs[0], True)
    return terms, adds


def is_sum_root(n: gs.Node, graph: gs.Graph) -> bool:
    """An Add of two non-constant terms that is not itself an inner node of a larger sum."""
    if (
        n.op != "Add"
        or len(n.inputs) != 2
        or len(n.outputs) != 1
        or any(const(i) is not None for i in n.inputs)
    ):
        return False
    t = n.outputs[0]
    if len(t.outputs) != 1 or t in graph.outputs:
        return True
    c = t.outputs[0]
    return c.op != "Add" or any(const(i) is not None for i in c.inputs)
