"""Summed linear branches on one input collapse into one linear (structural reparameterization).

    Σ_k (x·W_k + b_k) [+ x] = x·(Σ_k W_k [+ I]) + Σ_k b_k

over a tree of Adds whose terms are MatMul/Gemm linears of one tensor x (and x itself, at most
once, when the weights are square). Other terms of the sum are kept and added to the merged
linear. This is what multi-branch linear blocks and `reparameterize_ffn`'s output in a residual
(x + narrow FFN + x·W) reduce to; convolution branches are `merge_conv_branches`'.

Exact in real arithmetic: matrix products distribute over the sum; the float result differs only
by rounding (the summed weight is formed in float64 and cast back). Conditions checked: constant
2-D weights of one shape and dtype; every merged linear reads the very same tensor x and its
output is read only by the sum (not a graph output).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.algebra import is_sum_root, sum_terms
from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import Linear, linear_from_output, used_outside
from ffnx.passes.base import GraphPass, Match, PassContext


def _branch(t: gs.Tensor, graph: gs.Graph) -> Linear | None:
    lin = linear_from_output(t)
    if lin is None or lin.fused or len(t.outputs) != 1 or t in graph.outputs:
        return None
    if lin.nodes[0].op == "MatMul" and used_outside(lin.nodes, [lin.y], graph):
        return None
    return lin


def match_branches(root: gs.Node, graph: gs.Graph) -> dict | None:
    """{x, linears, identity, terms, adds} for ≥2 mergeable terms on one x in root's sum."""
    terms, adds = sum_terms(root, graph)
    lins = [(t, _branch(t, graph)) for t in terms]
    for x in {id(lin.x): lin.x for _, lin in lins if lin is not None}.values():
        group = [(t, lin) for t, lin in lins if lin is not None and lin.x is x]
        ident = [t for t in terms if t is x]
        if len(group) + len(ident) < 2 or len(ident) > 1:
            continue
        shapes = {lin.weight.shape for _, lin in group}
        dtypes = {lin.weight.dtype for _, lin in group}
        if len(shapes) != 1 or len(dtypes) != 1:
            continue
        d_in, d_out = next(iter(shapes))
        if ident and d_in != d_out:
            continue
        return {"x": x, "group": group, "identity": ident, "terms": terms, "adds": adds}
    return None


def rewrite_branches(m: dict, b: Builder) -> None:
    group, x = m["group"], m["x"]
    w = sum(lin.weight.astype(np.float64) for _, lin in group)
    if m["identity"]:
        w = w + np.eye(w.shape[0])
    bias = [lin.bias.astype(np.float64) for _, lin in group if lin.bias is not None]
    dt = group[0][1].weight.dtype
    merged = {id(t) for t, _ in group} | {id(t) for t in m["identity"]}
    rest = [t for t in m["terms"] if id(t) not in merged]
    root_out = m["adds"][0].outputs[0]
    for n in m["adds"]:
        n.outputs.clear()
    for _, lin in group:
        for n in lin.nodes:
            n.outputs.clear()
    if not rest:
        b.linear(x, w.astype(dt), sum(bias).astype(dt) if bias else None, out=[root_out])
        return
    y = b.linear(x, w.astype(dt), sum(bias).astype(dt) if bias else None)
    for i, t in enumerate(rest):
        y = b.op("Add", y, t, outputs=[root_out] if i == len(rest) - 1 else None)


class MergeLinearBranches(GraphPass):
    """Linears of one input summed (plus the input itself) -> one linear."""

    name = "merge_linear_branches"
    iterate = True  # merging one sum changes the sum trees the next match sees
    max_rounds = 64

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for n in graph.nodes:
            if n.op == "Add" and n.outputs and is_sum_root(n, graph):
                br = match_branches(n, graph)
                if br is not None:
                    out.append(Match([n], {"sum": br}))
        return out

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        rewrite_branches(m.info["sum"], Builder(graph, self.name))


PASS = MergeLinearBranches()
