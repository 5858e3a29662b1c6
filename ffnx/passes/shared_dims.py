"""shared_dims: every Shape read of a symbolic dimension from one graph input.

torch.export gives each graph input its own shape, so a KV-cache decoder's layer i computes
"past length" from its own cache, `Shape(past_key_values.i.value)[2]`, and everything built on
it (transformers' per-layer `mask[..., :past + seq]` slice: Shape, Squeeze, Add, Reshape, Slice)
is a different expression in every layer: ONNX Runtime's common-subexpression elimination
cannot merge what reads different tensors, so each layer pays the same five shape kernels again
(35 of a 476-kernel DeepSeek-V2 int4 decode step).

Rewrite: y = Shape(X, start, end) with X a graph input whose dims X[start:end] are all known
(symbol names or integers, at least one symbol) becomes y = Shape(Y, s, s + end - start), with
Y the first graph input (in input order) that holds the same dims, in the same order, at
positions s..s + end - start - 1 (the earliest such s), when Y is not X. Identical shape
chains then read identical tensors, and the runtime's CSE keeps one of each.

Exact under the model's shape contract: a symbolic dim names one value wherever it occurs in
the graph's inputs (torch.export's symbolic shapes; the decoder runtime feeds every cache with
the same past length and batch), so Y[s:s + k] = X[start:end] on every run the contract allows.
Conditions, each a reason when it fails: X's dims in the window known and not all integers (an
all-integer window is a constant: cleanup folds it); some earlier graph input holds the window.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ffnx.passes.base import GraphPass, Match, PassContext


def _window(n: gs.Node) -> list | None:
    """The dims Shape node n returns, as names/integers, or None when one is unknown."""
    shape = n.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start, end = n.attrs.get("start", 0), n.attrs.get("end", rank)
    start, end = (max(0, min(rank, a + rank if a < 0 else a)) for a in (start, end))
    dims = list(shape[start:end])
    if any(d is None or d == "" or (isinstance(d, int) and d < 0) for d in dims):
        return None
    return dims


def _source(graph: gs.Graph, dims: list) -> tuple[gs.Variable, int] | None:
    """The first graph input holding `dims` contiguously, and the first position it does."""
    k = len(dims)
    for t in graph.inputs:
        shape = list(t.shape or [])
        for s in range(len(shape) - k + 1):
            if shape[s : s + k] == dims:
                return t, s
    return None


class SharedDims(GraphPass):
    """Shape reads of a symbolic dim -> read from the first graph input holding it."""

    name = "shared_dims"

    def match(self, graph: gs.Graph) -> list[Match]:
        inputs = {t.name for t in graph.inputs}
        return [Match([n]) for n in graph.nodes
                if n.op == "Shape" and n.inputs and n.inputs[0].name in inputs]  # fmt: skip

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        n = m.nodes[0]
        dims = _window(n)
        if not dims:
            return "the dims it reads are not all known"
        if all(isinstance(d, int) for d in dims):
            return "the dims it reads are integers (a constant)"
        found = _source(graph, dims)
        if found is None or found[0] is n.inputs[0]:
            return "already the first graph input with these dims"
        m.info["source"], m.info["start"], m.info["size"] = found[0], found[1], len(dims)
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        n = m.nodes[0]
        start = m.info["start"]
        n.inputs[0] = m.info["source"]
        n.attrs["start"], n.attrs["end"] = start, start + m.info["size"]


PASS = SharedDims()
