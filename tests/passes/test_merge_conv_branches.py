"""merge_conv_branches: one test per branch kind (k×k + 1×1, depthwise, identity, BN-only,
Mul scale + bias), each against ONNX Runtime outputs of the graph before the pass; unmatched and
misaligned graphs are left byte-identical; the zoo's RepVGG/MobileOne exports merge fully."""

from __future__ import annotations

import numpy as np

from ffnx.graph import verify
from ffnx.lowering import run_model
from ffnx.passes import optimize
from ffnx.passes.base import PassContext
from ffnx.passes.merge_conv_branches import PASS
from tests.passes.helpers import assert_close, bn_params, model, op_counts, rand, run

C = 4
X = "float[1, 4, 8, 8] x"


def _apply(m):
    feeds = [{"x": rand(1, C, 8, 8, seed=s)} for s in range(2)]
    ref = run_model(m, feeds)
    new, rep = optimize.apply_pass(PASS, m, PassContext(feeds=feeds), ref, verify.Tolerance())
    return new, rep, feeds


def _check(m, n_applied=1):
    new, rep, feeds = _apply(m)
    assert rep["status"] == "applied" and rep["applied"] == n_applied, rep
    for f in feeds:
        assert_close(run(m, f), run(new, f))
    c = op_counts(new)
    assert c["Add"] == 0 and c["Conv"] == n_applied and c["BatchNormalization"] == 0, c
    return new


def _w(*shape, seed=1):
    return rand(*shape, seed=seed)


def test_kxk_plus_1x1():
    m = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w3, b3)
        b = Conv (x, w1, b1)
        y = Add(a, b) }}""", {"w3": _w(C, C, 3, 3), "b3": _w(C), "w1": _w(C, C, 1, 1, seed=2),
                            "b1": _w(C, seed=3)})  # fmt: skip
    _check(m)


def test_depthwise_with_dense_1x1_uses_gcd_groups():
    m = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1], group = 4> (x, wd)
        b = Conv <pads = [1, 1, 1, 1], group = 4> (x, wd2)
        c = Conv <group = 2> (x, w1, b1)
        s = Add(a, b)
        y = Add(s, c) }}""", {"wd": _w(C, 1, 3, 3), "wd2": _w(C, 1, 3, 3, seed=4),
                            "w1": _w(C, 2, 1, 1, seed=2), "b1": _w(C, seed=3)})  # fmt: skip
    new = _check(m)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    assert next(a.i for a in conv.attribute if a.name == "group") == 2


def test_identity_branch():
    m = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w3, b3)
        y = Add(a, x) }}""", {"w3": _w(C, C, 3, 3), "b3": _w(C)})  # fmt: skip
    _check(m)


def test_bn_only_identity_branch_grouped():
    m = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1], group = 2> (x, w3, b3)
        n = BatchNormalization(x, bn_g, bn_b, bn_m, bn_v)
        y = Add(a, n) }}""", {"w3": _w(C, 2, 3, 3), "b3": _w(C), **bn_params(C)})  # fmt: skip
    _check(m)


def test_mul_add_identity_branch_from_folded_bn():
    m = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w3, b3)
        c = Conv (x, w1)
        m = Mul(x, s)
        t1 = Add(m, t)
        u = Add(a, c)
        y = Add(u, t1) }}""", {"w3": _w(C, C, 3, 3), "b3": _w(C), "w1": _w(C, C, 1, 1, seed=2),
                             "s": _w(C, 1, 1, seed=5), "t": _w(1, C, 1, 1, seed=6)})  # fmt: skip
    _check(m)


def test_unmatched_and_misaligned_graphs_are_byte_identical():
    inits = {"w3": _w(C, C, 3, 3), "w3b": _w(C, C, 3, 3, seed=2)}
    plain = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w3)
        y = Relu(a) }}""", inits)  # fmt: skip
    shifted = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w3)
        b = Conv <pads = [0, 0, 2, 2]> (x, w3b)
        y = Add(a, b) }}""", inits)  # fmt: skip
    strided = model(f"""g ({X}) => (float[1, 4, 8, 8] y) {{
        a = Conv <pads = [2, 2, 2, 2], dilations = [2, 2]> (x, w3)
        b = Conv (x, w1s)
        y = Add(a, b) }}""", {**inits, "w1s": _w(C, C, 1, 1, seed=7)})  # fmt: skip
    for m, reason in ((plain, None), (shifted, "centres"), (strided, "dilation")):
        before = m.SerializeToString()
        new, rep, _ = _apply(m)
        assert new.SerializeToString() == before and rep["applied"] == 0, rep
        if reason:
            assert reason in rep["skipped"][0]["reason"], rep


def test_zoo_conv_blocks_merge_to_one_conv_each(tmp_path):
    import torch

    from ffnx.export.torch_export import export_onnx
    from ffnx.models import zoo

    for name in ("repvgg", "mobileone"):
        spec = zoo.build(name, "tiny")
        m = optimize.onnx.load(str(export_onnx(spec, tmp_path / f"{name}.onnx")))
        feeds = [{"pixels": spec.inputs["pixels"].numpy()}]
        ref = run_model(m, feeds)
        new, rep = optimize.apply_pass(PASS, m, PassContext(feeds=feeds), ref,
                                       verify.Tolerance())  # fmt: skip
        assert rep["status"] == "applied" and op_counts(new)["Add"] == 0, rep
        with torch.no_grad():
            r = spec.module.reparameterize()(spec.inputs["pixels"]).numpy()
        np.testing.assert_allclose(run_model(new, feeds)[0]["logits"], r,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
