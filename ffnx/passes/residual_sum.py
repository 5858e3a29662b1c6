"""The residual Add before a LayerNormalization written as Sum: ONNX Runtime CPU then keeps
Add + LayerNormalization instead of fusing them into its slower SkipLayerNormalization.

Pattern: h = a + b (Add of two computed tensors, no constant operand) read by a
LayerNormalization: a transformer's residual connection and its post-/pre-norm.
Rewrite: h = Sum(a, b); every reader of h reads the Sum.

Why: ORT's SkipLayerNormFusion (level 2, always on) turns Add(MatMul + bias, residual) +
LayerNormalization into one SkipLayerNormalization kernel; on ORT 1.32 CPU that kernel took
13-15 % of all kernel time of all-MiniLM-L6-v2 at 8 x 128 where the bias Add + Add +
LayerNormalization it replaces took 2-5 % (ORT profiler, two runs each; docs/encoders.md), and
the model ran 1.07-1.15x faster end to end with this pass (under load, 2 threads). The fusion
matches Add only, so Sum keeps the three kernels. TensorRT does not need it (ORT target only);
`speed_guard` drops the pass wherever it does not time faster.

Exact: Sum of two tensors is one IEEE addition per element, the same as Add (bit-identical, with
the same broadcasting). Conditions: both inputs computed (not constants: a constant operand is a
bias, which SkipLayerNormalization does not take on its own) and of one dtype.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ffnx.graph.tensors import const
from ffnx.passes.base import GraphPass, Match, PassContext


class ResidualSum(GraphPass):
    """Residual Add read by a LayerNormalization -> Sum (ORT CPU keeps Add + LayerNorm)."""

    name = "residual_sum"
    targets = ("ort",)

    def match(self, graph: gs.Graph) -> list[Match]:
        out, seen = [], set()
        for ln in [n for n in graph.nodes if n.op == "LayerNormalization"]:
            src = ln.inputs[0]
            add = src.inputs[0] if len(src.inputs) == 1 else None
            if add is not None and add.op == "Add" and id(add) not in seen:
                seen.add(id(add))
                out.append(Match([add, ln]))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        add = m.nodes[0]
        if len(add.inputs) != 2 or any(const(t) is not None for t in add.inputs):
            return "an operand is a constant (a bias Add, not a residual connection)"
        dtypes = {t.dtype for t in add.inputs}
        if len(dtypes) != 1 or None in dtypes:
            return "operand dtypes differ or are unknown"
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        m.nodes[0].op = "Sum"


PASS = ResidualSum()
