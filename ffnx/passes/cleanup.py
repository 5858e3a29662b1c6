"""Constant folding, Identity/Dropout removal, dead-node removal and a topological sort.

Forms handled:
- constant folding: every node whose inputs are all constants (initializers, Constant nodes,
  static shapes) is evaluated once with ONNX Runtime (onnx-graphsurgeon `fold_constants`) and
  replaced by its value; `If` nodes with a constant condition are flattened. Kept: random ops
  (Random*, Multinomial, Bernoulli), Q/DQ ops, custom-domain ops, outputs above
  FOLD_LIMIT_BYTES, nodes reading a weight (over SHARED_WEIGHT_LIMIT elements) another node also
  reads (folding would store it twice: a tied LM head's Transpose), and
  ConstantOfShape/Expand/Tile/Range unless their output is known to have at most EXPAND_LIMIT
  elements.
- y = Identity(x) and y = Dropout(x) at inference (no training_mode, or a constant false one;
  mask output unused): readers of y read x. When y is a graph output, x's producer writes y
  instead, so graph output names never change; when x is a graph input or a constant (no
  producer to rename) the node is kept.
- identity reshape pairs: Reshape(Reshape(a, s1), s2) whose output shape equals a's shape
  (known, symbolic dims compared by name) and whose inner result has no other reader is a.
- split of a concat: x_1..x_k = Split(Concat(x_1..x_k, axis a), axis a) with the split sizes
  equal to the x_i's (known) sizes along a: readers of the Split's outputs read the x_i (an
  export writes this when a module concatenates two parts its callee splits again: MLA's
  query). Kept when a Split output is a graph output.
- split of a split: p_1..p_k = Split(y_i, axis a) where y_i is part i of Split(x, axis a) and
  read by nothing else, both with known sizes: the first Split returns p_1..p_k in y_i's place
  (one kernel; fuse_sibling_linears leaves this when a merged linear had its own Split).
- nodes that no graph output depends on are removed; nodes are sorted topologically.

Exact: folding evaluates the same ops on the same values (ORT's CPU kernels, the ones that
would run them at inference); Identity and inference-mode Dropout return their input unchanged;
a reshape pair that ends in its input's shape reproduces its input (Reshape keeps element order);
splitting a concatenation at its seams returns its parts, and splitting a part at its seams is
splitting the whole at all of them.

`applied` counts non-Constant nodes removed; a graph where nothing folds or disappears reports
0 (Constant nodes turned into initializers alone do not count).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from ffnx.graph.ffn_match import split_sizes
from ffnx.graph.tensors import const, known_shape, producer, swap
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult

FOLD_LIMIT_BYTES = 64 << 20  # no folded constant above this
NO_FOLD = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
           "Multinomial", "Bernoulli")  # fmt: skip
# Generators turn a few bytes into many: folded only when their output is known to be small
# (attention masks, position ids), never e.g. the ConstantOfShape weights of "light" models.
EXPANDING = ("ConstantOfShape", "Expand", "Tile", "Range")
EXPAND_LIMIT = 1 << 16  # elements
# a constant above this (elements) that several nodes read is not copied by folding one of them
SHARED_WEIGHT_LIMIT = 1024
# graphsurgeon imports the default domain as None
STANDARD_DOMAINS = (None, "", "ai.onnx")


def count_nodes(graph: gs.Graph) -> int:
    """Non-Constant nodes of `graph` and its subgraphs."""
    total = 0
    for n in graph.nodes:
        total += n.op != "Constant"
        total += sum(count_nodes(g) for g in n.subgraphs())
    return total


def _exclude(n: gs.Node) -> bool:
    if n.op in EXPANDING:
        shape = known_shape(n.outputs[0]) if n.outputs else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            return True
        return int(np.prod(shape)) > EXPAND_LIMIT
    if n.op in NO_FOLD or n.domain not in STANDARD_DOMAINS:
        return True
    return any(_copies_weight(n, t) for t in n.inputs)


def _copies_weight(n: gs.Node, t: gs.Tensor) -> bool:
    """Folding n would store a second copy of the weight t (read by another node too: a
    tied embedding's Transpose for the LM head)."""
    return (isinstance(t, gs.Constant) and int(np.prod(t.shape)) > SHARED_WEIGHT_LIMIT
            and any(c is not n for c in t.outputs))  # fmt: skip


def fold_constants(graph: gs.Graph) -> None:
    """gs constant folding, quiet (it logs every partition it cannot evaluate)."""
    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.CRITICAL
    try:
        graph.toposort().fold_constants(
            partitioning="recursive",
            size_threshold=FOLD_LIMIT_BYTES,
            should_exclude_node=_exclude,
        )
    finally:
        G_LOGGER.severity = old


def _inference_dropout(n: gs.Node, graph: gs.Graph) -> bool:
    if len(n.outputs) > 1 and (n.outputs[1].outputs or n.outputs[1] in graph.outputs):
        return False  # the mask is read
    if len(n.inputs) > 2 and n.inputs[2].name:
        mode = const(n.inputs[2])
        return mode is not None and not bool(mode.reshape(-1)[0])
    return n.attrs.get("is_test", 1) != 0


def bypass_blocker(x: gs.Tensor, y: gs.Tensor, graph: gs.Graph) -> str | None:
    """Why y = f(x) cannot be bypassed (readers of y reading x), None when it can."""
    if y in graph.outputs:
        p = producer(x)
        if p is None or x in graph.inputs or x in graph.outputs or isinstance(x, gs.Constant):
            return f"{y.name} is a graph output and {x.name} has no producer to rename"
    return None


def bypass(n: gs.Node, graph: gs.Graph) -> None:
    """Make the readers of n.outputs[0] read n.inputs[0] (`bypass_blocker` said it can)."""
    x, y = n.inputs[0], n.outputs[0]
    if y in graph.outputs:
        p = producer(x)
        for c in list(x.outputs):
            if c is not n:
                swap(c.inputs, x, y)
        n.outputs.clear()
        n.inputs.clear()
        swap(p.outputs, x, y)
        return
    for c in list(y.outputs):
        swap(c.inputs, y, x)
    n.outputs.clear()


def identity_reshape_pair(outer: gs.Node, graph: gs.Graph) -> gs.Node | None:
    """The inner Reshape when Reshape(Reshape(a)) = a (see the module docstring), else None."""
    if outer.op != "Reshape":
        return None
    mid = outer.inputs[0]
    inner = producer(mid, "Reshape")
    if inner is None or len(mid.outputs) != 1 or mid in graph.outputs:
        return None
    a, out = known_shape(inner.inputs[0]), known_shape(outer.outputs[0])
    if a is None or a != out or any(isinstance(d, str) and not d for d in a):
        return None
    return inner


def split_of_concat(split: gs.Node) -> gs.Node | None:
    """The Concat whose parts `split` returns unchanged (see the module docstring), else None."""
    cat = producer(split.inputs[0], "Concat") if split.op == "Split" and split.inputs else None
    if cat is None or len(cat.inputs) != len(split.outputs):
        return None
    shapes = [known_shape(x) for x in cat.inputs]
    if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
        return None
    rank = len(shapes[0])
    axis, cat_axis = split.attrs.get("axis", 0), cat.attrs.get("axis")
    if cat_axis is None or not rank or axis % rank != cat_axis % rank:
        return None
    parts = [s[axis % rank] for s in shapes]
    if not all(isinstance(d, int) for d in parts):
        return None
    sizes = split_sizes(split)
    if sizes is None and len(set(parts)) == 1:
        sizes = parts  # no sizes given: equal parts, which the x_i are
    return cat if sizes == parts else None


def split_of_split(outer: gs.Node, graph: gs.Graph) -> gs.Node | None:
    """The Split whose one part `outer` splits again along the same axis (see the module
    docstring), else None."""
    inner = producer(outer.inputs[0], "Split") if outer.op == "Split" and outer.inputs else None
    part = outer.inputs[0] if inner is not None else None
    if inner is None or len(part.outputs) != 1 or part in graph.outputs:
        return None
    rank = len(known_shape(inner.inputs[0]) or known_shape(part) or [])  # one rank: a part's
    axes = [n.attrs.get("axis", 0) for n in (inner, outer)]
    if not rank or axes[0] % rank != axes[1] % rank:
        return None
    return inner if split_sizes(inner) is not None and split_sizes(outer) is not None else None


def merge_split_of_split(outer: gs.Node, inner: gs.Node) -> None:
    """inner's part i, split by outer into p_1..p_k: inner returns p_1..p_k in its place."""
    sizes, i = split_sizes(inner), [o.name for o in inner.outputs].index(outer.inputs[0].name)
    merged = sizes[:i] + split_sizes(outer) + sizes[i + 1 :]
    outs = list(inner.outputs[:i]) + list(outer.outputs) + list(inner.outputs[i + 1 :])
    outer.outputs.clear()
    inner.outputs.clear()
    inner.outputs.extend(outs)
    if "split" in inner.attrs:
        inner.attrs["split"] = merged
    else:
        name = f"{inner.name or outs[0].name}/split"
        inner.inputs[1] = gs.Constant(name, np.array(merged, np.int64))
    inner.attrs.pop("num_outputs", None)


class Cleanup(GraphPass):
    """Fold constants, drop Identity/inference Dropout/identity reshapes and dead nodes.

    Sites are the pass-through nodes (Identity, inference Dropout, the outer Reshape of an
    identity pair, a Split of a Concat at its seams); constant folding and dead-node removal
    are graph-wide and run in `finish`, which also counts `applied` as the non-Constant nodes
    removed in all."""

    name = "cleanup"

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for n in graph.nodes:
            if n.op == "Reshape":
                inner = identity_reshape_pair(n, graph)
                if inner is not None:
                    out.append(Match([n, inner], {"x": inner.inputs[0]}))
            elif n.op == "Identity" or n.op == "Dropout" and _inference_dropout(n, graph):
                out.append(Match([n], {"x": None}))
            elif n.op == "Split" and (cat := split_of_concat(n)) is not None:
                out.append(Match([n, cat], {"x": None, "parts": list(cat.inputs)}))
            elif n.op == "Split" and (inner := split_of_split(n, graph)) is not None:
                out.append(Match([n, inner], {"x": None, "inner": inner}))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        n = m.nodes[0]
        if "inner" in m.info:
            return None
        if "parts" in m.info:
            out = next((o for o in n.outputs if o in graph.outputs), None)
            return f"{out.name} is a graph output" if out is not None else None
        return bypass_blocker(m.info["x"] or n.inputs[0], n.outputs[0], graph)

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> dict:
        return {"start": count_nodes(graph)}

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        n = m.nodes[0]
        if "inner" in m.info:  # found again: an earlier merge may have moved n's input
            if (inner := split_of_split(n, graph)) is not None:
                merge_split_of_split(n, inner)
            return
        if "parts" in m.info:  # readers of each split output read the concatenated part
            for out, part in zip(n.outputs, m.info["parts"]):
                for c in list(out.outputs):
                    swap(c.inputs, out, part)
            n.outputs.clear()
            return
        if m.info["x"] is not None:
            n.inputs[0] = m.info["x"]  # the outer Reshape now maps a to itself
        bypass(n, graph)

    def finish(self, graph, ctx: PassContext, res: PassResult, matches, state) -> None:
        bypassed = res.applied
        start, after = state["start"], count_nodes(graph.cleanup())
        try:
            fold_constants(graph)
        except Exception as e:  # gs/ORT failing on an unusual graph: report, fold nothing
            res.skipped.append(("fold_constants", f"constant folding failed: {str(e)[:200]}"))
        folded = after - count_nodes(graph.cleanup())
        graph.toposort()
        dead = max(0, start - after - bypassed)
        res.applied = max(0, start - count_nodes(graph))
        res.matched += dead + folded
        res.notes.update(dead=dead, folded=folded, bypassed=bypassed)


PASS = Cleanup()
