"""Standard-ONNX lowerings of the routed experts: each maps (x [T, D], idx [T, k], w [T, k]) to
y [T, D] = sum_j w[t, j] * FFN_{idx[t, j]}(x[t]).

sorted  Group the T*k (token, slot) pairs by expert (TopK as a sort), gather the tokens once,
        Split them by the per-expert counts, fc1 per expert (Gemm on the expert's own weight
        initializer: an expert without tokens costs a node launch, not a weight read), Concat,
        the activation once for all rows, Split, fc2 per expert, Concat, scale by w, un-permute
        with one Gather and sum over the k slots. Reads only the active experts' weights and
        does exactly the routed FLOPs; 2 Gemm nodes per expert plus ~20.
per_expert  The same grouping, then each expert's whole FFN on its rows (gate and up as two
        Gemms, activation, fc2) and one Concat of the [N, D] outputs: no [N, 2H] Concat and
        Splits (at T=256 on the base layer that is ~35 MB of copies per call), but ~6 nodes per
        expert instead of 2.
gather  Gather the k selected experts' weights per token, [T, k, H1, D], and multiply as a batch
        of GEMVs (W @ x). Few nodes whatever E, but the gathered copy costs twice the weight
        bytes per token: for very many experts at T=1 only.
dense   Every expert on every token as one wide dense FFN: x @ [D, E*H1], act, scale each
        expert's hidden slice by its routing weight (0 when not selected), @ [E*H, D] (the sum over
        experts is the GEMM's reduction). E/k times the routed FLOPs, but two big prepacked
        GEMMs: small E*H at large T.
"""

from __future__ import annotations

import numpy as np

from ffnx.graph.builder import Builder, i64
from ffnx.lowering.moe_common import MoESite, activate, gated_act, plain_act


def sorted_experts(b: Builder, s: MoESite, x, idx, w, linear=None):
    """`linear(b, s, rows, "fc1"|"fc2", e)` computes one expert projection (default: Gemm)."""
    xs, ws, counts, perm = _group(b, s, x, idx, w)
    lin = linear or gemm_linear
    h = _per_expert(b, s, xs, counts, "fc1", lin)
    h = activate(b, h, s.activation, axis=1, H=s.H, attrs=s.attrs)  # once for all experts' rows
    return _ungroup(b, s, _per_expert(b, s, h, counts, "fc2", lin), ws, perm)


def per_expert(b: Builder, s: MoESite, x, idx, w):
    """`sorted`'s grouping, then each expert's whole FFN on its own rows: gate and up as two
    Gemms (no Split of a [N, 2H] activation), the activation, fc2; only the [N, D] outputs are
    concatenated. 3 Gemms + the activation's nodes per expert: fewer bytes moved than `sorted`
    at large T, more node launches at small T."""
    xs, ws, counts, perm = _group(b, s, x, idx, w)
    rows = b.op("Split", xs, counts, axis=0, n_out=s.E) if s.E > 1 else [xs]
    ys = [_expert_ffn(b, s, rows[e], e) for e in range(s.E)]
    y = b.op("Concat", *ys, axis=0) if s.E > 1 else ys[0]
    return _ungroup(b, s, y, ws, perm)


def _expert_ffn(b: Builder, s: MoESite, rows, e: int):
    def fc1(lo: int, hi: int):
        w = _expert_param(b, s, "fc1_weight", e, (lo, hi))
        return b.op("Gemm", rows, w, _expert_param(b, s, "fc1_bias", e, (lo, hi)), transB=1)

    if s.gated:
        h = gated_act(b, fc1(0, s.H), fc1(s.H, 2 * s.H), s.activation, s.attrs)
    else:
        h = plain_act(b, fc1(0, s.H1), s.activation)
    w2, b2 = _expert_param(b, s, "fc2_weight", e), _expert_param(b, s, "fc2_bias", e)
    return b.op("Gemm", h, w2, b2, transB=1)


def _group(b: Builder, s: MoESite, x, idx, w):
    """The T*k (token, slot) pairs grouped by expert (TopK as a sort): xs [N, D] the tokens in
    that order, ws [N, 1] their routing weights, counts [E] rows per expert, perm the order."""
    flat_e = b.reshape(idx, -1)
    _, perm = b.op("TopK", flat_e, b.op("Shape", flat_e), axis=0, largest=0, sorted=1, n_out=2)
    xs = b.op("Gather", x, b.op("Div", perm, i64(s.k)), axis=0)
    ws = b.op("Gather", b.reshape(w, -1, 1), perm, axis=0)
    hits = b.op("Equal", b.unsqueeze(flat_e, 1), np.arange(s.E, dtype=np.int64).reshape(1, s.E))
    counts = b.reduce_sum(b.op("Cast", hits, to=7), 0)  # some 0
    return xs, ws, counts, perm


def _ungroup(b: Builder, s: MoESite, y, ws, perm):
    """sum over the k slots of ws * y, y [N, D] in `_group`'s order, back in token order."""
    _, inv = b.op("TopK", perm, b.op("Shape", perm), axis=0, largest=0, sorted=1, n_out=2)
    y = b.reshape(b.op("Gather", b.mul(y, ws), inv, axis=0), -1, s.k, s.D)
    return b.reduce_sum(y, 1)


def _per_expert(b: Builder, s: MoESite, rows, counts, fc: str, linear):
    """Concat_e linear_e(rows_e): rows [N, *] grouped by expert, counts[e] rows each."""
    if s.E == 1:
        return linear(b, s, rows, fc, 0)
    parts = b.op("Split", rows, counts, axis=0, n_out=s.E)
    return b.op("Concat", *(linear(b, s, parts[e], fc, e) for e in range(s.E)), axis=0)


def gemm_linear(b: Builder, s: MoESite, rows, fc: str, e: int):
    """rows @ W_e.T + b_e with Gemm(transB) on expert e's own weight initializer."""
    w, bias = _expert_param(b, s, f"{fc}_weight", e), _expert_param(b, s, f"{fc}_bias", e)
    return b.op("Gemm", rows, w, bias, transB=1)


def _expert_param(b: Builder, s: MoESite, name: str, e: int, rows: tuple | None = None):
    """Expert e's slice of a stacked input (rows lo:hi of it with `rows`), None if absent."""
    if s.inputs[name] is None:
        return None
    lo, hi = rows or (0, None)
    v = s.value(name)
    if v is not None:
        # a copy: a view would keep the whole stacked [E, ...] array alive per expert
        return s.constant(b, (name, e, lo, hi), lambda: v[e, lo:hi].copy(), f"{name}{e}")
    t = b.op("Gather", s.tensor(b, name), i64(e).reshape(()), axis=0)
    return t if rows is None else b.op("Slice", t, i64(lo), i64(hi), i64(0))


def gather_weights(b: Builder, s: MoESite, x, idx, w):
    k, D = s.k, s.D
    fc1, fc2 = s.tensor(b, "fc1_weight"), s.tensor(b, "fc2_weight")
    xc = b.reshape(x, -1, 1, D, 1)
    h = b.matmul(b.op("Gather", fc1, idx, axis=0), xc)  # [T, k, H1, 1]
    h = b.add(h, _gathered_bias(b, s, "fc1_bias", idx))
    h = activate(b, h, s.activation, axis=2, H=s.H, attrs=s.attrs)
    y = b.matmul(b.op("Gather", fc2, idx, axis=0), h)  # [T, k, D, 1]
    y = b.add(y, _gathered_bias(b, s, "fc2_bias", idx))
    y = b.mul(y, b.reshape(w, -1, k, 1, 1))
    return b.reshape(b.reduce_sum(y, 1), -1, D)


def _gathered_bias(b: Builder, s: MoESite, name: str, idx):
    bias = s.tensor(b, name)
    return None if bias is None else b.unsqueeze(b.op("Gather", bias, idx, axis=0), 3)


def dense_experts(b: Builder, s: MoESite, x, idx, w):
    E, H1, H, D = s.E, s.H1, s.H, s.D
    hits = b.op("Equal", b.unsqueeze(idx, 2), np.arange(E, dtype=np.int64).reshape(1, 1, E))
    g = b.reduce_sum(b.mul(b.op("Cast", hits, to=1), b.unsqueeze(w, 2)), 1)  # [T, E] dense weights
    h = b.matmul(x, _wide(b, s, "fc1_weight", (2, 0, 1), (D, E * H1)))
    if s.inputs["fc1_bias"] is not None:
        h = b.add(h, b.reshape(s.tensor(b, "fc1_bias"), -1))
    h = activate(b, b.reshape(h, -1, E, H1), s.activation, axis=2, H=H, attrs=s.attrs)
    h = b.reshape(b.mul(h, b.unsqueeze(g, 2)), -1, E * H)
    y = b.matmul(h, _wide(b, s, "fc2_weight", (0, 2, 1), (E * H, D)))
    if s.inputs["fc2_bias"] is not None:
        y = b.add(y, b.matmul(g, s.tensor(b, "fc2_bias")))
    return y


def _wide(b: Builder, s: MoESite, name: str, perm: tuple, shape: tuple):
    """The stacked weight transposed by `perm` and reshaped to one 2-D GEMM operand."""
    v = s.value(name)
    if v is not None:
        return s.constant(b, ("wide", name, perm, shape), lambda: np.ascontiguousarray(
            v.transpose(perm)).reshape(shape), f"{name}_wide")  # fmt: skip
    return b.reshape(b.op("Transpose", s.tensor(b, name), perm=list(perm)), *shape)


FORMS = {
    "sorted": sorted_experts,
    "per_expert": per_expert,
    "gather": gather_weights,
    "dense": dense_experts,
}
