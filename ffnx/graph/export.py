"""An onnx-graphsurgeon graph -> onnx.ModelProto: one way for every rewrite and lowering.

graphsurgeon writes a Constant as an initializer of each graph whose own nodes read it, so a
weight read inside both branches of an `If` (the token-count switch of a lowered MoE) is stored
once per branch: a three-way switch over Mixtral's experts tripled them and went past protobuf's
2 GiB. `export_model` therefore hoists such initializers into the enclosing graph
(`hoist_branch_initializers`). That is exact: a subgraph reads every name of its enclosing
scopes (ONNX's outer-scope rule), so moving an initializer outward, or dropping a branch's copy
of one the outer graph already holds with the same name, dims, type and bytes, changes no value.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """`graph` exported, branch initializers hoisted; IR >= 4 (graphsurgeon drops initializers
    from the inputs but keeps the IR version, and IR < 4 needs every initializer an input)."""
    model = gs.export_onnx(graph)
    model.ir_version = max(model.ir_version, 4)
    hoist_branch_initializers(model.graph)
    return model


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a.dims != b.dims or a.data_type != b.data_type:
        return False
    if a.HasField("raw_data") and b.HasField("raw_data"):
        return a.raw_data == b.raw_data
    return a.SerializeToString() == b.SerializeToString()


def hoist_branch_initializers(graph: onnx.GraphProto) -> int:
    """Move every initializer of `graph`'s subgraphs (innermost first) into `graph`, or drop it
    where `graph` holds an equal one of that name; one whose name `graph` defines otherwise (an
    input, a node output, a different initializer) stays where it is. -> how many moved."""
    moved = 0
    inits = {t.name: t for t in graph.initializer}
    defined = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    for node in graph.node:
        for sub in _subgraphs(node):
            moved += hoist_branch_initializers(sub)
            keep = []
            for t in sub.initializer:
                if t.name in inits and _same(inits[t.name], t):
                    moved += 1
                elif t.name not in inits and t.name not in defined:
                    graph.initializer.append(t)
                    inits[t.name] = graph.initializer[-1]
                    moved += 1
                else:
                    keep.append(t)
            if len(keep) != len(sub.initializer):
                del sub.initializer[:]
                sub.initializer.extend(keep)
    return moved
