"""residual_sum: the residual Add read by a LayerNormalization becomes Sum, bit-identical, and
ORT CPU then runs Add + LayerNormalization instead of SkipLayerNormalization; bias Adds, other
norms' inputs and graphs without LayerNormalization are left byte-identical."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .helpers import check_applied, check_unchanged, model, op_counts, ort_kernels, rand

NAME = "residual_sum"
D = 8
INITS = {"w": rand(D, D), "b": rand(D, seed=1), "g": rand(D, seed=2, lo=0.5, hi=1.5),
         "be": rand(D, seed=3)}  # fmt: skip


def _residual():
    """A post-LN block: LN(x + (x·W + b)), the pattern ORT fuses into SkipLayerNormalization."""
    return model(
        f"""g (float[B, S, {D}] x) => (float[B, S, {D}] y) {{
            p = MatMul(x, w)
            h = Add(p, b)
            r = Add(h, x)
            y = LayerNormalization <axis = -1> (r, g, be) }}""",
        INITS,
    )


def _plain(m, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


def test_residual_add_becomes_sum_bit_exactly_and_ort_keeps_layernorm(tmp_path):
    m = _residual()
    feeds = [{"x": rand(2, 3, D, seed=4)}, {"x": rand(1, 5, D, seed=5)}]
    new, rep = check_applied(NAME, m, feeds, n_applied=1)
    assert op_counts(new)["Sum"] == 1 and op_counts(new)["Add"] == 1
    for f in feeds:
        np.testing.assert_array_equal(_plain(m, f), _plain(new, f))
    assert ort_kernels(m, tmp_path)["SkipLayerNormalization"] == 1
    after = ort_kernels(new, tmp_path)
    assert after["SkipLayerNormalization"] == 0 and after["LayerNormalization"] == 1


def test_bias_add_and_graphs_without_residual_norm_are_left_alone():
    bias_only = model(
        f"""g (float[B, {D}] x) => (float[B, {D}] y) {{
            h = Add(x, b)
            y = LayerNormalization <axis = -1> (h, g, be) }}""",
        INITS,
    )
    rep = check_unchanged(NAME, bias_only, [{"x": rand(3, D)}])
    assert rep["matches"] == 1 and "constant" in rep["skipped"][0]["reason"]
    no_norm = model(
        f"""g (float[B, {D}] x) => (float[B, {D}] y) {{
            h = MatMul(x, w)
            y = Add(h, x) }}""",
        INITS,
    )
    check_unchanged(NAME, no_norm, [{"x": rand(3, D)}])
