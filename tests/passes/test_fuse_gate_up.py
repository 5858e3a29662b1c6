"""fuse_gate_up: gate and up projections on one input become one MatMul + Split, exactly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from ffnx.graph.ffn_match import find_ffns
from ffnx.models.ffn import GatedFFN

from .helpers import (
    apply,
    check_applied,
    check_unchanged,
    export,
    feeds_of,
    model,
    op_counts,
    rand,
    skip_reasons,
)

NAME = "fuse_gate_up"


D, H = 8, 12
FEEDS = feeds_of(rand(2, 3, D, seed=1, lo=-2, hi=2), rand(1, 5, D, seed=2, lo=-2, hi=2))


class Gated(nn.Module):
    """swiglu, geglu, reglu and bilinear GLUs (with and without biases) on one input."""

    def __init__(self):
        super().__init__()
        acts = ("swiglu", "geglu", "reglu", "bilinear")
        self.ffns = nn.ModuleList(GatedFFN(D, H, a, bias=i % 2 == 0) for i, a in enumerate(acts))

    def forward(self, x):
        return tuple(f(x) for f in self.ffns)


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    return export(Gated(), torch.randn(2, 3, D), dynamic={"x": {0: "b", 1: "t"}})


def test_exported_glu_forms(gated):
    new, rep = check_applied(NAME, gated, FEEDS, n_applied=4, rtol=1e-6, atol=1e-6)
    before, after = op_counts(gated), op_counts(new)
    assert after["MatMul"] == before["MatMul"] - 4 and after["Split"] == 4
    kinds = sorted(f.kind for f in find_ffns(gs.import_onnx(new)))
    assert kinds == ["bilinear", "gelu", "relu", "silu"]
    assert all(f.fc1.fused and f.up.fused for f in find_ffns(gs.import_onnx(new)))
    assert rep["error"]["max_abs"] <= 1e-6


def test_already_fused_is_skipped(gated):
    once, _ = apply(NAME, gated, FEEDS)
    rep = check_unchanged(NAME, once, FEEDS)
    assert rep["matches"] == 4 and "already come from one fused MatMul" in skip_reasons(rep)


GEMM = """
agraph (float[N, 8] x) => (float[N, 8] y)
{
    g = Gemm <transB: int = 1> (x, wg, bg)
    u = Gemm(x, wu)
    s = Sigmoid(g)
    a = Mul(g, s)
    h = Mul(u, a)
    y = MatMul(h, wd)
}
"""


def test_gemm_form_with_one_bias():
    """Gemm (transB) gate with bias, Gemm up without, operands of the product swapped."""
    m = model(GEMM, {"wg": rand(H, D), "bg": rand(H, seed=1), "wu": rand(D, H, seed=2),
                     "wd": rand(H, D, seed=3)})  # fmt: skip
    feeds = feeds_of(rand(4, D, seed=4, lo=-2, hi=2))
    new, _ = check_applied(NAME, m, feeds, n_applied=1, rtol=1e-6, atol=1e-6)
    want = op_counts(m) - Counter(Gemm=2) + Counter(MatMul=1, Add=1, Split=1)
    assert op_counts(new) == want


BASE = """
agraph (float[N, 8] x, float[8, 12] wx) => (float[N, 8] y {extra})
{{
    g0 = MatMul(x, {wg})
    g = Add(g0, bg)
    u = MatMul({ux}, wu)
    a = Relu(g)
    h = Mul(a, u)
    y = MatMul(h, wd)
}}
"""


def _neg(wg="wg", ux="x", extra="", tail=""):
    text = BASE.format(wg=wg, ux=ux, extra=extra)
    if ux == "x2":
        text = text.replace("    g0 = MatMul", "    x2 = Neg(x)\n    g0 = MatMul")
    if tail:
        text = text.replace("    y = MatMul(h, wd)\n", f"    y = MatMul(h, wd)\n{tail}\n")
    inits = {"wg": rand(D, H), "bg": rand(H, seed=1), "wu": rand(D, H, seed=2),
             "wd": rand(H, D, seed=3)}  # fmt: skip
    return model(text, inits)


def _feeds(m):
    names = [i.name for i in m.graph.input]
    return [dict(zip(names, [rand(3, D, seed=5), rand(D, H, seed=6)][: len(names)]))]


def test_positive_control():
    m = _neg()
    check_applied(NAME, m, _feeds(m), n_applied=1, rtol=1e-6, atol=1e-6)


def test_weight_is_graph_input():
    m = _neg(wg="wx")
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 0


def test_different_inputs():
    m = _neg(ux="x2", tail="")
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 0


def test_pre_bias_product_read_elsewhere():
    m = _neg(extra=", float[N, 12] g0", tail="")
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 1 and "g0 is also used outside" in skip_reasons(rep)


def test_unmatched_graph_unchanged():
    m = model(
        "agraph (float[N, 8] x) => (float[N, 8] y) { h = MatMul(x, w)\n y = Relu(h) }",
        {"w": rand(D, D)},
    )
    rep = check_unchanged(NAME, m, feeds_of(rand(2, D)))
    assert rep["status"] == "no_match"


def test_shared_weight_is_copied():
    """The gate weight also feeds another MatMul: that one keeps reading the original."""
    m = _neg(extra=", float[N, 12] z", tail="    z = MatMul(x, wg)")
    new, _ = check_applied(NAME, m, _feeds(m), n_applied=1, rtol=1e-6, atol=1e-6)
    kept = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}["wg"]
    np.testing.assert_array_equal(kept, rand(D, H))
