"""Constant folding, Identity/Dropout removal, dead-node removal and a topological sort.

Forms handled:
- constant folding: every node whose inputs are all constants (initializers, Constant nodes,
  static shapes) is evaluated once with ONNX Runtime (onnx-graphsurgeon `fold_constants`) and
  replaced by its value; `If` nodes with a constant condition are flattened. Kept: random ops
  (Random*, Multinomial, Bernoulli), Q/DQ ops, custom-domain ops, outputs above
  FOLD_LIMIT_BYTES, and ConstantOfShape/Expand/Tile/Range unless their output is known to have
  at most EXPAND_LIMIT elements.
- y = Identity(x) and y = Dropout(x) at inference (no training_mode, or a constant false one;
  mask output unused): readers of y read x. When y is a graph output, x's producer writes y
  instead, so graph output names never change; when x is a graph input or a constant (no
  producer to rename) the node is kept.
- identity reshape pairs: Reshape(Reshape(a, s1), s2) whose output shape equals a's shape
  (known, symbolic dims compared by name) and whose inner result has no other reader is a.
- nodes that no graph output depends on are removed; nodes are sorted topologically.

Exact: folding evaluates the same ops on the same values (ORT's CPU kernels, the ones that
would run them at inference); Identity and inference-mode Dropout return their input unchanged;
a reshape pair that ends in its input's shape reproduces its input (Reshape keeps element order).

`applied` counts non-Constant nodes removed; a graph where nothing folds or disappears reports
0 (Constant nodes turned into initializers alone do not count).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from ffnx.graph.tensors import const, known_shape, producer, swap
from ffnx.passes.base import GraphPass, PassContext, PassResult

FOLD_LIMIT_BYTES = 64 << 20  # no folded constant above this
NO_FOLD = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
           "Multinomial", "Bernoulli")  # fmt: skip
# Generators turn a few bytes into many: folded only when their output is known to be small
# (attention masks, position ids), never e.g. the ConstantOfShape weights of "light" models.
EXPANDING = ("ConstantOfShape", "Expand", "Tile", "Range")
EXPAND_LIMIT = 1 << 16  # elements


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
    return n.op in NO_FOLD or n.domain not in ("", "ai.onnx")


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


def bypass(n: gs.Node, graph: gs.Graph) -> str | None:
    """Make the readers of n.outputs[0] read n.inputs[0]; None on success, else why not."""
    x, y = n.inputs[0], n.outputs[0]
    if y in graph.outputs:
        p = producer(x)
        if p is None or x in graph.inputs or x in graph.outputs or isinstance(x, gs.Constant):
            return f"{y.name} is a graph output and {x.name} has no producer to rename"
        for c in list(x.outputs):
            if c is not n:
                swap(c.inputs, x, y)
        n.outputs.clear()
        n.inputs.clear()
        swap(p.outputs, x, y)
        return None
    for c in list(y.outputs):
        swap(c.inputs, y, x)
    n.outputs.clear()
    return None


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


class Cleanup(GraphPass):
    """Fold constants, drop Identity/inference Dropout/identity reshapes and dead nodes."""

    name = "cleanup"

    def apply(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        start = count_nodes(graph)
        graph.cleanup()
        dead = start - count_nodes(graph)
        try:
            fold_constants(graph)
        except Exception as e:  # gs/ORT failing on an unusual graph: report, change nothing
            res.skipped.append(("fold_constants", f"constant folding failed: {str(e)[:200]}"))
            return res
        folded = start - dead - count_nodes(graph.cleanup())
        bypassed = 0
        for n in list(graph.nodes):
            inner = identity_reshape_pair(n, graph) if n.op == "Reshape" else None
            if inner is not None:
                n.inputs[0] = inner.inputs[0]  # the outer Reshape now maps a to itself
            elif not (n.op == "Identity" or n.op == "Dropout" and _inference_dropout(n, graph)):
                continue
            res.matched += 1
            reason = bypass(n, graph)
            if reason and inner is not None:
                n.inputs[0] = inner.outputs[0]
            if reason:
                res.skipped.append((f"{n.op}({n.name})", reason))
            bypassed += not reason
        graph.cleanup().toposort()
        res.applied = max(0, start - count_nodes(graph))
        res.matched += dead + folded
        res.notes.update(dead=dead, folded=folded, bypassed=bypassed)
        return res


PASS = Cleanup()
