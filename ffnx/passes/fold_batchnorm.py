"""Fold inference BatchNormalization into a neighbouring linear layer, else into one Mul+Add.

At inference BN is a per-channel affine map: BN(x) = x·s + t with s = γ/σ, t = β − μ·s and
σ = sqrt(var + ε). Forms of the BN (its "channel view"):
- BN on (N, C, ...) with channel axis 1 (Conv nets; rank 2 = (N, C) is the last axis);
- Transpose(perm=[0, 2, 1]) → BN → Transpose([0, 2, 1]) on (B, T, C): torch's BatchNorm1d on
  tokens (TokenBatchNorm, SLAB's PRepBN) — a last-axis affine;
- Reshape(x, [-1, C]) → BN → Reshape back to x's shape (RePaFFN's BN over hidden channels) —
  a last-axis affine; the back Reshape must provably restore x's shape.

Rewrites, in order of preference:
1. after a linear (Conv, Gemm, MatMul [+ bias Add]) whose output only the BN reads:
   W' = W·s (output channels), b' = (b − μ)·γ/σ + β = b·s + t;
2. before exactly one linear reading the BN output over the axis it contracts (MatMul/Gemm:
   the last axis of a last-axis BN; Conv: channel axis 1): y = W(s ⊙ x + t) + b gives
   W' = W·diag(s), b' = b + W·t (for Conv, t summed over the kernel window);
3. otherwise one Mul(x, s) + Add(·, t), constants broadcast on the channel axis ([C] for the
   last axis, [C, 1, ...] for axis 1). `fold_prepbn` then folds such an affine into several
   linears when they are its only readers.

Exact up to float rounding (folding runs in float64, cast back to the weight's dtype), given:
BN in inference mode (training_mode = 0, mean/var outputs unread), all BN parameters and
weights constant (initializers or Constant nodes, never graph inputs), the folded linear's
intermediate outputs read by nothing else. Before a Conv, folding is exact only without
padding: a zero-padded border sees 0, not t, so the border outputs would change — such sites
are skipped with that reason. Folded weights are new constants; a weight shared with another
node is never changed in place.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ffnx.graph.affine import (
    bn_affine,
    consumers_reason,
    detach,
    fold_after,
    fold_before,
    producer_linear,
    to_mul_add,
)
from ffnx.graph.builder import Builder
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult


class FoldBatchNorm(GraphPass):
    """BatchNormalization (inference) -> folded into a neighbouring linear, else Mul+Add."""

    name = "fold_batchnorm"

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match([n]) for n in graph.nodes if n.op == "BatchNormalization"]

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        if not m.nodes[0].outputs:
            return "removed by an earlier rewrite"
        a = bn_affine(m.nodes[0], graph)
        if isinstance(a, str):
            return a
        nodes, why_not_after = producer_linear(a, graph)
        if not why_not_after:
            m.info.update(affine=a, how="after", linear=nodes)
            return None
        readers = list(a.y.outputs)
        why = consumers_reason(a, graph) if len(readers) == 1 else f"read by {len(readers)} nodes"
        if not why:
            m.info.update(affine=a, how="before", linear=readers)
            return None
        if a.axis == 1 and a.rank is None:
            return "input rank unknown: cannot broadcast a per-channel Mul/Add"
        m.info.update(affine=a, how="mul_add", why=f"after: {why_not_after}; before: {why}")
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        a, how, b = m.info["affine"], m.info["how"], Builder(graph, self.name)
        if how == "after":
            fold_after(b, a, m.info["linear"])
        elif how == "before":
            fold_before(graph, b, a, m.info["linear"][0])
            detach(a)
        else:
            to_mul_add(b, a)

    def note(self, res: PassResult, m: Match) -> None:
        how = m.info["how"]
        res.notes[how] = res.notes.get(how, 0) + 1
        if how == "mul_add":
            res.notes.setdefault("mul_add_why", []).append(f"{m.describe()}: {m.info['why']}")


PASS = FoldBatchNorm()
