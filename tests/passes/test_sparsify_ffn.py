"""sparsify_ffn: a trained ReLU FFN (sparse activations) and gated FFNs written as the exporter
writes them; the pass is run the way the driver runs approximate passes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from ffnx.compress.calibrate import calibrate_model, run_with_outputs
from ffnx.errors import PassError
from ffnx.graph import lowering_meta
from ffnx.lowering import run_model
from ffnx.passes import PassContext
from ffnx.passes.optimize import apply_pass, approximate_tolerance
from ffnx.passes.sparsify_ffn import PASS
from ffnx.plugins.schema import SPARSE_FFN
from tests.compress.test_calibrate import H, relu_feeds, trained_relu_model, trained_weights
from tests.lowering.sparse_reference import sparse_ffn_np as sparse_ffn_reference

from .helpers import model, rand


def sparsify(m, feeds, max_error, **options):
    """The driver's approximate branch (optimize_model) for this one pass."""
    ctx = PassContext(feeds=feeds, max_error=max_error, options=options)
    ref = run_model(m, feeds)
    new, rep = apply_pass(PASS, m, ctx, ref, approximate_tolerance(max_error))
    if rep["status"] == "rolled_back":
        raise PassError(f"sparsify_ffn refused: {rep['reason']} exceeds --max-error {max_error}")
    return new, rep


def max_abs(m_ref, m_new, feeds) -> float:
    ref, new = run_model(m_ref, feeds), run_model(m_new, feeds)
    return max(float(np.abs(r["y"] - n["y"]).max()) for r, n in zip(ref, new))


def ops(m) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def test_search_finds_the_sparsest_level_within_max_error():
    m, feeds = trained_relu_model(), relu_feeds()
    new, rep = sparsify(m, feeds, 0.05, sparse_lowering="node")
    notes = rep["notes"]
    assert rep["status"] == "applied" and rep["applied"] == 2
    assert ops(new)["FfnxSparseFFN"] == 2 and ops(new)["Relu"] == 0
    onnx.checker.check_model(new)
    s = notes["sparsity"]
    assert s >= 0.4 and notes["max_abs_error"] <= 0.05 and rep["error"]["max_abs"] <= 0.05
    worse = [e for k, e in notes["errors_by_sparsity"].items() if float(k) > s]
    assert worse and min(worse) > 0.95 * 0.05  # the next level up was measured and too coarse
    assert all(1 - layer["kept"] >= s - 0.02 for layer in notes["layers"])
    # independent of the pass's own bookkeeping: fresh inputs stay close too
    assert max_abs(m, new, relu_feeds(seed=7)) < 0.2


def test_lowered_for_ort_by_measurement_and_tagged():
    m, feeds = trained_relu_model(), relu_feeds()
    new, rep = sparsify(m, feeds, 0.05)
    assert not any(n.domain == "ffnx" for n in new.graph.node)
    lowering = rep["notes"]["lowering"]
    assert len(lowering) == 2 and {"dense", "gather", "compress"} == set(lowering[0]["us"])
    records = lowering_meta.read(new)
    assert [r["pass"] for r in records] == ["sparsify_ffn"] * 2
    assert [(r["layer"], r["choice"]) for r in records] == [
        (x["node"], x["form"]) for x in lowering
    ]
    assert max_abs(m, new, feeds) <= 0.05


def test_explicit_sparsity_above_max_error_is_refused():
    m, feeds = trained_relu_model(), relu_feeds()
    with pytest.raises(PassError, match="refused"):
        sparsify(m, feeds, 1e-3, sparsity=0.95)


def test_topk_mode_keeps_k_channels_per_token():
    m, feeds = trained_relu_model(), relu_feeds()
    new, rep = sparsify(m, feeds, 0.1, sparse_mode="topk", sparsity=0.5, sparse_lowering="node")
    assert ops(new)["FfnxSparseFFN"] == 2 and rep["notes"]["mode"] == "topk"
    for n in new.graph.node:
        if n.op_type == "FfnxSparseFFN":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["mode"] == b"topk" and attrs["k"] == H // 2
    assert rep["error"]["max_abs"] <= 0.1


def test_given_calibration_is_used():
    m, feeds = trained_relu_model(), relu_feeds()
    calib = calibrate_model(m, feeds)
    calib.layers[0].quantiles[:] = 1e9  # drop every channel of block 0: visible in `kept`
    _, rep = sparsify(m, feeds, 10.0, sparsity=0.5, calibration=calib, sparse_lowering="node")
    assert rep["notes"]["layers"][0]["kept"] == 0.0 and rep["notes"]["layers"][1]["kept"] > 0


GATED = """
ffn (float[T, 8] x) => (float[T, 8] y) {
  g = MatMul(x, wg)
  s = Sigmoid(g)
  a = Mul(g, s)
  u = MatMul(x, wu)
  h = Mul(a, u)
  y = MatMul(h, wd)
}"""


def gated_inits(seed: int = 0) -> dict:
    return {"wg": rand(8, 32, seed=seed), "wu": rand(8, 32, seed=seed + 1), "wd": rand(32, 8)}


def test_gated_ffn_keeps_dense_gate_and_matches_its_reference():
    m = model(GATED, gated_inits())
    feeds = [{"x": rand(64, 8, seed=3)}]
    new, rep = sparsify(m, feeds, 10.0, sparsity=0.5, sparse_lowering="node")
    (node,) = [n for n in new.graph.node if n.op_type == "FfnxSparseFFN"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["activation"] == b"swiglu" and attrs["mode"] == b"threshold"
    w = {i.name.split("/")[-1]: onnx.numpy_helper.to_array(i) for i in new.graph.initializer}
    inits = gated_inits()
    np.testing.assert_array_equal(w["w_gate"], inits["wg"].T)  # [H, D]: dense gate kept
    np.testing.assert_array_equal(w["w_up"], inits["wu"].T)
    ref = sparse_ffn_reference(
        feeds[0]["x"], w["w_up"], w["w_down"], activation="swiglu",
        thresholds=w["thresholds"], w_gate=w["w_gate"],
    )  # fmt: skip
    got = run_model(new, feeds)[0]["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert 0.4 <= 1 - rep["notes"]["layers"][0]["kept"] <= 0.55


@pytest.mark.parametrize(
    "text, reason",
    [
        (
            GATED.replace("g = MatMul(x, wg)", "g0 = MatMul(x, wg)\n  g = Add(g0, bg)"),
            "gate/up bias",
        ),
        (GATED.replace("(float[T, 8] y)", "(float[T, 8] y, float[T, 32] a)"), "outside"),
        (
            GATED.replace("s = Sigmoid(g)\n  a = Mul(g, s)", 'a = Gelu<approximate="tanh">(g)'),
            "gelu_tanh",
        ),
    ],
    ids=["gate_bias", "hidden_used_outside", "tanh_gelu"],
)
def test_skips_with_reason(text, reason):
    inits = {**gated_inits(), "bg": rand(32)}
    m = model(text, inits if "bg" in text else gated_inits(), opset=20)
    new, rep = sparsify(m, [{"x": rand(16, 8)}], 1.0, sparsity=0.5)
    assert rep["applied"] == 0 and rep["matches"] == 1 and new is m
    assert reason in rep["skipped"][0]["reason"]


def test_needs_sparsity_or_max_error():
    m, feeds = trained_relu_model(), relu_feeds(n=1)
    with pytest.raises(PassError, match="max-error"):
        PASS.apply(gs.import_onnx(m), PassContext(feeds=feeds))


def test_weights_layout_follows_the_schema():
    m, feeds = trained_relu_model(), relu_feeds(n=1)
    new, _ = sparsify(m, feeds, 10.0, sparsity=0.6, sparse_lowering="node")
    w1, b1, w2, b2 = trained_weights()
    init = {i.name: onnx.numpy_helper.to_array(i) for i in new.graph.initializer}
    node = next(n for n in new.graph.node if n.op_type == "FfnxSparseFFN")
    names = dict(zip([p.name for p in SPARSE_FFN.inputs], node.input))
    assert names["hidden"] == "x" and names["w_gate"] == ""
    np.testing.assert_array_equal(init[names["w_up"]], w1[0].T)
    np.testing.assert_array_equal(init[names["b_up"]], b1[0])
    np.testing.assert_array_equal(init[names["w_down"]], w2[0].T)
    np.testing.assert_array_equal(init[names["b_down"]], b2[0])
    (got,) = run_with_outputs(new, feeds, [node.output[0]])
    x = feeds[0]["x"]
    ref = sparse_ffn_reference(
        x, w1[0].T, w2[0].T, activation="relu", thresholds=init[names["thresholds"]],
        b_up=b1[0], b_down=b2[0],
    )  # fmt: skip
    np.testing.assert_allclose(got[node.output[0]], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # exports a zoo model with torch
def test_zoo_swiglu_model_within_max_error():
    from tests.compress.test_calibrate import zoo_model

    m, feeds = zoo_model("gpt-swiglu")
    new, rep = sparsify(m, feeds, 0.05, sparse_lowering="gather")
    assert rep["applied"] == 2 and rep["error"]["max_abs"] <= 0.05
    assert rep["notes"]["sparsity"] >= 0.1
    assert {x["form"] for x in rep["notes"]["lowering"]} == {"gather"}
    assert not any(n.domain == "ffnx" for n in new.graph.node)
