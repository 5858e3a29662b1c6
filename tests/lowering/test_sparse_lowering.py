"""FfnxSparseFFN lowerings against a float64 numpy reference of the schema (fixed seeds)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from ffnx.graph.ort import ort_session, run_session
from ffnx.lowering import decompose_ffnx_ops
from ffnx.lowering.sparse import (
    FORMS,
    SparseLoweringError,
    lower_sparse_ffn_nodes,
    sparse_ffn_model,
)
from ffnx.plugins.schema import GATED_ACTIVATIONS
from tests.lowering.sparse_reference import sparse_ffn_np as sparse_ffn_reference

D, H, K = 16, 64, 7
RTOL = 1e-5  # fp32 vs float64: the forms only reorder sums (relative to max |ref|)


def weights(act: str, seed: int = 0, fp16: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float16 if fp16 else np.float32)  # noqa: E731
    w = {"w_up": f(H, D), "w_down": f(D, H), "b_down": f(D)}
    if act in GATED_ACTIVATIONS:
        w["w_gate"] = f(H, D)
    else:
        w["b_up"] = f(H)
    w["thresholds"] = (np.abs(rng.standard_normal(H)) * 1.5).astype(np.float32)
    return w


def reference(x, w, act, mode):
    f = lambda k: None if w.get(k) is None else w[k].astype(np.float64)  # noqa: E731
    return sparse_ffn_reference(
        x, f("w_up"), f("w_down"), activation=act, mode=mode, thresholds=w["thresholds"], k=K,
        w_gate=f("w_gate"), b_up=f("b_up"), b_down=f("b_down"),
    )  # fmt: skip


def run(model, x):
    return run_session(ort_session(model), {"hidden": x})["output"]


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "swiglu", "geglu", "reglu"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_every_form_matches_the_reference(act, mode):
    w = weights(act)
    model = sparse_ffn_model(w, ("B", "S"), activation=act, mode=mode, k=K)
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).standard_normal((3, 5, D)).astype(np.float32)  # [*, D]
    ref = reference(x, w, act, mode)
    kept = (np.abs(ref) > 0).mean()
    assert 0 < kept  # thresholds leave some channels on
    for form in FORMS:
        lowered = lower_sparse_ffn_nodes(model, form)
        onnx.checker.check_model(lowered)
        assert not any(n.domain == "ffnx" for n in lowered.graph.node)
        got = run(lowered, x)
        assert got.shape == x.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=RTOL * np.abs(ref).max(), err_msg=form)


def test_gather_reads_only_kept_rows():
    """At batch 1 the gathered weights have exactly the kept channels' rows."""
    w = weights("swiglu")
    lowered = lower_sparse_ffn_nodes(sparse_ffn_model(w, activation="swiglu"), "gather")
    gathers = [n for n in lowered.graph.node if n.op_type == "Gather"]
    # kept margins and activations, rows of W_up [H, D], rows of W_down^T [H, D]
    assert len(gathers) == 4
    model = onnx.ModelProto()
    model.CopyFrom(lowered)
    model.graph.output.extend(onnx.ValueInfoProto(name=g.output[0]) for g in gathers)
    x = np.random.default_rng(2).standard_normal((1, D)).astype(np.float32)
    sess = ort_session(model)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"hidden": x})))
    g = x.astype(np.float64) @ w["w_gate"].T
    kept = int((np.abs(g / (1 + np.exp(-g))) > w["thresholds"]).sum())
    shapes = sorted(outs[n.output[0]].shape for n in gathers)
    assert shapes == sorted([(1, kept), (1, kept), (kept, D), (kept, D)])


@pytest.mark.parametrize("form", FORMS)
def test_empty_batch_and_nothing_kept(form):
    w = weights("relu")
    w["thresholds"][:] = 1e9
    model = lower_sparse_ffn_nodes(sparse_ffn_model(w, activation="relu"), form)
    for T in (0, 1, 4):
        x = np.ones((T, D), np.float32)
        np.testing.assert_allclose(run(model, x), np.broadcast_to(w["b_down"], (T, D)))


def test_fp16_weights_are_computed_in_fp32():
    w = weights("gelu", fp16=True)
    model = sparse_ffn_model(w, activation="gelu")
    x = np.random.default_rng(3).standard_normal((4, D)).astype(np.float32)
    ref = reference(x, w, "gelu", "threshold")
    got = run(lower_sparse_ffn_nodes(model, "gather"), x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=RTOL * np.abs(ref).max())


def test_decompose_ffnx_ops_uses_the_plain_form():
    model = sparse_ffn_model(weights("reglu"), activation="reglu")
    ops = Counter(n.op_type for n in decompose_ffnx_ops(model).graph.node)
    plain = Counter(n.op_type for n in lower_sparse_ffn_nodes(model).graph.node)
    assert ops == plain and ops["NonZero"] == 0 and ops["Where"] == 1


def test_errors_name_the_node():
    model = sparse_ffn_model(weights("relu"), activation="relu")
    with pytest.raises(SparseLoweringError, match="sparse_ffn: unknown form 'csr'"):
        lower_sparse_ffn_nodes(model, "csr")
    w = weights("relu")
    del w["thresholds"]
    with pytest.raises(SparseLoweringError, match="needs thresholds"):
        lower_sparse_ffn_nodes(sparse_ffn_model(w, activation="relu"))
    with pytest.raises(SparseLoweringError, match="needs k"):
        lower_sparse_ffn_nodes(sparse_ffn_model(weights("relu"), activation="relu", mode="topk"))
