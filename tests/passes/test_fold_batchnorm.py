"""fold_batchnorm: BN after/before Conv, Gemm, MatMul(+Add), token views, else Mul+Add."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from tests.passes.helpers import (
    apply,
    bn_params,
    check_applied,
    check_unchanged,
    model,
    op_counts,
    rand,
    skip_reasons,
    torch_model,
)

BN = "BatchNormalization <epsilon = 0.001>"
IMG = {"x": rand(2, 3, 6, 6, seed=1)}
TOK = {"x": rand(2, 5, 8, seed=2)}
VEC = {"x": rand(4, 8, seed=3)}


def conv_bn(pads="", readers="y = Relu (n)", out="float[2, 4, 6, 6] y"):
    return model(
        f"""
        g (float[2, 3, 6, 6] x) => ({out}) {{
            c = Conv <kernel_shape = [3, 3]{pads}> (x, w, b)
            n = {BN} (c, bn_g, bn_b, bn_m, bn_v)
            {readers}
        }}
        """,
        {"w": rand(4, 3, 3, 3), "b": rand(4), **bn_params(4)},
    )


def test_bn_after_conv_folds_into_weights():
    new, rep = check_applied("fold_batchnorm", conv_bn(", pads = [1, 1, 1, 1]"), [IMG], 1)
    assert rep["notes"] == {"after": 1}
    assert op_counts(new) == {"Conv": 1, "Relu": 1}


def test_conv_weight_shared_outside_is_not_changed_in_place():
    m = model(
        f"""
        g (float[2, 3, 6, 6] x) => (float[2, 4, 4, 4] y, float[2, 4, 4, 4] z) {{
            c = Conv <kernel_shape = [3, 3]> (x, w, b)
            y = {BN} (c, bn_g, bn_b, bn_m, bn_v)
            z = Conv <kernel_shape = [3, 3]> (x, w, b)
        }}
        """,
        {"w": rand(4, 3, 3, 3), "b": rand(4), **bn_params(4)},
    )
    new, _ = check_applied("fold_batchnorm", m, [IMG], 1)
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    np.testing.assert_array_equal(inits["w"], numpy_helper.to_array(m.graph.initializer[0]))


def test_conv_output_read_twice_becomes_mul_add():
    two = "float[2, 4, 4, 4] y, float[2, 4, 4, 4] z"
    m = conv_bn(readers="y = Relu (n)\nz = Sigmoid (c)", out=two)
    new, rep = check_applied("fold_batchnorm", m, [IMG], 1)
    assert rep["notes"]["mul_add"] == 1
    assert op_counts(new)["Mul"] == 1 and "BatchNormalization" not in op_counts(new)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_after_gemm(trans_b):
    w = rand(6, 8) if trans_b else rand(8, 6)
    m = model(
        f"""
        g (float[4, 8] x) => (float[4, 6] y) {{
            h = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> (x, w, c)
            y = {BN} (h, bn_g, bn_b, bn_m, bn_v)
        }}
        """,
        {"w": w, "c": rand(6), **bn_params(6)},
    )
    new, rep = check_applied("fold_batchnorm", m, [VEC], 1)
    assert rep["notes"] == {"after": 1} and op_counts(new) == {"Gemm": 1}


@pytest.mark.parametrize("bias", [True, False])
def test_bn_after_matmul_on_rank2(bias):
    add = "h = Add (p, c)" if bias else "h = Identity (p)"
    m = model(
        f"""
        g (float[4, 8] x) => (float[4, 6] y) {{
            p = MatMul (x, w)
            {add}
            y = {BN} (h, bn_g, bn_b, bn_m, bn_v)
        }}
        """,
        {"w": rand(8, 6), "c": rand(6), **bn_params(6)},
    )
    if not bias:  # the Identity sits between MatMul and BN: cleanup's job, run it first
        m = apply("cleanup", m, [VEC])[0]
    new, rep = check_applied("fold_batchnorm", m, [VEC], 1)
    assert rep["notes"] == {"after": 1}
    assert op_counts(new) == {"MatMul": 1, "Add": 1}


def token_bn(reader: str, out: str = "float[2, 5, 6] y") -> str:
    return f"""
        g (float[2, 5, 8] x) => ({out}) {{
            t = Transpose <perm = [0, 2, 1]> (x)
            n = {BN} (t, bn_g, bn_b, bn_m, bn_v)
            u = Transpose <perm = [0, 2, 1]> (n)
            {reader}
        }}
    """


def test_token_bn_before_one_linear_folds_into_it():
    inits = {"w": rand(8, 6), "c": rand(6), **bn_params(8)}
    m = model(token_bn("p = MatMul (u, w)\ny = Add (p, c)"), inits)
    new, rep = check_applied("fold_batchnorm", m, [TOK], 1)
    assert rep["notes"] == {"before": 1}
    assert op_counts(new) == {"MatMul": 1, "Add": 1}


def test_token_bn_after_linear_folds_into_it():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 6] y) {
            p = MatMul (x, w)
            h = Add (p, c)
            t = Transpose <perm = [0, 2, 1]> (h)
            n = BatchNormalization (t, bn_g, bn_b, bn_m, bn_v)
            u = Transpose <perm = [0, 2, 1]> (n)
            y = Relu (u)
        }
        """,
        {"w": rand(8, 6), "c": rand(6), **bn_params(6)},
    )
    new, rep = check_applied("fold_batchnorm", m, [TOK], 1)
    assert rep["notes"] == {"after": 1} and op_counts(new) == {"MatMul": 1, "Add": 1, "Relu": 1}


def test_token_bn_with_two_readers_becomes_last_axis_mul_add():
    m = model(
        token_bn("y = MatMul (u, w)\nz = Relu (u)", "float[2, 5, 6] y, float[2, 5, 8] z"),
        {"w": rand(8, 6), **bn_params(8)},
    )
    new, rep = check_applied("fold_batchnorm", m, [TOK], 1)
    assert rep["notes"]["mul_add"] == 1
    scale = next(i for i in new.graph.initializer if "scale" in i.name)
    assert list(scale.dims) == [8]


def test_bn_before_unpadded_grouped_conv_folds():
    m = model(
        f"""
        g (float[2, 4, 6, 6] x) => (float[2, 6, 4, 4] y) {{
            n = {BN} (x, bn_g, bn_b, bn_m, bn_v)
            y = Conv <kernel_shape = [3, 3], group = 2> (n, w, b)
        }}
        """,
        {"w": rand(6, 2, 3, 3), "b": rand(6), **bn_params(4)},
    )
    new, rep = check_applied("fold_batchnorm", m, [{"x": rand(2, 4, 6, 6, seed=4)}], 1)
    assert rep["notes"] == {"before": 1} and op_counts(new) == {"Conv": 1}


def test_bn_before_padded_conv_is_not_folded_into_it():
    m = model(
        f"""
        g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
            n = {BN} (x, bn_g, bn_b, bn_m, bn_v)
            y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (n, w)
        }}
        """,
        {"w": rand(4, 3, 3, 3), **bn_params(3)},
    )
    new, rep = check_applied("fold_batchnorm", m, [IMG], 1)
    assert rep["notes"]["mul_add"] == 1 and "pads its input" in rep["notes"]["mul_add_why"][0]
    assert op_counts(new) == {"Mul": 1, "Add": 1, "Conv": 1}
    scale = next(i for i in new.graph.initializer if "scale" in i.name)
    assert list(scale.dims) == [3, 1, 1]


def test_bn_before_gemm_folds():
    m = model(
        f"""
        g (float[4, 8] x) => (float[4, 6] y) {{
            n = {BN} (x, bn_g, bn_b, bn_m, bn_v)
            y = Gemm <transB = 1> (n, w)
        }}
        """,
        {"w": rand(6, 8), **bn_params(8)},
    )
    new, rep = check_applied("fold_batchnorm", m, [VEC], 1)
    assert rep["notes"] == {"before": 1} and op_counts(new) == {"Gemm": 1}


def test_batched_matmul_weight_is_not_a_linear():
    m = model(
        token_bn("y = MatMul (u, w)", "float[2, 5, 6] y"), {"w": rand(2, 8, 6), **bn_params(8)}
    )
    _, rep = check_applied("fold_batchnorm", m, [TOK], 1)
    assert rep["notes"]["mul_add"] == 1


def test_bn_with_graph_input_parameters_is_skipped():
    m = model(
        f"""
        g (float[4, 8] x, float[8] bn_g) => (float[4, 6] y) {{
            n = {BN} (x, bn_g, bn_b, bn_m, bn_v)
            y = MatMul (n, w)
        }}
        """,
        {"w": rand(8, 6), **{k: v for k, v in bn_params(8).items() if k != "bn_g"}},
    )
    feeds = [{**VEC, "bn_g": rand(8, seed=5)}]
    rep = check_unchanged("fold_batchnorm", m, feeds)
    assert "not constants" in skip_reasons(rep)


def test_training_mode_bn_is_skipped():
    m = model(
        """
        g (float[4, 8] x) => (float[4, 8] y) {
            y, rm, rv = BatchNormalization <training_mode = 1> (x, bn_g, bn_b, bn_m, bn_v)
        }
        """,
        bn_params(8),
    )
    rep = check_unchanged("fold_batchnorm", m, [VEC])
    assert "training mode" in skip_reasons(rep)


def test_rank_unknown_bn_is_skipped():
    m = model(
        f"""
        g (float[2, 3, 6, 6] x) => (float y) {{
            a = Relu (x)
            y = {BN} (a, bn_g, bn_b, bn_m, bn_v)
        }}
        """,
        bn_params(3),
        infer=False,
    )
    rep = check_unchanged("fold_batchnorm", m, [IMG])
    assert "rank unknown" in skip_reasons(rep)


def test_graph_without_bn_is_byte_identical():
    m = model("g (float[4, 8] x) => (float[4, 6] y) { y = MatMul (x, w) }", {"w": rand(8, 6)})
    assert check_unchanged("fold_batchnorm", m, [VEC])["status"] == "no_match"


# Exports of the modules the zoo uses ------------------------------------------------------


def test_exported_token_batchnorm_folds_into_the_next_linear():
    m, feeds = torch_model("tbn_linear")
    assert op_counts(m)["Transpose"] == 2
    new, rep = check_applied("fold_batchnorm", m, feeds, 1)
    assert rep["notes"] == {"before": 1}
    assert not {"Transpose", "BatchNormalization"} & set(op_counts(new))


def test_exported_token_batchnorm_with_fanout_becomes_mul_add():
    m, feeds = torch_model("tbn_fanout")
    new, rep = check_applied("fold_batchnorm", m, feeds, 1)
    assert rep["notes"]["mul_add"] == 1 and "read by 3 nodes" in rep["notes"]["mul_add_why"][0]
    assert op_counts(new)["Mul"] == op_counts(m)["Mul"] + 1


def test_exported_batchnorms_sharing_one_transpose_fold_into_their_linears():
    m, feeds = torch_model("tbn_shared_transpose")
    assert op_counts(m)["Transpose"] == 3  # the exporter shares the leading Transpose
    new, rep = check_applied("fold_batchnorm", m, feeds, 2)
    assert rep["notes"] == {"before": 2}
    assert not {"Transpose", "BatchNormalization"} & set(op_counts(new))


def test_exported_repa_hidden_bn_folds_into_fc1():
    m, feeds = torch_model("repa_residual")
    assert op_counts(m)["Reshape"] == 2
    new, rep = check_applied("fold_batchnorm", m, feeds, 1)
    assert rep["notes"] == {"after": 1}
    assert not {"Reshape", "BatchNormalization"} & set(op_counts(new))


def test_exported_convnet_bn_after_conv_folds_and_bn_before_1x1_conv_folds():
    m, feeds = torch_model("convnet")
    new, rep = check_applied("fold_batchnorm", m, feeds, 1)
    assert rep["notes"] == {"before": 1}  # the exporter already folded BN after the first Conv
    assert "BatchNormalization" not in op_counts(new)
