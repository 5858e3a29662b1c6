"""layernorm_to_rmsnorm: re-centre every writer of a pre-LN residual stream, then each LayerNorm
is an RMSNorm (exact up to float rounding); any non-re-centrable writer or non-LN reader skips
the whole stream."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ffnx.export.torch_export import export_onnx
from ffnx.models import zoo
from ffnx.passes.optimize import select_passes

from .helpers import check_applied, check_unchanged, feeds_of, model, op_counts, rand, skip_reasons

NAME = "layernorm_to_rmsnorm"


D, V = 8, 11
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """The zoo's GPT-2-style model (pre-LN, token + position tables, GELU MLP), tiny."""
    spec = zoo.build("gpt-mlp", "tiny")
    path = export_onnx(spec, tmp_path_factory.mktemp("gpt") / "m.onnx")
    feeds = [
        {k: v.numpy() for k, v in spec.make_inputs({"batch": b, "seq": t}, seed=s).items()}
        for b, t, s in ((2, 9, 1), (1, 16, 2))
    ]
    return onnx.load(str(path)), feeds


def test_zoo_gpt(gpt):
    m, feeds = gpt
    new, rep = check_applied(NAME, m, feeds, n_applied=1, **TOL)
    before, after = op_counts(m), op_counts(new)
    assert before["LayerNormalization"] == 5 and after["LayerNormalization"] == 0
    assert after["Sqrt"] == after["Pow"] == after["ReduceMean"] == 5
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    tables = [v for v in inits.values() if v.ndim == 2 and v.shape[0] in (512, 128)]
    assert tables and all(np.abs(t.mean(-1)).max() < 1e-6 for t in tables)


GRAPH = """
agraph (int64[T] ids{inputs}) => (float[S, K] logits{outputs})
{{
    axes = Constant <value = int64[1] {{-1}}> ()
    two = Constant <value = float {{2.0}}> ()
    eps = Constant <value = float {{1e-5}}> ()
    e = Gather(tok, ids)
    c = Concat <axis: int = 0> (cls, e)
    h0 = Add(c, pc)
    n1 = LayerNormalization <axis: int = -1, epsilon: float = 1e-5> (h0, g1, b1)
    a0 = Gemm <transB: int = 1> (n1, w1t, c1)
    {a}
    h1 = Add(h0, {w})
    m = ReduceMean(h1, axes)
    d = Sub(h1, m)
    p = Pow(d, two)
    v = ReduceMean(p, axes)
    ve = Add(v, eps)
    s = Sqrt(ve)
    n2 = Div(d, s)
    n2g = Mul(n2, g2)
    n2b = Add(n2g, b2)
    f0 = MatMul(n2b, w2)
    f = Add(f0, c2)
    h2 = Add(f, h1)
    {reader}
    {head_line}
    logits = MatMul(n3, {head})
}}
"""
LN3 = "n3 = LayerNormalization <axis: int = -1, epsilon: float = 1e-5> (h2, g3, b3)"


def _gpt_text(a="", reader=LN3, inputs="", outputs="", head="head", head_line=""):
    """Token table + [cls] row + a constant term, a Gemm(transB) writer, a decomposed LN, a
    MatMul+bias writer, final LN, LM head."""
    w = "a" if a else "a0"
    text = GRAPH.format(
        a=a, w=w, reader=reader, inputs=inputs, outputs=outputs, head=head, head_line=head_line
    )
    inits = {"tok": rand(V, D, lo=-2, hi=2), "cls": rand(1, D, seed=1), "pc": rand(D, seed=2),
             "w1t": rand(D, D, seed=3), "c1": rand(D, seed=4), "w2": rand(D, D, seed=5),
             "c2": rand(D, seed=6), "head": rand(D, 5, seed=7)}  # fmt: skip
    for i in (1, 2, 3):
        inits[f"g{i}"] = rand(D, seed=10 + i, lo=0.5, hi=1.5)
        inits[f"b{i}"] = rand(D, seed=20 + i)
    return model(text, inits)


def _ids(*extra):
    return [{"ids": np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int64), **dict(extra)}]


def test_hand_written_stream():
    """Gather table, Concat'ed [cls] row, a constant term, Gemm(transB) + MatMul writers,
    LayerNormalization and decomposed-LN readers: all re-centred, three RMSNorms."""
    m = _gpt_text()
    new, _ = check_applied(NAME, m, _ids(), n_applied=1, **TOL)
    assert "LayerNormalization" not in op_counts(new) and op_counts(new)["Sqrt"] == 3
    assert op_counts(new)["Sub"] == 0  # the decomposed LN's mean subtraction is gone


def test_tied_table_keeps_original_for_the_head():
    """The LM head is the token table transposed: the head keeps the original table."""
    m = _gpt_text(head="tt", head_line="tt = Transpose <perm: ints = [1, 0]> (tok)")
    new, _ = check_applied(NAME, m, _ids(), n_applied=1, **TOL)
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    np.testing.assert_array_equal(inits["tok"], rand(V, D, lo=-2, hi=2))


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"a": "a = Mul(a0, a0)"}, "from Mul"),
        ({"reader": "n3 = Relu(h2)"}, "Relu"),
        ({"reader": "n3 = LayerNormalization <axis: int = 0> (h2, g3, b3)"}, "LayerNormalization"),
        ({"outputs": ", float[S, 8] h1"}, "h1 is a graph output"),
        ({"a": "a = Relu(a0)"}, "a (from Relu"),
        ({"inputs": ", float[8] gate", "a": "a = Mul(a0, gate)"}, "from Mul"),
    ],
    ids=[
        "nonlinear-writer",
        "non-norm-reader",
        "ln-not-last-axis",
        "stream-is-output",
        "relu-writer",
        "gated-writer",
    ],  # fmt: skip
)
def test_stream_skipped(kw, reason):
    m = _gpt_text(**kw)
    feeds = _ids(("gate", rand(D, seed=9))) if "gate" in kw.get("inputs", "") else _ids()
    rep = check_unchanged(NAME, m, feeds)
    assert rep["matches"] == 1 and reason in skip_reasons(rep), skip_reasons(rep)


VIT = """
agraph (float[B, 3, 4, 4] pixels) => (float[B, 5, 8] y)
<float[B, 8, 2, 2] conv, float[B, {mid}] flat, float[B, 4, 8] tokens>
{{
    conv = Conv <kernel_shape: ints = [2, 2], strides: ints = [2, 2]> (pixels, pw, pb)
    shp = Constant <value = int64[3] {{{shape}}}> ()
    flat = Reshape(conv, shp)
    tokens = {tokens}
    bsz = Shape <start: int = 0, end: int = 1> (pixels)
    one = Constant <value = int64[2] {{1, 8}}> ()
    es = Concat <axis: int = 0> (bsz, one)
    c = Expand(cls, es)
    cat = Concat <axis: int = 1> (c, tokens)
    h = Add(cat, pos)
    y = LayerNormalization <axis: int = -1> (h, g, b)
}}
"""


def _vit(mid="8, 4", shape="0, 8, 4", tokens="Transpose <perm: ints = [0, 2, 1]> (flat)"):
    inits = {"pw": rand(D, 3, 2, 2), "pb": rand(D, seed=1), "cls": rand(1, 1, D, seed=2),
             "pos": rand(1, 5, D, seed=3), "g": rand(D, seed=4, lo=0.5, hi=1.5),
             "b": rand(D, seed=5)}  # fmt: skip
    return model(VIT.format(mid=mid, shape=shape, tokens=tokens), inits)


def test_vit_patch_embedding():
    """Conv patch embedding -> Reshape -> Transpose (channels last), [cls] by Expand + Concat,
    a position table: the Conv is re-centred over its output channels."""
    m = _vit()
    feeds = [{"pixels": rand(2, 3, 4, 4, seed=6, lo=-2, hi=2)}]
    new, _ = check_applied(NAME, m, feeds, n_applied=1, **TOL)
    assert "LayerNormalization" not in op_counts(new)


def test_vit_reshape_mixing_channels_is_skipped():
    m = _vit(mid="4, 8", shape="0, 4, 8", tokens="Identity(flat)")
    rep = check_unchanged(NAME, m, [{"pixels": rand(2, 3, 4, 4, seed=6)}])
    assert "(from Reshape" in skip_reasons(rep), skip_reasons(rep)


RMS_READER = """
agraph ({x_decl}) => (float[T, 8] y, float[T, 8] z)
{{
    axes = Constant <value = int64[1] {{-1}}> ()
    two = Constant <value = float {{2.0}}> ()
    eps = Constant <value = float {{1e-6}}> ()
    {x_line}
    y = LayerNormalization <axis: int = -1> (x, g, b)
    p = Pow(x, two)
    v = ReduceMean(p, axes)
    ve = Add(v, eps)
    s = Sqrt(ve)
    r = Reciprocal(s)
    z = Mul(x, r)
}}
"""


@pytest.mark.parametrize(
    "x_decl, x_line, reason, feed",
    [
        ("float[T, 8] x", "", "x (from a graph input) writes to the stream", rand(4, D)),
        ("int64[T] ids", "x = Gather(tok, ids)", "RMSNorm reads the stream", np.arange(4)),
    ],
    ids=["graph-input-writer", "rmsnorm-reader"],
)
def test_rmsnorm_reader_and_graph_input_writer(x_decl, x_line, reason, feed):
    text = RMS_READER.format(x_decl=x_decl, x_line=x_line)
    inits = {"g": rand(D, lo=0.5, hi=1.5), "b": rand(D, seed=1), "tok": rand(V, D)}
    m = model(text, inits)
    rep = check_unchanged(NAME, m, [{x_decl.split()[-1]: feed}])
    assert reason in skip_reasons(rep), skip_reasons(rep)


def test_pre_bias_product_read_elsewhere():
    m = _gpt_text(outputs=", float[S, 8] f0")
    rep = check_unchanged(NAME, m, _ids())
    assert "f0 is also used outside" in skip_reasons(rep)


def test_opt_in():
    assert NAME not in [p.name for p in select_passes(None)]
    assert NAME in [p.name for p in select_passes([NAME])]


def test_unmatched_graph_unchanged():
    m = model(
        "agraph (float[N, 8] x) => (float[N, 8] y) { h = MatMul(x, w)\n y = Add(h, x) }",
        {"w": rand(D, D)},
    )
    rep = check_unchanged(NAME, m, feeds_of(rand(2, D)))
    assert rep["status"] == "no_match"
