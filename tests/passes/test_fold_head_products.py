"""fold_head_products: MLA's per-head products (W_uk on the query, W_uv before o_proj) folded into
the linear beside them where that stores fewer bytes; left alone where it would store more."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

from .helpers import (
    apply,
    check_applied,
    check_unchanged,
    export,
    feeds_of,
    op_counts,
    rand,
    skip_reasons,
)

NAME = "fold_head_products"
K, H, N, P, R, V = 32, 4, 8, 4, 16, 8  # width, heads, nope, rope, latent, value widths
FEEDS = feeds_of(rand(2, 3, K, seed=1), rand(1, 5, K, seed=2))
INT4 = {"bytes_per_weight": 0.625}  # `quantize_linears`' int4: 4 bits + a fp32 scale per 32


class AbsorbedHeads(nn.Module):
    """The absorbed MLA attention's shape: q = x·Wq viewed [B, S, H, N + P], heads first, split
    [N, P]; the nope part through U [H, N, R] meets the latents c; the [B, H, S, R] result goes
    through V [H, R, Vd], back to [B, S, H*Vd] and o_proj. `sibling`: q and the latents come
    from one merged linear (what fuse_sibling_linears leaves)."""

    def __init__(self, bias: bool = False, sibling: bool = False, reuse: bool = False):
        super().__init__()
        self.q = nn.Linear(K, H * (N + P), bias=bias)
        self.kv = nn.Linear(K, R, bias=False)
        self.u = nn.Parameter(torch.randn(H, N, R) * N**-0.5)
        self.v = nn.Parameter(torch.randn(H, R, V) * R**-0.5)
        self.o = nn.Linear(H * V, K, bias=bias)
        self.sibling, self.reuse = sibling, reuse

    def forward(self, x):
        b, s, _ = x.shape
        if self.sibling:
            w = torch.cat([self.q.weight, self.kv.weight])
            q, c = torch.split(x @ w.T, [H * (N + P), R], dim=-1)
        else:
            q, c = self.q(x), self.kv(x)
        q = q.view(b, s, H, N + P).transpose(1, 2)
        q_nope, q_rot = torch.split(q, [N, P], dim=-1)
        lat = q_nope @ self.u  # [B, H, S, R]
        c = c.unsqueeze(1)  # [B, 1, S, R]
        a = torch.softmax(lat @ c.transpose(-1, -2), -1) @ c
        out = (a @ self.v).transpose(1, 2).reshape(b, s, H * V)
        y = self.o(out) + q_rot.sum(1).sum(-1, keepdim=True)
        return y + q_nope.sum() if self.reuse else y


def _export(**kw):
    """Exported with dynamic batch and sequence; static_reshape then writes the views' shapes
    as constants (as the pipeline does before this pass)."""
    torch.manual_seed(0)
    m = export(AbsorbedHeads(**kw), torch.randn(2, 3, K), dynamic={"x": {0: "b", 1: "t"}})
    return apply("static_reshape", m, FEEDS)[0]


@pytest.fixture(scope="module")
def heads():
    return _export()


def _batched(m) -> int:
    g = gs.import_onnx(m)
    return sum(n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant)
               and len(n.inputs[1].shape) == 3 for n in g.nodes)  # fmt: skip


def test_int4_storage_folds_both_products(heads):
    assert _batched(heads) == 2
    new, rep = check_applied(NAME, heads, FEEDS, n_applied=2, rtol=1e-5, atol=1e-5, options=INT4)
    assert _batched(new) == 0
    assert op_counts(new)["MatMul"] == op_counts(heads)["MatMul"] - 2
    widths = sorted(n.inputs[1].shape[1] for n in gs.import_onnx(new).nodes
                    if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))  # fmt: skip
    assert widths == [R, K, H * (R + P)]  # kv, o_proj [H*R, K], q [K, H*(R + P)]


def test_fp32_storage_keeps_products_that_would_grow(heads):
    rep = check_unchanged(NAME, heads, FEEDS)
    assert rep["matches"] == 2
    assert "would store" in skip_reasons(rep)


@pytest.mark.parametrize("kw", [dict(bias=True), dict(sibling=True)])
def test_biased_and_sibling_merged_projections_fold(kw):
    m = _export(**kw)
    new, _ = check_applied(NAME, m, FEEDS, n_applied=2, rtol=1e-5, atol=1e-5, options=INT4)
    assert _batched(new) == 0


def test_a_product_whose_input_is_read_elsewhere_is_kept():
    m = _export(reuse=True)
    new, rep = apply(NAME, m, FEEDS, options=INT4)
    assert rep["applied"] == 1  # the value side only
    assert "read elsewhere" in skip_reasons(rep)
    assert _batched(new) == 1
