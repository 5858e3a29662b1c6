"""fuse_parallel_ffn: summed FFNs on one input become one wide FFN (exact up to float order)."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

from ffnx.graph.ffn_match import find_ffns
from ffnx.models.ffn import GatedFFN, Mlp

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

NAME = "fuse_parallel_ffn"


D = 8
FEEDS = feeds_of(rand(2, 3, D, seed=1, lo=-2, hi=2), rand(1, 5, D, seed=2, lo=-2, hi=2))
TOL = dict(rtol=1e-5, atol=1e-5)


def _ln(d: int) -> nn.LayerNorm:
    n = nn.LayerNorm(d)
    nn.init.normal_(n.weight, 1.0, 0.3)
    nn.init.normal_(n.bias, 0.0, 0.3)
    return n


class Branches(nn.Module):
    """Four fusable sums:
    1. x + GELU-MLP + GELU-MLP (different widths)            -> residual kept as a term
    2. SwiGLU shared expert + SwiGLU dense FFN (no residual)   -> the output is the wide FFN
    3. three ReLU MLPs beside a residual                       -> merged in one go
    4. two GELU MLPs on differently-scaled LayerNorms of x     -> γ/β folded (ffn_fusion output)
    """

    def __init__(self):
        super().__init__()
        self.a, self.b = Mlp(D, 16), Mlp(D, 24)
        self.s, self.d = GatedFFN(D, 12, "swiglu"), GatedFFN(D, 20, "swiglu", bias=True)
        self.r = nn.ModuleList(Mlp(D, 8, "relu") for _ in range(3))
        self.n1, self.n2, self.f1, self.f2 = _ln(D), _ln(D), Mlp(D, 16), Mlp(D, 16, bias=False)

    def forward(self, x):
        y1 = x + self.a(x) + self.b(x)
        y2 = self.s(y1) + self.d(y1)
        y3 = self.r[0](y2) + y2 + self.r[1](y2) + self.r[2](y2)
        return y3 + self.f1(self.n1(y3)) + self.f2(self.n2(y3))


@pytest.fixture(scope="module")
def branches():
    torch.manual_seed(0)
    return export(Branches(), torch.randn(2, 3, D), dynamic={"x": {0: "b", 1: "t"}})


def test_exported_branches(branches):
    new, rep = check_applied(NAME, branches, FEEDS, n_applied=4, **TOL)
    ffns = find_ffns(gs.import_onnx(new))
    assert sorted((f.kind, f.hidden) for f in ffns) == [
        ("gelu", 32), ("gelu", 40), ("relu", 24), ("silu", 32)
    ]  # fmt: skip
    before, after = op_counts(branches), op_counts(new)
    assert before["MatMul"] == 20 and after["MatMul"] == 9
    assert before["LayerNormalization"] == 2 and after["LayerNormalization"] == 1
    assert after["Erf"] == 2 and after["Sigmoid"] == 1 and after["Relu"] == 1


def test_keeps_fused_gate_up_form(branches):
    fused, _ = apply("fuse_gate_up", branches, FEEDS)
    new, _ = check_applied(NAME, fused, FEEDS, n_applied=4, **TOL)
    (swiglu,) = [f for f in find_ffns(gs.import_onnx(new)) if f.kind == "silu"]
    assert swiglu.fc1.fused and swiglu.hidden == 32 and op_counts(new)["Split"] == 1


TWO = """
agraph (float[N, 8] x{inputs}) => (float[N, 8] y{outputs})
{{
{extra}
    h1 = MatMul(x, w1)
    a1 = Relu(h1)
    y1 = MatMul(a1, w2)
    h2 = MatMul({x2}, {v1})
    a2 = {act}(h2)
    y2 = MatMul(a2, v2)
    s = Add(y1, x)
    y = Add(s, y2)
}}
"""


def _two(act="Relu", x2="x", v1="v1", inputs="", outputs="", extra="", opset=18):
    text = TWO.format(act=act, x2=x2, v1=v1, inputs=inputs, outputs=outputs, extra=extra)
    inits = {"w1": rand(D, 6), "w2": rand(6, D, seed=1), "v1": rand(D, 4, seed=2),
             "v2": rand(4, D, seed=3)}  # fmt: skip
    return model(text, inits, opset=opset)


def _feeds(m):
    shapes = {"x": (3, D), "vin": (D, 4)}
    return [{i.name: rand(*shapes[i.name], seed=7) for i in m.graph.input}]


def test_positive_control():
    m = _two()
    new, _ = check_applied(NAME, m, _feeds(m), n_applied=1, **TOL)
    assert op_counts(new)["MatMul"] == 2


def test_different_activations():
    m = _two(act="Sigmoid")  # not an FFN activation: one FFN only
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 0
    m = _two(act="Gelu", opset=20)
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 0


def test_different_inputs():
    m = _two(x2="xn", extra="    xn = Neg(x)")
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 0


def test_weight_is_graph_input():
    m = _two(v1="vin", inputs=", float[8, 4] vin")
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 0


def test_branch_output_read_elsewhere():
    m = _two(outputs=", float[N, 8] y2")
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 1 and "y2 is read outside the sum" in skip_reasons(rep)


def test_hidden_read_elsewhere():
    m = _two(outputs=", float[N, 4] a2")
    rep = check_unchanged(NAME, m, _feeds(m))
    assert rep["matches"] == 1 and "a2 is also used outside" in skip_reasons(rep)


def test_unmatched_graph_unchanged():
    m = model(
        "agraph (float[N, 8] x) => (float[N, 8] y) { h = MatMul(x, w)\n y = Add(h, x) }",
        {"w": rand(D, D)},
    )
    rep = check_unchanged(NAME, m, feeds_of(rand(2, D)))
    assert rep["status"] == "no_match"
