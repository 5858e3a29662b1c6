"""Merge FFNs that read the same input and whose outputs are summed into one wide FFN.

Pattern: a sum s = t₁ + t₂ + … (a tree of Adds, e.g. x + FFNa(x) + FFNb(x)) in which two or
more terms are FFN outputs FFNᵢ(x) = act(x·W1ᵢ + b1ᵢ)·W2ᵢ + b2ᵢ (gated: act(x·Wgᵢ + bgᵢ) ⊙
(x·Wuᵢ + buᵢ)) with the same activation, the same gating and the same input x. This covers a
shared expert beside a dense FFN, multi-branch FFNs, and the output of `ffn_fusion`.

Rewrite: one FFN with W1 = [W1a | W1b], b1 = [b1a ; b1b], W2 = [W2a ; W2b], b2 = b2a + b2b
(gated: Wg and Wu concatenated the same way), then s = FFN(x) + the other terms.

Exact: the hidden units of the wide FFN are those of the branches side by side, and the down
projection of the concatenated hidden is the sum of the branch projections (up to the order of
float additions). Inputs that are LayerNorm/RMSNorm of the same tensor with different affine
parameters count as the same input: each branch's γ, β are folded into its first projections
(W' = diag(γ)·W, b' = β·W + b) and the merged FFN reads one affine-free norm, again exact up to
float rounding. Conditions: constant weights of one dtype; every FFN's intermediates are read
only inside it and its output only by the sum.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.algebra import is_sum_root, sum_terms
from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import FFN, find_ffns, node_set
from ffnx.graph.norm_match import find_norms
from ffnx.passes.base import GraphPass, Match, PassContext


class FuseParallelFFN(GraphPass):
    """FFNs on the same input whose outputs are summed -> one wide FFN."""

    name = "fuse_parallel_ffn"
    iterate = True  # each merge changes the sums and FFNs the next one sees

    def match(self, graph: gs.Graph) -> list[Match]:
        ffns = {id(f.y): f for f in find_ffns(graph)}
        norms = {id(n.y): n for n in find_norms(graph) if n.kind in ("layernorm", "rmsnorm")}
        out = []
        for root in [n for n in graph.nodes if is_sum_root(n, graph)]:
            terms, adds = sum_terms(root, graph)
            groups: dict[tuple, list[FFN]] = {}
            for t in terms:
                f = ffns.get(id(t))
                if f is not None:
                    groups.setdefault(self._key(f, norms), []).append(f)
            for key, fs in groups.items():
                if len(fs) > 1:
                    info = {"root": root, "terms": terms, "adds": adds, "ffns": fs, "key": key}
                    out.append(Match([root] + [f.fc2.nodes[0] for f in fs], info))
        return out

    @staticmethod
    def _key(f: FFN, norms: dict) -> tuple:
        n = norms.get(id(f.x))
        src = ("norm", n.kind, id(n.x), n.eps) if n is not None else ("tensor", id(f.x))
        return (f.kind, f.gated, str(f.fc1.weight.dtype), src)

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        fs = m.info["ffns"]
        for f in fs:
            reason = f.check_internal(graph)
            if reason:
                return reason
            if len(f.y.outputs) != 1 or f.y in graph.outputs:
                return f"FFN output {f.y.name} is read outside the sum"
        kinds = {(f.fc1.weight.shape[0], f.fc2.width) for f in fs}
        if len(kinds) != 1:
            return "FFN input/output widths differ"
        shared = [id(n) for f in fs for n in f.nodes]
        if len(shared) != len(set(shared)):
            return "FFNs share nodes"
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        fs: list[FFN] = m.info["ffns"]
        b = Builder(graph, self.name)
        src, folded = self._source(b, fs, graph)
        dt = fs[0].fc1.weight.dtype
        w1 = np.concatenate([w for w, _, _, _ in folded], axis=1).astype(dt)
        b1 = self._concat_bias([(bb, f.fc1.width) for (_, bb, _, _), f in zip(folded, fs)], dt)
        w2 = np.concatenate([f.fc2.weight for f in fs], axis=0)
        b2 = sum(f.fc2.bias.astype(np.float64) for f in fs if f.fc2.bias is not None)
        b2 = None if isinstance(b2, int) else b2.astype(dt)
        if fs[0].gated:
            wu = np.concatenate([wu for _, _, wu, _ in folded], axis=1).astype(dt)
            bu = self._concat_bias([(bb, f.up.width) for (_, _, _, bb), f in zip(folded, fs)], dt)
            if all(f.fc1.fused for f in fs):  # keep the fuse_gate_up form
                h = b.linear(src, np.concatenate([w1, wu], 1), self._cat(b1, bu, w1, wu, dt))
                sizes = b.const(np.array([w1.shape[1], wu.shape[1]], np.int64), "split")
                g, u = b.op("Split", h, sizes, axis=-1, n_out=2)
            else:
                g, u = b.linear(src, w1, b1), b.linear(src, wu, bu)
            h = b.op("Mul", b.activation(fs[0].kind, g, dt), u)
        else:
            h = b.activation(fs[0].kind, b.linear(src, w1, b1), dt)
        self._replace_sum(b, m, fs, h, w2, b2)

    def _source(self, b: Builder, fs: list[FFN], graph: gs.Graph):
        """The tensor the merged FFN reads and, per branch, (W1, b1, Wu, bu) with the branch's
        norm affine folded in when the branches read differently-scaled norms of one tensor."""
        plain = [
            (f.fc1.weight, f.fc1.bias, *((f.up.weight, f.up.bias) if f.gated else (0, 0)))
            for f in fs
        ]
        if all(f.x is fs[0].x for f in fs):
            return fs[0].x, plain
        norms = {id(n.y): n for n in find_norms(graph)}
        ns = [norms[id(f.x)] for f in fs]
        same = all(_eq(n.gamma, ns[0].gamma) and _eq(n.beta, ns[0].beta) for n in ns)
        if same:
            return fs[0].x, plain
        dt = fs[0].fc1.weight.dtype
        width = fs[0].fc1.weight.shape[0]
        src = b.norm(ns[0].kind, ns[0].x, ns[0].eps, np.ones(width, dt), None, dt)
        folded = []
        for f, n in zip(fs, ns):
            w1, b1 = _fold(f.fc1.weight, f.fc1.bias, n.gamma, n.beta)
            wu, bu = _fold(f.up.weight, f.up.bias, n.gamma, n.beta) if f.gated else (0, 0)
            folded.append((w1, b1, wu, bu))
        return src, folded

    @staticmethod
    def _concat_bias(parts, dt) -> np.ndarray | None:
        if all(p is None for p, _ in parts):
            return None
        return np.concatenate([p if p is not None else np.zeros(n) for p, n in parts]).astype(dt)

    @staticmethod
    def _cat(b1, bu, w1, wu, dt):
        if b1 is None and bu is None:
            return None
        b1 = b1 if b1 is not None else np.zeros(w1.shape[1], dt)
        bu = bu if bu is not None else np.zeros(wu.shape[1], dt)
        return np.concatenate([b1, bu]).astype(dt)

    @staticmethod
    def _replace_sum(b: Builder, m: Match, fs: list[FFN], h, w2, b2) -> None:
        root, merged = m.info["root"], node_set(f.fc2.nodes[-1] for f in fs)
        others = [t for t in m.info["terms"] if not (t.inputs and id(t.inputs[0]) in merged)]
        out = root.outputs[0]
        root.outputs.clear()
        if not others:
            b.linear(h, w2, b2, out=[out])
            return
        s = b.linear(h, w2, b2)
        for i, t in enumerate(others):
            s = b.op("Add", s, t, outputs=[out] if i == len(others) - 1 else None)


def _eq(a: np.ndarray | None, c: np.ndarray | None) -> bool:
    if a is None or c is None:
        return a is None and c is None
    return a.shape == c.shape and bool(np.array_equal(a, c))


def _fold(w: np.ndarray, bias, gamma, beta) -> tuple[np.ndarray, np.ndarray | None]:
    """(diag(γ)·W, β·W + b) in float64."""
    w64 = w.astype(np.float64)
    wf = w64 * gamma.astype(np.float64)[:, None] if gamma is not None else w64
    if beta is None:
        return wf, bias
    bf = beta.astype(np.float64) @ w64 + (bias.astype(np.float64) if bias is not None else 0.0)
    return wf, bf


PASS = FuseParallelFFN()
