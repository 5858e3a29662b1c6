"""skip_norm: residual Add -> RMSNorm / LayerNorm as one Skip(Simplified)LayerNormalization.

Synthetic pre-norm residual blocks: the decomposed RMSNorm (quotient form, with and without a
shift); LayerNorm is not matched; the sum stays available to its other readers; operands of
different shapes or rank 4 are left byte-unchanged with the reason."""

from __future__ import annotations

import numpy as np

from tests.passes.helpers import apply, assert_close, model, op_counts, rand, run

W = 16

RMS = """
    s = Add(a, b)
    sq = Pow(s, two)
    ms = ReduceMean<keepdims = 1>(sq, axes)
    v = Add(ms, eps)
    r = Sqrt(v)
    n = Div(s, r)
    y0 = Mul(n, gamma)
"""


def rms_block(shift: bool = False, a_shape: str = "B, S, 16", b_shape: str = "B, S, 16"):
    y = "y0" if not shift else "y1"
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    agraph (float[{a_shape}] a, float[{b_shape}] b) => (float[{a_shape}] out)
    {{
    {RMS}
    {"y1 = Add(y0, beta)" if shift else ""}
    out = Add(s, {y})
    }}"""
    inits = {"two": np.float32(2), "eps": np.float32(1e-6), "axes": np.array([-1], np.int64),
             "gamma": rand(W, seed=1, lo=0.5, hi=1.5), "beta": rand(W, seed=2)}  # fmt: skip
    return model(text.split("\n", 2)[2], inits)


def feeds(m, shape=(2, 3, W)):
    return [{i.name: rand(*shape, seed=k) for k, i in enumerate(m.graph.input)}]


def test_rmsnorm_after_a_residual_add_is_one_kernel_and_keeps_the_sum():
    for shift in (False, True):
        m = rms_block(shift)
        fd = feeds(m)
        new, rep = apply("skip_norm", m, fd)
        assert rep["status"] == "applied", rep
        ops = op_counts(new)
        assert ops["SkipSimplifiedLayerNormalization"] == 1 and ops["ReduceMean"] == 0
        assert ops["Add"] == 1 + shift  # the next residual (+ the RMSNorm's shift)
        assert_close(run(m, fd[0]), run(new, fd[0]))


def test_layernorm_is_not_matched():
    """ORT CPU's SkipLayerNormalization measured slower than Add + LayerNormalization."""
    text = """
    agraph (float[B, 16] a, float[B, 16] b) => (float[B, 16] y)
    {
        s = Add(a, b)
        y = LayerNormalization<axis = -1, epsilon = 0.00001>(s, gamma, beta)
    }"""
    m = model(text, {"gamma": rand(W, seed=3), "beta": rand(W, seed=4)})
    new, rep = apply("skip_norm", m, feeds(m, (5, W)))
    assert rep["status"] == "no_match" and new.SerializeToString() == m.SerializeToString()


def test_broadcast_or_rank4_sums_are_left_unchanged_with_the_reason():
    cases = ((rms_block(b_shape="1, S, 16"), (2, 3, W), (1, 3, W), "not known to be equal"),
             (rms_block(a_shape="B, 2, S, 16", b_shape="B, 2, S, 16"), (2, 2, 3, W),
              (2, 2, 3, W), "rank 4"))  # fmt: skip
    for m, sa, sb, why in cases:
        fd = [{"a": rand(*sa, seed=1), "b": rand(*sb, seed=2)}]
        new, rep = apply("skip_norm", m, fd)
        assert rep["status"] == "skipped", rep
        assert why in rep["skipped"][0]["reason"], rep["skipped"]
        assert new.SerializeToString() == m.SerializeToString()
