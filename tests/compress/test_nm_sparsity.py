"""2:4 weight-sparsity report: a weight pruned to 2:4 against a dense one, per layout."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ffnx.compress.nm_sparsity import nm_stats, prune, report


def _model(text: str, inits: dict) -> onnx.ModelProto:
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 18]>\n' + text)
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(m)
    return m


TEXT = """
g (float[T, 16] x) => (float[T, 8] y) {
  h = MatMul(x, w_pruned)
  r = Relu(h)
  z = Gemm<transB = 1>(r, w_dense_t)
  y = Gemm(z, w_pruned_gemm)
}"""


def weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32)).astype(np.float32)  # [K, N]
    return {
        "w_pruned": prune(w),  # along K (axis -2)
        "w_dense_t": rng.standard_normal((8, 32)).astype(np.float32),  # [N, K] (transB)
        "w_pruned_gemm": prune(rng.standard_normal((8, 8)).astype(np.float32)),
    }


def test_pruned_weight_satisfies_2_4_and_dense_does_not():
    rows = {r["weight"]: r for r in report(_model(TEXT, weights()))}
    assert list(rows) == ["w_pruned", "w_dense_t", "w_pruned_gemm"]
    p, d = rows["w_pruned"], rows["w_dense_t"]
    assert p["satisfies"] and p["nm_fraction"] == 1.0 and p["zero_fraction"] == 0.5
    assert p["shape"] == [16, 32] and p["groups"] == 4 * 32 and p["pattern"] == "2:4"
    assert d["shape"] == [32, 8]  # transB undone: [K, N]
    assert not d["satisfies"] and d["nm_fraction"] == 0.0 and d["zero_fraction"] == 0.0
    assert rows["w_pruned_gemm"]["satisfies"]


def test_transposed_pruning_is_seen_along_k_only():
    """A weight pruned 2:4 along the output dim is not 2:4 along K."""
    w = prune(np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32), axis=-1)
    stats = nm_stats(w)
    assert not stats["satisfies"] and 0.0 < stats["nm_fraction"] < 1.0
    assert nm_stats(np.ascontiguousarray(w.T))["satisfies"]


def test_partial_fraction_and_padding():
    w = prune(np.ones((8, 4), np.float32))
    w[0, 0] = w[1, 0] = w[2, 0] = 1.0  # first group of column 0 now has 3 nonzeros
    stats = nm_stats(w)
    assert stats["nm_fraction"] == pytest.approx(7 / 8) and not stats["satisfies"]
    odd = nm_stats(np.zeros((6, 4), np.float32))  # K=6: last group zero-padded
    assert odd["satisfies"] and not odd["k_divisible"] and odd["groups"] == 2 * 4


def test_weight_on_the_left_and_dynamic_weights():
    text = """
    g (float[16, T] x, float[8, 16] w_in) => (float[8, T] y, float[8, T] y2) {
      y = MatMul(w_left, x)
      y2 = MatMul(w_in, x)
    }"""
    w_left = prune(np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32), axis=-1)
    rows = report(_model(text, {"w_left": w_left}))
    assert [r["weight"] for r in rows] == ["w_left"]  # graph-input weights are not reported
    assert rows[0]["shape"] == [16, 8] and rows[0]["satisfies"]
