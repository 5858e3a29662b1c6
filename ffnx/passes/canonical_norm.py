"""Write decomposed RMSNorm/LayerNorm in the form ONNX Runtime runs as one kernel.

torch exports `x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)` (the RMSNorm of Llama,
Qwen, Mistral, Gemma, T5 …, also the per-head q/k norms of Qwen3) as

    y = γ · (x · Reciprocal(√(mean(x²) + ε)))       Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul

and ONNX Runtime's (Simplified)LayerNormFusion only matches the quotient form x / √(…): the seven
element-wise kernels stay, for every norm of every token (4 per layer in Qwen3, ~45 % of a decode
step's kernels). This pass rebuilds each such norm with the one graph builder (`Builder.norm`):
the ONNX op where the opset has it (LayerNormalization ≥ 17, RMSNormalization ≥ 23), else

    y = (x / √(mean(x²) + ε)) · γ [+ β]              (LayerNorm: x − mean(x) first)

which ORT fuses into one SimplifiedLayerNormalization / LayerNormalization kernel.

Exact up to rounding: x · (1/s) and x / s differ by one rounding of 1/s (≤ 1 ulp relative);
half-precision norms are computed in float32 (as LayerNormalization's stash_type = 1), i.e.
more accurately than the exported graph. Matched: last-axis norms found by
`graph.norm_match` whose decomposition contains a Reciprocal (what ORT leaves unfused); a norm
already in the quotient form or a single op is left as it is. A norm without a scale gets
γ = 1 when its width is known (ORT fuses the quotient form only with its scale Mul).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.norm_match import Norm, find_norms
from ffnx.passes.base import GraphPass, Match, PassContext


def _dtype(n: Norm) -> np.dtype:
    """The norm's element type: its input's, else its scale's, else float32."""
    if isinstance(n.x, gs.Variable) and n.x.dtype is not None:
        return np.dtype(n.x.dtype)
    return np.dtype(n.gamma.dtype) if n.gamma is not None else np.dtype(np.float32)


class CanonicalNorm(GraphPass):
    """x·Reciprocal(√(mean(x²)+ε))·γ norms rewritten in the form ORT fuses into one kernel."""

    name = "canonical_norm"
    targets = ("ort",)  # measured on ONNX Runtime (TensorRT has its own normalization fusion)

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match(n.nodes, {"norm": n}) for n in find_norms(graph)
                if not n.op and any(node.op == "Reciprocal" for node in n.nodes)]  # fmt: skip

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        dt = _dtype(m.info["norm"])
        if dt.kind != "f":
            return f"element type {dt} is not floating point"
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        n: Norm = m.info["norm"]
        for node in n.nodes:
            node.outputs.clear()
        gamma, dt = n.gamma, _dtype(n)
        width = n.x.shape[-1] if isinstance(n.x, gs.Variable) and n.x.shape else None
        if gamma is None and isinstance(width, int):
            gamma = np.ones(width, dt)  # x·1: ORT fuses a norm only with its scale Mul
        b = Builder(graph, self.name)
        b.redirect(b.norm(n.kind, n.x, n.eps, gamma, n.beta, dt), n.y)


PASS = CanonicalNorm()
