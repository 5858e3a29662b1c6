"""Fold the scale γ and bias β of a LayerNorm / RMSNorm into the linear layers that read it.

With n = normalise(x) (LayerNorm: (x − mean)/σ, RMSNorm: x/rms) and a norm output
y = n ⊙ γ + β read only by linears y·W_k + b_k ([in, out] weights W_k):

    (n ⊙ γ + β)·W_k + b_k = n·(diag(γ)·W_k) + (b_k + β·W_k)

so W_k' scales the rows of W_k by γ, b_k' = b_k + β·W_k, and the norm keeps γ = 1, β = 0.

Forms: the LayerNormalization op (opset ≥ 17; γ becomes a ones constant and the optional bias
is dropped), RMSNormalization (opset 23; γ ones), and decomposed norms as the exporter writes
them — ReduceMean/Sub/Pow/Add ε/Sqrt/Div (LayerNorm) or Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul
(hand-written RMSNorm) followed by Mul(γ) and/or Add(β): the Mul/Add nodes are removed. The
matcher is `norm_match.find_norms` (last-axis norms only). Readers: MatMul/Gemm with constant
2-D weights reading the norm output as their left operand (Gemm transA = 0).

Kept where a runtime fuses it: a decomposed norm that divides by Sqrt (LN or RMS, the form
ONNX Runtime fuses into LayerNormalization / SimplifiedLayerNormalization only when the γ Mul,
and for LN the β Add, follow) keeps γ (LN: is skipped); only an RMS form's β is folded. The
Reciprocal·Mul form (hand-written rsqrt) is not fused, so both are folded there.

Exact when every reader of the norm output is such a linear (up to float rounding; products in
float64, cast back to the weight's dtype). Skipped when any reader is something else (a
residual, attention scores), when the output is a graph output, when γ/β are not constants,
when γ = 1 and β = 0 already, or when folding a non-zero β would give more bias-less MatMuls a
new Add than the fold removes (for the LayerNormalization op nothing is removed, so its β is
folded only into readers that already have a bias). Each linear gets new weight constants, so
weights shared with other nodes are never changed in place.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.affine import Affine, consumers_reason, fold_before
from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import linear_at
from ffnx.graph.norm_match import Norm, find_norms
from ffnx.graph.tensors import const, producer, swap
from ffnx.passes.base import GraphPass, Match, PassContext


def _before(norm: Norm, ops: tuple[str, ...]) -> gs.Tensor | None:
    """The tensor before the trailing decomposed nodes `ops` (β "Add", then γ "Mul")."""
    t = norm.y
    for op in ops:
        p = producer(t, op)
        if p is None or not any(p is n for n in norm.nodes):
            return None
        t = next((i for i in p.inputs if const(i) is None), None)
        if t is None:
            return None
    return t


def _fused_by_ort(norm: Norm) -> bool:
    """Decomposed norms dividing by Sqrt (not Reciprocal·Mul): ONNX Runtime fuses them with the
    γ Mul (and, for LayerNorm, the β Add) into one (Simplified)LayerNormalization kernel."""
    return not norm.op and any(n.op == "Div" for n in norm.nodes)


def _new_bias_adds(readers: list[gs.Node], beta: np.ndarray, graph: gs.Graph) -> int:
    """MatMul readers without a bias Add, which folding a non-zero β would give one."""
    if not np.any(beta):
        return 0
    return sum(r.op == "MatMul" and linear_at(r, graph).bias is None for r in readers)


def _trivial(norm: Norm) -> bool:
    g_one = norm.gamma is None or np.all(norm.gamma == 1)
    b_zero = norm.beta is None or np.all(norm.beta == 0)
    return bool(g_one and b_zero)


class FoldNormAffine(GraphPass):
    """LayerNorm/RMSNorm γ, β -> folded into the linear layers reading the norm."""

    name = "fold_norm_affine"

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match(norm.nodes[-1:], {"norm": norm}) for norm in find_norms(graph)]

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        norm: Norm = m.info["norm"]
        if _trivial(norm):
            return "γ = 1 and β = 0 already"
        fold_gamma = norm.gamma is not None and not _fused_by_ort(norm)
        if _fused_by_ort(norm) and (norm.kind == "layernorm" or norm.beta is None):
            return ("ONNX Runtime fuses this decomposed norm with its affine (its γ Mul must "
                    "stay for the fusion)")  # fmt: skip
        c = norm.y.shape[-1] if norm.y.shape else None
        size = next(v.size for v in (norm.gamma, norm.beta) if v is not None)
        if isinstance(c, int) and c != size or size == 1 and not isinstance(c, int):
            return "γ/β do not match the normalised width"
        c = c if isinstance(c, int) else size
        gamma = np.broadcast_to(norm.gamma, (c,)) if fold_gamma else np.ones(c)
        beta = np.zeros(c) if norm.beta is None else np.broadcast_to(norm.beta, (c,))
        a = Affine(norm.y, norm.y, gamma.astype(np.float64), beta.astype(np.float64), -1, None,
                   [], norm.y.dtype)  # fmt: skip
        reason = consumers_reason(a, graph)
        if reason:
            return reason
        removed = 0 if norm.op else fold_gamma + (norm.beta is not None)
        added = _new_bias_adds(list(norm.y.outputs), beta, graph)
        if added > removed:
            return (f"folding β would add {added} bias Add(s) to linears without bias and remove "
                    f"{removed} node(s)")  # fmt: skip
        if not norm.op:
            ops = ("Add",) * (norm.beta is not None) + ("Mul",) * fold_gamma
            pre = _before(norm, ops)
            if pre is None:
                return "cannot locate the γ/β nodes of the decomposed norm"
            m.info["pre"] = pre
        m.info.update(affine=a, readers=list(norm.y.outputs))
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        norm, a, b = m.info["norm"], m.info["affine"], Builder(graph, self.name)
        cache: dict = {}
        for reader in m.info["readers"]:
            fold_before(graph, b, a, reader, cache)  # reader reads a.x = norm.y with W', b'
        if norm.op:
            n = norm.nodes[0]
            n.inputs[1] = b.const(np.ones(a.channels, const(n.inputs[1]).dtype), "ones")
            if len(n.inputs) > 2:
                n.inputs.pop(2)
            return
        pre = m.info["pre"]
        for reader in m.info["readers"]:
            swap(reader.inputs, norm.y, pre)


PASS = FoldNormAffine()
