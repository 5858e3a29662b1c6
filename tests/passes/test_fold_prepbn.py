"""fold_prepbn: a token BatchNorm / per-channel Mul+Add read only by linears disappears."""

from __future__ import annotations

import numpy as np

from ffnx.passes import optimize
from tests.passes.helpers import (
    assert_close,
    bn_params,
    check_applied,
    check_unchanged,
    model,
    op_counts,
    rand,
    run,
    skip_reasons,
    torch_model,
    zoo_model,
)

TOK = {"x": rand(2, 5, 8, seed=2)}


def affine(readers: str, outs: str = "float[2, 5, 6] y, float[2, 5, 6] z", add: bool = True):
    shift = "a = Add (m, t)" if add else "a = Identity (m)"
    return f"""
        g (float[2, 5, 8] x) => ({outs}) {{
            m = Mul (x, s)
            {shift}
            {readers}
        }}
    """


INITS = {
    "s": rand(8, lo=0.5, hi=1.5),
    "t": rand(8, seed=1),
    "w": rand(8, 6, seed=2),
    "v": rand(6, 8, seed=3),
    "c": rand(6, seed=4),
}


def test_mul_add_read_by_a_reshape_is_not_a_candidate():
    m = model(
        affine(
            """
            p = MatMul (a, w)
            y = Add (p, c)
            z = MatMul (a, w)
            r = Reshape (a, shape)
            q = Gemm <transB = 1> (r, v)
            """,
            "float[2, 5, 6] y, float[2, 5, 6] z",
        ),
        {**INITS, "shape": np.array([10, 8])},
    )
    check_unchanged("fold_prepbn", m, [TOK])  # the Reshape is not a linear reader


def test_mul_add_read_by_three_linears_folds_into_each():
    m = model(
        affine(
            """
            p = MatMul (a, w)
            y = Add (p, c)
            z = MatMul (a, w)
            u = MatMul (a, v2)
            """,
            "float[2, 5, 6] y, float[2, 5, 6] z, float[2, 5, 4] u",
        ),
        {**INITS, "v2": rand(8, 4, seed=5)},
    )
    new, rep = check_applied("fold_prepbn", m, [TOK], 1)
    assert op_counts(new) == {"MatMul": 3, "Add": 3}  # y's bias updated, z and u get one
    shapes = [tuple(i.dims) for i in new.graph.initializer]
    assert shapes.count((8, 6)) == 1  # y and z shared w: they share the folded weight


def test_scale_only_gemm_readers():
    m = model(
        """
        g (float[4, 8] x) => (float[4, 6] y, float[4, 6] z) {
            m = Mul (x, s)
            y = Gemm <transB = 1> (m, v, c)
            z = Gemm (m, w)
        }
        """,
        INITS,
    )
    new, _ = check_applied("fold_prepbn", m, [{"x": rand(4, 8, seed=6)}], 1)
    assert op_counts(new) == {"Gemm": 2}


def test_token_batchnorm_read_by_qkv_folds_away():
    m, feeds = torch_model("tbn_fanout")
    new, rep = check_applied("fold_prepbn", m, feeds, 1)
    assert not {"BatchNormalization", "Transpose"} & set(op_counts(new))
    assert op_counts(new)["MatMul"] == 3


def test_after_fold_batchnorm_the_mul_add_folds_away():
    m, feeds = torch_model("tbn_fanout")
    mid, reps = optimize.optimize_model(m, feeds, passes=["fold_batchnorm", "fold_prepbn"])
    assert [r["applied"] for r in reps] == [1, 1]
    assert op_counts(mid)["MatMul"] == 3 and op_counts(mid)["Mul"] == op_counts(m)["Mul"]
    for f in feeds:
        assert_close(run(m, f), run(mid, f))


def test_affine_also_read_by_a_non_linear_is_skipped():
    m = model(
        affine("y = MatMul (a, w)\nz = Relu (a)", "float[2, 5, 6] y, float[2, 5, 8] z"), INITS
    )
    check_unchanged("fold_prepbn", m, [TOK])  # Relu reader: not even a candidate


def test_affine_read_by_matmul_as_right_operand_is_skipped():
    text = affine("y = MatMul (a, w)\nz = MatMul (k, a)", "float[2, 5, 6] y, float[2, 5, 8] z")
    m = model(text.replace("(float[2, 5, 8] x)", "(float[2, 5, 8] x, float[2, 5, 5] k)"), INITS)
    rep = check_unchanged("fold_prepbn", m, [{**TOK, "k": rand(2, 5, 5, seed=7)}])
    assert "left operand" in skip_reasons(rep)


def test_weight_that_is_a_graph_input_is_skipped():
    text = affine("y = MatMul (a, w)\nz = MatMul (a, w)").replace(
        "(float[2, 5, 8] x)", "(float[2, 5, 8] x, float[8, 6] w)"
    )
    m = model(text, {k: v for k, v in INITS.items() if k != "w"})
    rep = check_unchanged("fold_prepbn", m, [{**TOK, "w": rand(8, 6, seed=8)}])
    assert "not a constant 2-D matrix" in skip_reasons(rep)


def test_affine_that_is_a_graph_output_is_skipped():
    m = model(affine("y = MatMul (a, w)", "float[2, 5, 6] y, float[2, 5, 8] a"), INITS)
    rep = check_unchanged("fold_prepbn", m, [TOK])
    assert "graph output" in skip_reasons(rep)


def test_norm_gamma_is_left_to_fold_norm_affine():
    m, feeds = torch_model("rms_linear")
    rep = check_unchanged("fold_prepbn", m, feeds)
    assert "fold_norm_affine" in skip_reasons(rep)


def test_bn_with_non_constant_statistics_is_skipped():
    m = model(
        """
        g (float[4, 8] x, float[8] bn_v) => (float[4, 6] y, float[4, 6] z) {
            n = BatchNormalization (x, bn_g, bn_b, bn_m, bn_v)
            y = MatMul (n, w)
            z = MatMul (n, w)
        }
        """,
        {"w": INITS["w"], **{k: v for k, v in bn_params(8).items() if k != "bn_v"}},
    )
    rep = check_unchanged("fold_prepbn", m, [{"x": rand(4, 8), "bn_v": rand(8, lo=1, hi=2)}])
    assert "not constants" in skip_reasons(rep)


def test_graph_without_affine_is_byte_identical():
    m = model("g (float[4, 8] x) => (float[4, 6] y) { y = MatMul (x, w) }", {"w": INITS["w"]})
    assert check_unchanged("fold_prepbn", m, [{"x": rand(4, 8)}])["status"] == "no_match"


def test_zoo_vit_prepbn_token_norms_fold_into_qkv_and_fc1():
    m, feeds = zoo_model("vit-prepbn")
    new, reports = optimize.optimize_model(m, feeds, passes=["fold_batchnorm", "fold_prepbn"])
    bn, prep = reports
    assert bn["notes"]["before"] == 2 and bn["notes"]["mul_add"] == 3  # ffn norms; attn + final
    assert prep["applied"] == 2  # the attention norms, each read by q, k and v
    assert "BatchNormalization" not in op_counts(new)
    for f in feeds:
        assert_close(run(m, f), run(new, f), 1e-4, 1e-4)
