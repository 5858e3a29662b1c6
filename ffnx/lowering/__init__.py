"""Lowerings of ffnx op nodes to graphs ONNX Runtime runs.

`decompose_ffnx_ops(model)` replaces every ffnx node by its plain standard-ONNX decomposition
(what verification runs); `lower_moe_node(graph, node, choice)` lowers one FfnxMoE node to a
chosen candidate (the `lower_moe` pass). Candidates, by name:

  sorted, per_expert, gather, dense   standard ONNX (see `moe_forms`)
  ort_moe                 com.microsoft::MoE (see `moe_ort`)
  sorted_int8/_int4, qmoe_int8/_int4   weight-only quantized experts (see `moe_ort`)
  "<small>|<T>|<large>"   an `If` on the token count: <small> when T <= <T>, else <large>

Modules: `moe_common` (routing, activations, shared experts), `moe_forms`, `moe_ort`,
`choose` (which candidate per layer: measured and cached), `timing` (round-robin timing),
`moe_model` (single-node FfnxMoE models: what the chooser times, tests and benchmarks use).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph import lowering_meta
from ffnx.graph.builder import Builder, i64
from ffnx.graph.export import export_model
from ffnx.graph.opsets import set_opsets
from ffnx.lowering.moe_common import LoweringError, MoESite, finish, flatten, route, shared
from ffnx.lowering.moe_forms import FORMS
from ffnx.plugins.schema import DOMAIN

PLAIN = "sorted"  # decomposition used for verification: exact routed FLOPs, no contrib ops


def candidates() -> list[str]:
    from ffnx.lowering.moe_ort import ORT_FORMS

    return [*FORMS, *ORT_FORMS]


def lower_moe_node(graph: gs.Graph, node: gs.Node, choice: str = PLAIN, why: str = "") -> str:
    """Replace one FfnxMoE node in `graph` by the `choice` lowering; returns the choice.

    The lowered nodes are named `<node>/<choice>/...`; with `why`, the choice is recorded
    (`ffnx.graph.lowering_meta`: the model's metadata_props once the graph is exported)."""
    s = MoESite.of(node)
    b = Builder(graph, f"{node.name}/{choice.replace('|', '_')}")
    x = flatten(b, s)
    y = _routed(b, s, x, choice)
    y = b.add(y, shared(b, s, x))
    finish(b, s, y)
    if why:
        lowering_meta.record(graph, "lower_moe", node.name, choice, why)
    return choice


def _routed(b: Builder, s: MoESite, x, choice: str):
    first, *rest = choice.split("|")
    if rest:  # "a|T|rest": If(T_tokens <= T) a else rest
        t = b.op("Gather", b.op("Shape", x), i64(0), axis=0)
        cond = b.op("LessOrEqual", t, i64(int(rest[0])).reshape(()))
        return b.op(
            "If",
            cond,
            then_branch=_branch(b, s, x, first),
            else_branch=_branch(b, s, x, "|".join(rest[1:])),
        )
    if first in FORMS:
        idx, w = route(b, s)
        return FORMS[first](b, s, x, idx, w)
    from ffnx.lowering.moe_ort import ORT_FORMS

    if first in ORT_FORMS:
        return ORT_FORMS[first](b, s, x)
    raise LoweringError(f"{s.node.name}: unknown lowering {first!r}; known: {candidates()}")


def _branch(b: Builder, s: MoESite, x, choice: str) -> gs.Graph:
    sub = gs.Graph(opset=b.graph.opset)
    y = _routed(Builder(sub, f"{b.prefix}/{choice.split('|')[0]}"), s, x, choice)
    y.dtype = np.float32
    sub.outputs = [y]
    return sub


def decompose_ffnx_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every ffnx node replaced by its plain decomposition (standard ONNX):
    FfnxMoE -> `sorted`, FfnxSparseFFN -> `ffnx.lowering.sparse`'s plain form."""
    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.domain == DOMAIN]:
        if node.op == "FfnxMoE":
            lower_moe_node(graph, node, PLAIN)
        elif node.op == "FfnxSparseFFN":
            from ffnx.lowering.sparse import lower_sparse_ffn

            lower_sparse_ffn(graph, node)  # its plain (dense-masked) form
        else:
            raise LoweringError(f"{node.name}: no decomposition for {DOMAIN}::{node.op}")
    graph.cleanup().toposort()
    return set_opsets(export_model(graph), model.opset_import)


def lowering_report(model: onnx.ModelProto) -> dict[str, str]:
    """{MoE layer: "<lowering> (<why>)"} from the model's lowering records (lowering_meta)."""
    return {
        e["layer"]: f"{e['choice']} ({e['why']})"
        for e in lowering_meta.read(model)
        if e["pass"] == "lower_moe"
    }


__all__ = [
    "decompose_ffnx_ops",
    "lower_moe_node",
    "candidates",
    "LoweringError",
    "PLAIN",
    "lowering_report",
]


def runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as ORT can run it: ffnx op nodes replaced by their reference decomposition."""
    if not any(n.domain == "ffnx" for n in model.graph.node):
        return model
    return decompose_ffnx_ops(model)


def run_model(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    from ffnx.graph.ort import ort_session, run_session

    sess = ort_session(runnable(model), prepack=False)  # run once: no packed weight copies
    return [run_session(sess, f) for f in feeds]
