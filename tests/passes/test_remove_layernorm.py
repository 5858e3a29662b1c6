"""remove_layernorm (approximate): every LayerNorm/RMSNorm becomes a fixed scale calibrated on
the feeds; the error is reported and the driver refuses the pass above --max-error."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from ffnx.errors import PassError
from ffnx.passes import PassContext
from ffnx.passes.optimize import optimize_model
from ffnx.passes.remove_layernorm import PASS

from .helpers import apply, assert_close, check_unchanged, model, op_counts, rand, run

NAME = "remove_layernorm"
D = 8

GRAPH = """
agraph (float[N, 8] x{inputs}) => (float[N, 8] y)
{{
    axes = Constant <value = int64[1] {{-1}}> ()
    two = Constant <value = float {{2.0}}> ()
    eps = Constant <value = float {{1e-6}}> ()
    n1 = LayerNormalization <axis: int = -1, epsilon: float = 1e-5> (x, {g1}, b1)
    f1 = MatMul(n1, w1)
    h1 = Add(x, f1)
    p = Pow(h1, two)
    v = ReduceMean(p, axes)
    ve = Add(v, eps)
    s = Sqrt(ve)
    r = Reciprocal(s)
    n2 = Mul(h1, r)
    n2g = Mul(n2, g2)
    y = MatMul(n2g, w2)
}}
"""


def _model(g1="g1", inputs=""):
    """A LayerNormalization op, then an RMSNorm as the exporter writes it (Reciprocal form)."""
    inits = {"g1": rand(D, lo=0.5, hi=1.5), "b1": rand(D, seed=1), "w1": rand(D, D, seed=2),
             "g2": rand(D, seed=3, lo=0.5, hi=1.5), "w2": rand(D, D, seed=4)}  # fmt: skip
    return model(GRAPH.format(g1=g1, inputs=inputs), inits)


FEEDS = [{"x": rand(16, D, seed=5, lo=-2, hi=2)}, {"x": rand(9, D, seed=6, lo=-1, hi=3)}]


def test_applies_under_loose_max_error_and_reports_it():
    m = _model()
    new, rep = apply(NAME, m, FEEDS, max_error=10.0)
    assert rep["status"] == "applied" and rep["applied"] == 2, rep
    notes = rep["notes"]
    assert 1e-4 < notes["max_abs"] < 10.0 and 0.5 < notes["cosine"] < 1.0
    assert notes["max_abs"] == pytest.approx(rep["error"]["max_abs"], rel=1e-3)
    assert len(notes["scales"]) == 2 and all(s > 0 for s in notes["scales"].values())
    ops = op_counts(new)
    assert "LayerNormalization" not in ops and "Sqrt" not in ops and "Reciprocal" not in ops
    assert ops["ReduceMean"] == 1 and ops["Sub"] == 1  # the LayerNorm keeps its mean


def test_refused_under_tight_max_error():
    with pytest.raises(PassError, match=r"remove_layernorm refused: outputs changed: .*"
                                        r"exceeds the maximum error 0.001"):  # fmt: skip
        optimize_model(_model(), FEEDS, passes=[NAME], max_error=1e-3)


ONE = """
agraph (float[N, 8] x) => (float[N, 8] y)
{{
    {norm}
    y = MatMul(n, w)
}}
"""
NORMS = {
    "layernorm": "n = LayerNormalization <axis: int = -1, epsilon: float = 1e-5> (x, g, b)",
    "rmsnorm": "two = Constant <value = float {2.0}> ()\n    axes = Constant <value = int64[1] "
    "{-1}> ()\n    eps = Constant <value = float {1e-5}> ()\n    p = Pow(x, two)\n"
    "    v = ReduceMean(p, axes)\n    ve = Add(v, eps)\n    s = Sqrt(ve)\n    d = Div(x, s)\n"
    "    ng = Mul(d, g)\n    n = Add(ng, b)",
}


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_exact_when_every_token_has_the_same_scale(kind):
    """Rows with one common std (LayerNorm) / rms (RMSNorm): the fixed scale is exact."""
    inits = {"g": rand(D, lo=0.5, hi=1.5), "b": rand(D, seed=1), "w": rand(D, D, seed=2)}
    m = model(ONE.format(norm=NORMS[kind]), inits)
    x = rand(12, D, seed=3, lo=-2, hi=2).astype(np.float64)
    x += np.linspace(-3, 3, 12)[:, None]  # different means per token
    c = x - x.mean(-1, keepdims=True) if kind == "layernorm" else x
    x = (c / np.sqrt((c * c).mean(-1, keepdims=True)) * 1.7 + (x - c)).astype(np.float32)
    feeds = [{"x": x}]
    new, rep = apply(NAME, m, feeds, max_error=1e-4)
    assert rep["status"] == "applied" and rep["notes"]["max_abs"] < 1e-5
    assert_close(run(m, feeds[0]), run(new, feeds[0]), rtol=1e-5, atol=1e-5)


def test_without_calibration_feeds_nothing_is_rewritten():
    g = gs.import_onnx(_model())
    res = PASS.apply(g, PassContext())
    assert res.matched == 2 and res.applied == 0
    assert {r for _, r in res.skipped} == {"no calibration feeds"}


def test_calibration_run_failure_skips_with_the_reason():
    g = gs.import_onnx(_model())
    res = PASS.apply(g, PassContext(feeds=[{"not_x": rand(2, D)}]))
    assert res.applied == 0 and len(res.skipped) == 2
    assert all("cannot run the graph on the calibration feeds" in r for _, r in res.skipped)


def test_non_constant_gamma_is_not_a_norm_site():
    m = _model(g1="gin", inputs=", float[8] gin")
    feeds = [{"x": f["x"], "gin": rand(D, seed=9)} for f in FEEDS]
    new, rep = apply(NAME, m, feeds, max_error=10.0)
    assert rep["applied"] == 1 and op_counts(new)["LayerNormalization"] == 1


def test_unmatched_graph_unchanged():
    m = model(
        "agraph (float[N, 8] x) => (float[N, 8] y) { h = MatMul(x, w)\n y = Add(h, x) }",
        {"w": rand(D, D)},
    )
    rep = check_unchanged(NAME, m, [{"x": rand(2, D)}], max_error=1.0)
    assert rep["status"] == "no_match"
