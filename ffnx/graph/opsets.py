"""Opset imports of a rewritten model: one rule for the driver and every lowering.

A model keeps the opset imports it started with for the default domain and for every domain its
nodes (subgraphs and functions included) still use; a domain a rewrite introduced (e.g.
com.microsoft) is added, at the version the rewritten model declares or 1; a custom domain no
node uses any more (ffnx after lowering) is dropped.
"""

from __future__ import annotations

import copy

import onnx

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (GroupQueryAttention, MatMulNBits, ...)


def _all_nodes(graph: onnx.GraphProto):
    """Every node, including those inside If/Loop/Scan bodies."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


def merged_opsets(model: onnx.ModelProto, original) -> list:
    """The original opset imports, plus one for each domain a pass introduced (e.g.
    com.microsoft), minus custom domains no node uses any more (e.g. ffnx after lowering)."""
    used = (
        {n.domain for n in _all_nodes(model.graph)}
        | {n.domain for f in model.functions for n in f.node}
        | {f.domain for f in model.functions}
    )
    out = [copy.copy(o) for o in original if o.domain in ("", "ai.onnx") or o.domain in used]
    have = {o.domain for o in out}
    for o in model.opset_import:
        if o.domain not in have and o.domain in used:
            out.append(copy.copy(o))
            have.add(o.domain)
    for domain in sorted(used - have - {"ai.onnx"}):
        out.append(onnx.helper.make_opsetid(domain, 1))
    return out


def set_opsets(model: onnx.ModelProto, original=None) -> onnx.ModelProto:
    """Replace `model`'s opset imports by `merged_opsets(model, original)` (`original`: the
    imports of the model it was rewritten from; default its own) and return it."""
    opsets = merged_opsets(model, model.opset_import if original is None else original)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model
