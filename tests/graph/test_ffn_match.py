"""ffn_match: every FFN/activation/norm form the exporter (or a hand-written graph) produces is
recognised with the right parts, and near-misses are not."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import find_ffns, match_activation
from ffnx.graph.norm_match import find_norms
from ffnx.models.ffn import GatedFFN, Mlp
from ffnx.models.norms import RMSNorm
from tests.passes.helpers import export, model, rand, run

D, H = 8, 16


class TanhGated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Zoo(nn.Module):
    """Every FFN form side by side on one input (one export for all)."""

    FORMS = [
        ("gelu", False), ("relu", False), ("silu", False), ("gelu", True), ("silu", True),
        ("gelu", True), ("relu", True), ("bilinear", True), ("gelu_tanh", True),
    ]  # fmt: skip

    def __init__(self):
        super().__init__()
        self.ffns = nn.ModuleList(
            [Mlp(D, H, "gelu"), Mlp(D, H, "relu"), Mlp(D, H, "silu")]
            + [GatedFFN(D, H, a) for a in ("swiglu", "geglu", "reglu", "bilinear")]
            + [TanhGated()]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(D), RMSNorm(D)])

    def forward(self, x):
        return tuple(f(x) for f in self.ffns) + tuple(n(x) for n in self.norms)


@pytest.fixture(scope="module")
def zoo_graph():
    torch.manual_seed(0)
    return gs.import_onnx(export(Zoo(), torch.randn(2, 3, D), dynamic={"x": {0: "b"}}))


def test_exported_ffn_forms(zoo_graph):
    ffns = find_ffns(zoo_graph)
    got = sorted((f.kind, f.gated) for f in ffns)
    want = sorted(
        [("gelu", False), ("relu", False), ("silu", False)]
        + [(k, True) for k in ("silu", "gelu", "relu", "bilinear", "gelu_tanh")]
    )
    assert got == want
    for f in ffns:
        assert f.hidden == H and f.fc2.weight.shape == (H, D) and f.fc1.weight.shape == (D, H)
        assert f.x.name == "x" and f.check_internal(zoo_graph) is None
        assert (f.up is not None) == f.gated and (f.act is None) == (f.kind == "bilinear")
    # every node of every FFN is claimed by exactly one FFN (nothing missed, nothing shared)
    claimed = [id(n) for f in ffns for n in f.nodes]
    assert len(claimed) == len(set(claimed))
    ffn_ops = [n for n in zoo_graph.nodes if n.op not in ("LayerNormalization",)]
    norm_nodes = {id(n) for m in find_norms(zoo_graph) for n in m.nodes}
    assert {id(n) for n in ffn_ops} - norm_nodes == set(claimed)


def test_exported_norm_forms(zoo_graph):
    norms = find_norms(zoo_graph)
    assert [(n.kind, n.op) for n in norms] == [("layernorm", True), ("rmsnorm", False)]
    ln, rms = norms
    assert (
        ln.gamma.shape == (D,)
        and ln.beta.shape == (D,)
        and math.isclose(ln.eps, 1e-5, rel_tol=1e-6)
    )
    assert (
        rms.gamma.shape == (D,) and rms.beta is None and math.isclose(rms.eps, 1e-6, rel_tol=1e-6)
    )
    assert [n.op for n in rms.nodes] == [
        "Pow",
        "ReduceMean",
        "Add",
        "Sqrt",
        "Reciprocal",
        "Mul",
        "Mul",
    ]


HAND = """
agraph (float[N, 8] x) => (float[N, 8] y1, float[N, 8] y2, float[N, 8] y3)
{
    h1 = Gemm <transB: int = 1> (x, w1t, b1)
    half = Constant <value = float {0.5}> ()
    hx = Mul(half, h1)
    r2 = Constant <value = float {0.70710678}> ()
    s = Mul(h1, r2)
    e = Erf(s)
    one = Constant <value = float {1.0}> ()
    e1 = Add(one, e)
    a1 = Mul(hx, e1)
    y1 = Gemm(a1, w2, b2)
    h2 = MatMul(x, w1)
    c3 = Mul(h2, h2)
    cube = Mul(c3, h2)
    k = Constant <value = float {0.044715}> ()
    kc = Mul(cube, k)
    inner = Add(h2, kc)
    sq = Constant <value = float {0.7978845608}> ()
    t = Mul(inner, sq)
    th = Tanh(t)
    th1 = Add(th, one)
    g = Mul(h2, th1)
    a2 = Mul(g, half)
    y2 = MatMul(a2, w2)
    h3 = MatMul(x, w1)
    a3 = Gelu <approximate: string = "tanh"> (h3)
    y3 = MatMul(a3, w2)
}
"""


def _hand(opset: int = 20):
    inits = {"w1t": rand(H, D), "b1": rand(H, seed=1), "w1": rand(D, H, seed=2)}
    inits.update(w2=rand(H, D, seed=3), b2=rand(D, seed=4))
    return model(HAND, inits, opset=opset)


def test_hand_written_forms():
    """Gemm with transB, factor orders reversed, x·x·x cube, Gelu op with approximate=tanh."""
    g = gs.import_onnx(_hand())
    ffns = {f.y.name: f for f in find_ffns(g)}
    assert {k: f.kind for k, f in ffns.items()} == {
        "y1": "gelu",
        "y2": "gelu_tanh",
        "y3": "gelu_tanh",
    }
    w1t = [i for i in g.tensors().values() if i.name == "w1t"][0].values
    np.testing.assert_array_equal(ffns["y1"].fc1.weight, w1t.T)
    assert ffns["y1"].fc1.bias is not None and ffns["y2"].fc2.bias is None


NEAR_MISS = """
agraph (float[N, 8] x, float[8, 16] wi) => (float[N, 8] y1, float[N, 8] y2, float[N, 8] y3)
{
    h1 = MatMul(x, wi)
    a1 = Relu(h1)
    y1 = MatMul(a1, w2)
    h2 = MatMul(x, w1)
    h2b = MatMul(x, w1)
    s = Sigmoid(h2b)
    a2 = Mul(h2, s)
    y2 = MatMul(a2, w2)
    h3 = MatMul(x, w1)
    c = Constant <value = float {0.4}> ()
    d = Constant <value = float {1.41421356}> ()
    q = Div(h3, d)
    e = Erf(q)
    one = Constant <value = float {1.0}> ()
    e1 = Add(e, one)
    m = Mul(c, e1)
    a3 = Mul(h3, m)
    y3 = MatMul(a3, w2)
}
"""


def test_near_misses_are_not_ffns():
    """Weight is a graph input; σ of another tensor (not SiLU); GELU with 0.4 instead of 0.5."""
    m = model(NEAR_MISS, {"w1": rand(D, H), "w2": rand(H, D, seed=1)})
    g = gs.import_onnx(m)
    assert find_ffns(g) == []


@pytest.mark.parametrize("kind", ["relu", "silu", "gelu", "gelu_tanh"])
def test_builder_activation_round_trip(kind):
    """What Builder emits is matched back as the same activation and computes it."""
    g = gs.Graph(opset=18)
    x = gs.Variable("x", np.float32, ["N", 4])
    g.inputs = [x]
    y = Builder(g, "t").activation(kind, x)
    y.dtype, y.shape = np.float32, ["N", 4]
    g.outputs = [y]
    act = match_activation(y)
    assert act is not None and act.kind == kind and act.x is x
    v = rand(5, 4, lo=-3, hi=3)
    t = torch.from_numpy(v)
    ref = {
        "relu": torch.relu(t),
        "silu": F.silu(t),
        "gelu": F.gelu(t),
        "gelu_tanh": F.gelu(t, approximate="tanh"),
    }[kind]
    out = run(gs.export_onnx(g), {"x": v})[y.name]
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("opset", [17, 18])
def test_builder_norm_round_trip(kind, opset):
    g = gs.Graph(opset=opset)
    x = gs.Variable("x", np.float32, ["N", 6])
    g.inputs = [x]
    gamma, beta = rand(6, lo=0.5, hi=1.5), rand(6, seed=1)
    y = Builder(g, "t").norm(kind, x, 1e-5, gamma, beta, np.float32)
    y.dtype, y.shape = np.float32, ["N", 6]
    g.outputs = [y]
    (n,) = find_norms(g)
    assert n.kind == kind and n.x is x and n.y is y
    np.testing.assert_array_equal(n.gamma, gamma)
    v = rand(5, 6, lo=-3, hi=3).astype(np.float64)
    c = v - v.mean(-1, keepdims=True) if kind == "layernorm" else v
    ref = c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5) * gamma + beta
    m = gs.export_onnx(g)
    m.opset_import[0].version = opset
    onnx.checker.check_model(m)
    out = run(m, {"x": v.astype(np.float32)})[y.name]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
