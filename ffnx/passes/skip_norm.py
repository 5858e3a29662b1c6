"""skip_norm: residual Add + RMSNorm -> one com.microsoft::SkipSimplifiedLayerNormalization.

Every pre-norm RMSNorm block (Llama, Qwen, Mistral, Mixtral, DeepSeek, GPT-OSS) has

    s = a + b                      the residual sum, read by the norm and by the next residual
    y = γ ⊙ s / √(mean(s²) + ε) [+ β]

two kernels and two passes over s. ONNX Runtime's SkipSimplifiedLayerNormalization computes, per
row, the same s (written as its fourth output for the other readers) and y from it in one loop.
ORT's CPU session optimizer does not make it, so this pass writes it. LayerNorm blocks are not
matched: their SkipLayerNormalization measured slower than Add + LayerNormalization on ORT CPU
(`residual_sum` keeps them apart).

Exact up to rounding: the same sum a + b, the row mean square accumulated in one loop
(ReduceMean's summation order differs) and y = s / √(ms + ε) · γ, the quotient form
canonical_norm writes; a shift β stays an Add after it. Conditions: an RMSNorm over the last
axis found by `graph.norm_match` (the op or its decomposition) with a scale γ of the row width
(γ = 1 otherwise) whose input is an Add of two non-constant tensors of one shape, rank 2 or 3
(the kernel's condition), float32 or float16. Target: ORT only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.norm_match import Norm, find_norms
from ffnx.graph.opsets import MS_DOMAIN
from ffnx.graph.tensors import producer
from ffnx.passes.base import GraphPass, Match, PassContext


def _residual_add(n: Norm) -> gs.Node | None:
    add = producer(n.x, "Add")
    if add is None or len(add.inputs) != 2:
        return None
    return add if all(isinstance(t, gs.Variable) for t in add.inputs) else None


class SkipNorm(GraphPass):
    """Add(a, b) -> RMSNorm as one SkipSimplifiedLayerNormalization (the sum kept)."""

    name = "skip_norm"
    targets = ("ort",)

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for n in find_norms(graph):
            add = _residual_add(n) if n.kind == "rmsnorm" else None
            if add is not None:
                out.append(Match([add, *n.nodes], {"norm": n, "add": add}))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        n: Norm = m.info["norm"]
        a, b = m.info["add"].inputs
        sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
        if sa is None or sb is None or list(sa) != list(sb) or any(d is None for d in sa):
            return f"the residual operands' shapes {sa} and {sb} are not known to be equal"
        if len(sa) not in (2, 3):
            return f"rank {len(sa)} (the kernel takes rank 2 or 3)"
        width = sa[-1]
        if not isinstance(width, int):
            return "the row width is not static"
        for name, v in (("scale", n.gamma), ("shift", n.beta)):
            if v is not None and v.size != width:
                return f"the norm's {name} has {v.size} values for rows of {width}"
        dt = np.dtype(a.dtype) if a.dtype is not None else None
        if dt not in (np.float32, np.float16):
            return f"dtype {dt} (the kernel is float32 / float16)"
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        n: Norm = m.info["norm"]
        add, s = m.info["add"], n.x
        a, b = add.inputs
        dt = np.dtype(a.dtype)
        bld = Builder(graph, f"{n.y.name}/skip_norm")
        c = lambda v, hint: bld.const(v.reshape(-1).astype(dt), hint)  # noqa: E731
        gamma = n.gamma if n.gamma is not None else np.ones(a.shape[-1], dt)
        ins = [a, b, c(gamma, "gamma")]
        for node in [add, *n.nodes]:
            node.outputs.clear()
            node.inputs.clear()
        keep_sum = bool(s.outputs) or s in graph.outputs  # the residual stream goes on
        shift = n.beta is not None  # an RMSNorm with a shift: that stays an Add
        y = gs.Variable(bld.name("normed"), dtype=dt) if shift else n.y
        outs = [y, gs.Variable.empty(), gs.Variable.empty(), s if keep_sum else gs.Variable.empty()]
        bld.op("SkipSimplifiedLayerNormalization", *ins, outputs=outs, domain=MS_DOMAIN,
               epsilon=float(n.eps))  # fmt: skip
        if shift:
            bld.op("Add", y, c(n.beta, "beta"), outputs=[n.y])


PASS = SkipNorm()
