"""Fold a token BatchNorm (SLAB's PRepBN at inference) into every linear layer that reads it.

SLAB (Guo et al. 2024) replaces LayerNorm by PRepBN, which at inference is a BatchNorm over the
channels of (B, T, C) tokens: a per-channel affine n(x) = x·s + t (s = γ/σ, t = β − μ·s). When
the norm's output feeds only linear layers — attention's q/k/v projections, an FFN's fc1 or its
gate and up projections — each linear absorbs it and the norm disappears:

    n(x)·W_k + b_k = x·(diag(s)·W_k) + (b_k + t·W_k)   for every reader k.

Forms matched (the affine's readers are all MatMul/Gemm with constant 2-D weights reading it as
their left operand, or Conv over channel axis 1 without padding):
- Transpose([0, 2, 1]) → BatchNormalization → Transpose([0, 2, 1]) (torch BatchNorm1d on
  tokens), Reshape([-1, C]) → BN → Reshape back, or BN on (N, C);
- Mul(x, s) [→ Add(·, t)] with constant vectors broadcast on the last axis, which is what
  `fold_batchnorm` leaves when a BN has several readers. A Mul that is the γ of a
  LayerNorm/RMSNorm is left to `fold_norm_affine`.

Relation to `fold_batchnorm`: that pass folds a BN into a single neighbouring linear (the
producer, or the only reader); a BN read by several linears becomes Mul+Add there, and this pass
folds it into all of them (fan-out), leaving nothing of the norm.

Exact up to float rounding (float64 folding): every reader is linear in the affine's output
over the channel axis. Not exact — skipped — when any reader is not such a linear (e.g. the
residual also reads the normalised tensor), when the output is a graph output, or when a weight
is not constant. Each reader gets new weight constants (shared weights are never changed in
place).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ffnx.graph.affine import (
    Affine,
    bn_affine,
    consumers_reason,
    detach,
    fconst,
    fold_before,
    mul_add_affine,
)
from ffnx.graph.builder import Builder
from ffnx.graph.norm_match import find_norms
from ffnx.passes.base import GraphPass, Match, PassContext

LINEAR_OPS = ("MatMul", "Gemm", "Conv")


def _reads_linearly(t: gs.Tensor) -> bool:
    return bool(t.outputs) and all(c.op in LINEAR_OPS for c in t.outputs)


def affine_at(n: gs.Node, graph: gs.Graph) -> Affine | str | None:
    """The per-channel affine starting at BatchNormalization / Mul node `n` (None: not one)."""
    if n.op == "BatchNormalization":
        return bn_affine(n, graph)
    if n.op == "Mul":
        return mul_add_affine(n, graph)
    return None


def _tail(n: gs.Node) -> gs.Tensor:
    """Where a candidate affine ends, judged structurally (for matching only)."""
    y = n.outputs[0]
    nxt = y.outputs[0] if len(y.outputs) == 1 else None
    continues = ("Add",) if n.op == "Mul" else ("Transpose", "Reshape")
    return nxt.outputs[0] if nxt is not None and nxt.op in continues else y


class FoldPRepBN(GraphPass):
    """Token BatchNorm / per-channel Mul+Add read only by linears -> folded into all of them."""

    name = "fold_prepbn"

    def match(self, graph: gs.Graph) -> list[Match]:
        out, in_norms = [], None
        for n in graph.nodes:
            if n.op == "BatchNormalization" or (
                n.op == "Mul" and sum(fconst(t) is not None for t in n.inputs) == 1
            ):
                if not _reads_linearly(_tail(n)):
                    continue
                if in_norms is None:
                    in_norms = {id(k) for norm in find_norms(graph) for k in norm.nodes}
                out.append(Match([n], {"norm_gamma": id(n) in in_norms}))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        n = m.nodes[0]
        if not n.outputs:
            return "removed by an earlier rewrite"
        if m.info["norm_gamma"]:
            return "γ of a LayerNorm/RMSNorm (left to fold_norm_affine)"
        a = affine_at(n, graph)
        if a is None:
            return "not a per-channel affine (constant is not a channel vector)"
        if isinstance(a, str):
            return a
        reason = consumers_reason(a, graph)
        if reason:
            return reason
        m.info.update(affine=a, readers=list(a.y.outputs))
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        a, b = m.info["affine"], Builder(graph, self.name)
        cache: dict = {}
        for reader in m.info["readers"]:
            fold_before(graph, b, a, reader, cache)
        detach(a)


PASS = FoldPRepBN()
