"""MoEfication of the trained ReLU FFN: exact with every expert on, reported error otherwise,
the emitted FfnxMoE against a numpy reference of the schema, and the CLI on an artifact."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ffnx import artifact
from ffnx.compress import moefy as moefy_mod
from ffnx.compress.calibrate import calibrate_model, run_with_outputs
from ffnx.compress.moefy import SPREAD, balanced_kmeans, moefy_model, output_error
from ffnx.plugins.schema import MOE
from tests.compress.test_calibrate import D, H, relu_feeds, trained_relu_model, trained_weights


@pytest.fixture(scope="module")
def calib():
    return calibrate_model(trained_relu_model(), relu_feeds(n=4, tokens=256))


def test_all_experts_on_is_the_dense_ffn(calib):
    m = trained_relu_model()
    new, rep = moefy_model(m, calib, experts=8, top_k=8)
    onnx.checker.check_model(new)
    ops = Counter(n.op_type for n in new.graph.node)
    assert ops["FfnxMoE"] == 2 and ops["Relu"] == 0
    err = output_error(m, new, relu_feeds(seed=9))
    assert err["rel_l2"] < 5 * SPREAD and err["cosine"] > 1 - 1e-9  # weights are 1 within SPREAD
    assert [layer["router_recall"] for layer in rep["layers"]] == [1.0, 1.0]


def test_top_k_uses_a_fraction_of_the_parameters_and_reports_its_error(calib):
    m = trained_relu_model()
    new, rep = moefy_model(m, calib, experts=8, top_k=2)
    router = D * 8
    assert rep["ffn_params_used_per_token"] == pytest.approx(0.25 + router / (2 * D * H), abs=1e-4)
    feeds = relu_feeds(seed=9)
    err = output_error(m, new, feeds)
    assert 0.0 < err["rel_l2"] < 0.45 and err["cosine"] > 0.9
    for layer in rep["layers"]:
        assert (layer["experts"], layer["expert_width"], layer["top_k"]) == (8, H // 8, 2)
        assert layer["router_recall"] > 0.6 and layer["output_norm_kept"] > 0.4


def test_coactivation_clustering_beats_a_random_split(calib, monkeypatch):
    m, feeds = trained_relu_model(), relu_feeds(seed=9)
    clustered = output_error(m, moefy_model(m, calib, 8, 2)[0], feeds)["rel_l2"]
    rng = np.random.default_rng(0)
    monkeypatch.setattr(
        moefy_mod, "coactivation_groups", lambda h, e, k, seed=0: rng.permutation(H).reshape(e, -1)
    )
    randoms = [output_error(m, moefy_model(m, calib, 8, 2)[0], feeds)["rel_l2"] for _ in range(2)]
    assert clustered < 0.9 * min(randoms), (clustered, randoms)


def moe_reference(x, w1, b1, w2, wr_t, br, k, scale):
    """FfnxMoE as the schema defines it (scoring topk_softmax, relu experts), in float64."""
    x = x.astype(np.float64)
    s = x @ wr_t + br
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    v = np.take_along_axis(s, idx, 1)
    gate = np.exp(v - v.max(1, keepdims=True))
    gate = scale * gate / gate.sum(1, keepdims=True)
    y = np.zeros((len(x), w2.shape[1]))
    for t in range(len(x)):
        for j, e in enumerate(idx[t]):
            h = np.maximum(w1[e] @ x[t] + b1[e], 0)
            y[t] += gate[t, j] * (w2[e] @ h)
    return y


def test_emitted_node_matches_the_schema_reference(calib):
    m = trained_relu_model()
    new, _ = moefy_model(m, calib, experts=4, top_k=2)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in new.graph.initializer}
    node = next(n for n in new.graph.node if n.op_type == "FfnxMoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["scoring"] == b"topk_softmax" and attrs["routed_scaling_factor"] == 2.0
    assert attrs["activation"] == b"relu" and attrs["top_k"] == 2 and attrs["num_experts"] == 4
    names = dict(zip([p.name for p in MOE.inputs], node.input))
    router = next(n for n in new.graph.node if n.output[0] == names["router_logits"])
    mm = next(n for n in new.graph.node if n.output[0] == router.input[0])
    w1, b1, w2 = (init[names[k]] for k in ("fc1_weight", "fc1_bias", "fc2_weight"))
    assert w1.shape == (4, H // 4, D) and w2.shape == (4, D, H // 4)
    feeds = relu_feeds(n=1, seed=4)
    (out,) = run_with_outputs(new, feeds, [node.output[0]])
    ref = moe_reference(feeds[0]["x"], w1, b1, w2, init[mm.input[1]], init[router.input[1]], 2, 2)
    np.testing.assert_allclose(out[node.output[0]], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the experts partition the dense FFN's channels: same parameters, regrouped
    dw1, db1, _, _ = trained_weights()
    rows = {tuple(r) for r in w1.reshape(-1, D)}
    assert rows == {tuple(r) for r in dw1[0].T} and sorted(b1.ravel()) == sorted(db1[0])


def test_balanced_kmeans_recovers_planted_groups():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 8)) * 5
    truth = rng.permutation(np.repeat(np.arange(4), 16))
    labels = balanced_kmeans(centers[truth] + 0.1 * rng.standard_normal((64, 8)), 4)
    assert np.bincount(labels).tolist() == [16] * 4
    pairs = {(int(t), int(lab)) for t, lab in zip(truth, labels)}
    assert len(pairs) == 4  # a bijection between planted and found groups


def test_gated_ffn_with_all_experts_is_exact():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    ffn (float[T, 8] x) => (float[T, 8] y) {
      g = MatMul(x, wg)
      s = Sigmoid(g)
      a = Mul(g, s)
      u = MatMul(x, wu)
      h = Mul(a, u)
      y = MatMul(h, wd)
    }"""
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model(text)
    for name, shape in (("wg", (8, 32)), ("wu", (8, 32)), ("wd", (32, 8))):
        w = rng.standard_normal(shape).astype(np.float32)
        m.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    feeds = [{"x": rng.standard_normal((64, 8)).astype(np.float32)}]
    new, rep = moefy_model(m, calibrate_model(m, feeds), experts=4, top_k=4)
    node = next(n for n in new.graph.node if n.op_type == "FfnxMoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["activation"] == b"swiglu"
    assert output_error(m, new, feeds)["rel_l2"] < 5 * SPREAD


def invoke(*args):
    from ffnx.cli import FfnxGroup
    from ffnx.commands.sparsity import COMMANDS

    group = FfnxGroup("ffnx", commands={c.name: c for c in COMMANDS})
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False, obj={})


def test_cli_calibrate_then_moefy(tmp_path, mlp_artifact):
    art = tmp_path / "mlp"
    shutil.copytree(mlp_artifact, art)
    r = invoke("moefy", art, "--experts", "4", "--top-k", "2")
    assert r.exit_code == 1 and r.output.strip().endswith(f"run `ffnx calibrate {art}` first")
    r = invoke("calibrate", art, "--samples", "2")
    assert r.exit_code == 0, r.output
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["calibration"]["model"] == "model.onnx"
    assert manifest["calibration"]["layers"][0]["H"] == 32
    artifact.check_integrity(art, manifest)
    r = invoke("moefy", art, "--experts", "4", "--top-k", "1", "--max-error", "1e-9")
    assert r.exit_code == 1 and "moefy refused: max abs error" in r.output
    assert not (art / "model.opt.onnx").exists()
    r = invoke("moefy", art, "--experts", "4", "--top-k", "4")
    assert r.exit_code == 0, r.output
    manifest = json.loads((art / "manifest.json").read_text())
    rep = manifest["moefy"]
    assert rep["error"]["rel_l2"] < 5 * SPREAD and rep["source"] == "model.onnx"
    artifact.check_integrity(art, manifest)
    opt = onnx.load(str(art / "model.opt.onnx"))
    assert [n.op_type for n in opt.graph.node].count("FfnxMoE") == 1
    r = invoke("moefy", art, "--experts", "5", "--top-k", "1")
    assert r.exit_code == 1 and "32 channels do not split into 5 equal experts" in r.output


@pytest.mark.slow  # exports a zoo model with torch
def test_zoo_swiglu_model():
    from tests.compress.test_calibrate import zoo_model

    m, feeds = zoo_model("gpt-swiglu")
    calib = calibrate_model(m, feeds)
    exact, _ = moefy_model(m, calib, experts=8, top_k=8)
    assert output_error(m, exact, feeds)["rel_l2"] < 5 * SPREAD
    new, rep = moefy_model(m, calib, experts=8, top_k=4)
    assert [n.op_type for n in new.graph.node].count("FfnxMoE") == 2
    err = output_error(m, new, feeds)
    assert err["cosine"] > 0.9 and rep["ffn_params_used_per_token"] < 0.55
