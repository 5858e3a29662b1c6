"""merge_linear_branches: linears of one input summed (plus the input) become one linear."""

from __future__ import annotations

from tests.passes.helpers import check_applied, check_unchanged, model, op_counts, rand, torch_model

W = {"w1": rand(8, 8, seed=1), "b1": rand(8, seed=2), "w2": rand(8, 8, seed=3), "b2": rand(8)}


def test_summed_linear_branches_and_identity_collapse_into_one_linear():
    m, feeds = torch_model("linear_sum")
    new, rep = check_applied("merge_linear_branches", m, feeds, 1)
    assert rep["applied"] == 1
    assert op_counts(new) == {"MatMul": 1, "Add": 1}


def test_gemm_and_bias_free_matmul_branches_merge():
    m = model(
        """
        g (float[4, 8] x) => (float[4, 8] y) {
            a = Gemm <transB = 1> (x, w1, b1)
            b = MatMul (x, w2)
            s = Add (a, b)
            y = Relu (s)
        }
        """,
        W,
    )
    new, _ = check_applied("merge_linear_branches", m, [{"x": rand(4, 8)}], 1)
    assert op_counts(new) == {"MatMul": 1, "Add": 1, "Relu": 1}


def test_linears_of_different_inputs_are_not_merged():
    m = model(
        """
        g (float[4, 8] x, float[4, 8] u) => (float[4, 8] y) {
            a = MatMul (x, w1)
            b = MatMul (u, w2)
            y = Add (a, b)
        }
        """,
        W,
    )
    check_unchanged("merge_linear_branches", m, [{"x": rand(4, 8), "u": rand(4, 8, seed=3)}])


def test_plain_ffn_is_byte_identical():
    m, feeds = torch_model("mlp")
    assert check_unchanged("merge_linear_branches", m, feeds)["status"] == "no_match"
