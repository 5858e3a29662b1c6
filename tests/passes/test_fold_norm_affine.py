"""fold_norm_affine: LayerNorm / RMSNorm γ, β folded into the linears reading the norm."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from tests.passes.helpers import (
    check_applied,
    check_unchanged,
    model,
    op_counts,
    rand,
    skip_reasons,
    torch_model,
)

TOK = {"x": rand(2, 5, 8, seed=2)}
P = {
    "g": rand(8, lo=0.5, hi=1.5),
    "b": rand(8, seed=1),
    "w": rand(8, 6, seed=2),
    "c": rand(6, seed=3),
    "v": rand(8, 4, seed=4),
}


def ln_op(readers: str, outs: str = "float[2, 5, 6] y", bias: str = ", b") -> str:
    return f"""
        g (float[2, 5, 8] x) => ({outs}) {{
            n = LayerNormalization <axis = -1> (x, g{bias})
            {readers}
        }}
    """


DECOMPOSED_LN = """
    g (float[2, 5, 8] x) => (float[2, 5, 6] y, float[2, 5, 4] z) {
        mu = ReduceMean <keepdims = 1> (x, axes)
        d = Sub (x, mu)
        two = Constant <value = float {2.0}> ()
        sq = Pow (d, two)
        var = ReduceMean <keepdims = 1> (sq, axes)
        eps = Constant <value = float {1e-5}> ()
        ve = Add (var, eps)
        sd = Sqrt (ve)
        nn = Div (d, sd)
        ng = Mul (nn, g)
        n = Add (ng, b)
        p = MatMul (n, w)
        y = Add (p, c)
        z = MatMul (n, v)
    }
"""


def test_layernorm_op_read_by_biased_linears_keeps_unit_gamma_and_no_beta():
    m = model(ln_op("p = MatMul (n, w)\ny = Add (p, c)"), P)
    new, _ = check_applied("fold_norm_affine", m, [TOK], 1)
    ln = next(n for n in new.graph.node if n.op_type == "LayerNormalization")
    assert len(ln.input) == 2
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    np.testing.assert_array_equal(inits[ln.input[1]], np.ones(8, np.float32))
    assert op_counts(new) == op_counts(m)


def test_decomposed_layernorm_that_ort_fuses_is_skipped():
    m = model(DECOMPOSED_LN, {**P, "axes": np.array([-1])})
    rep = check_unchanged("fold_norm_affine", m, [TOK])
    assert "ONNX Runtime fuses" in skip_reasons(rep)


def test_decomposed_layernorm_reciprocal_form_loses_its_mul_and_add():
    text = DECOMPOSED_LN.replace("nn = Div (d, sd)", "rs = Reciprocal (sd)\n nn = Mul (d, rs)")
    m = model(text, {**P, "axes": np.array([-1])})
    new, _ = check_applied("fold_norm_affine", m, [TOK], 1)
    assert op_counts(new)["Mul"] == 1  # d·rs only
    assert op_counts(new)["Add"] == op_counts(m)["Add"]  # β Add gone, bias-free z got one


def test_decomposed_rmsnorm_div_form_keeps_gamma_and_folds_beta():
    m = model(DECOMPOSED_RMS, {**P, "axes": np.array([-1])})
    new, _ = check_applied("fold_norm_affine", m, [TOK], 1)
    assert op_counts(new)["Mul"] == 1  # γ stays: ORT fuses it into SimplifiedLayerNormalization
    assert op_counts(new)["Add"] == op_counts(m)["Add"] - 1


DECOMPOSED_RMS = """
    g (float[2, 5, 8] x) => (float[2, 5, 6] y) {
        two = Constant <value = float {2.0}> ()
        sq = Pow (x, two)
        var = ReduceMean <keepdims = 1> (sq, axes)
        eps = Constant <value = float {1e-5}> ()
        ve = Add (var, eps)
        sd = Sqrt (ve)
        nn = Div (x, sd)
        ng = Mul (nn, g)
        n = Add (ng, b)
        p = MatMul (n, w)
        y = Add (p, c)
    }
"""


def test_exported_rmsnorm_gamma_folds_into_bias_free_linear():
    m, feeds = torch_model("rms_linear")
    new, _ = check_applied("fold_norm_affine", m, feeds, 1)
    assert op_counts(new)["Mul"] == op_counts(m)["Mul"] - 1


def test_exported_layernorm_read_by_two_linears():
    m, feeds = torch_model("ln_fanout")
    new, _ = check_applied("fold_norm_affine", m, feeds, 1)
    assert op_counts(new) == op_counts(m)


def test_reader_that_is_not_linear_is_skipped():
    m = model(ln_op("y = MatMul (n, w)\nz = Relu (n)", "float[2, 5, 6] y, float[2, 5, 8] z"), P)
    rep = check_unchanged("fold_norm_affine", m, [TOK])
    assert "not a linear layer" in skip_reasons(rep)


def test_beta_into_bias_free_matmul_of_ln_op_is_skipped():
    m = model(ln_op("y = MatMul (n, w)"), P)
    rep = check_unchanged("fold_norm_affine", m, [TOK])
    assert "would add 1 bias Add" in skip_reasons(rep)


def test_gamma_only_ln_op_folds_into_bias_free_matmul():
    new, _ = check_applied(
        "fold_norm_affine", model(ln_op("y = MatMul (n, w)", bias=""), P), [TOK], 1
    )
    assert op_counts(new) == {"LayerNormalization": 1, "MatMul": 1}


def test_unit_gamma_zero_beta_is_skipped():
    p = {**P, "g": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}
    rep = check_unchanged("fold_norm_affine", model(ln_op("y = MatMul (n, w)"), p), [TOK])
    assert "already" in skip_reasons(rep)


def test_norm_output_that_is_a_graph_output_is_skipped():
    m = model(ln_op("y = MatMul (n, w)", "float[2, 5, 6] y, float[2, 5, 8] n"), P)
    rep = check_unchanged("fold_norm_affine", m, [TOK])
    assert "graph output" in skip_reasons(rep)


def test_gamma_that_is_a_graph_input_is_not_matched():
    text = ln_op("p = MatMul (n, w)\ny = Add (p, c)").replace(
        "(float[2, 5, 8] x)", "(float[2, 5, 8] x, float[8] g)"
    )
    m = model(text, {k: v for k, v in P.items() if k != "g"})
    check_unchanged("fold_norm_affine", m, [{**TOK, "g": rand(8, seed=7)}])


def test_weight_that_is_a_graph_input_is_skipped():
    text = ln_op("p = MatMul (n, w)\ny = Add (p, c)").replace(
        "(float[2, 5, 8] x)", "(float[2, 5, 8] x, float[8, 6] w)"
    )
    m = model(text, {k: v for k, v in P.items() if k != "w"})
    rep = check_unchanged("fold_norm_affine", m, [{**TOK, "w": rand(8, 6, seed=7)}])
    assert "not a constant 2-D matrix" in skip_reasons(rep)


def test_graph_without_norm_is_byte_identical():
    m = model("g (float[2, 5, 8] x) => (float[2, 5, 6] y) { y = MatMul (x, w) }", P)
    assert check_unchanged("fold_norm_affine", m, [TOK])["status"] == "no_match"
