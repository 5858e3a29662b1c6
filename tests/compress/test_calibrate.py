"""Calibration statistics on a briefly trained ReLU FFN (genuinely sparse activations).

`trained_relu_model` is shared with the sparsify/moefy tests (imported from here): two
residual ReLU FFN blocks x + fc2(relu(fc1(x))) trained in numpy (Adam, L1 on the hidden
activations) to imitate a sparse random teacher, written as ONNX text + initializers.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ffnx import artifact
from ffnx.compress.calibrate import LEVELS, Calibration, calibrate_model, run_with_outputs
from ffnx.errors import PassError

D, H, BLOCKS = 16, 64, 2


def _teacher(rng):
    w1 = rng.standard_normal((BLOCKS, D, H)) / np.sqrt(D)
    w2 = rng.standard_normal((BLOCKS, H, D)) / np.sqrt(H)
    return w1, -0.8 * np.ones((BLOCKS, H)), w2  # negative bias: ~20% of teacher units fire


def _forward(params, x):
    """-> y, per-block (input, pre-activation, activation)."""
    w1, b1, w2, b2 = params
    cache = []
    for i in range(len(w1)):
        pre = x @ w1[i] + b1[i]
        a = np.maximum(pre, 0)
        cache.append((x, pre, a))
        x = x + a @ w2[i] + b2[i]
    return x, cache


@functools.lru_cache(maxsize=1)
def trained_weights(steps: int = 250, l1: float = 2e-3, seed: int = 0):
    """(w1 [B, D, H], b1 [B, H], w2 [B, H, D], b2 [B, D]) after `steps` of Adam."""
    rng = np.random.default_rng(seed)
    tw1, tb1, tw2 = _teacher(rng)
    params = [
        rng.standard_normal((BLOCKS, D, H)) / np.sqrt(D),
        np.zeros((BLOCKS, H)),
        rng.standard_normal((BLOCKS, H, D)) / np.sqrt(H) * 0.1,
        np.zeros((BLOCKS, D)),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        x = rng.standard_normal((128, D))
        target, _ = _forward((tw1, tb1, tw2, np.zeros((BLOCKS, D))), x)
        y, cache = _forward(params, x)
        gy = 2 * (y - target) / y.size
        grads = [np.zeros_like(p) for p in params]
        for i in reversed(range(BLOCKS)):
            xi, pre, a = cache[i]
            grads[2][i], grads[3][i] = a.T @ gy, gy.sum(0)
            ga = gy @ params[2][i].T + l1 * np.sign(a) / a.size
            gp = ga * (pre > 0)
            grads[0][i], grads[1][i] = xi.T @ gp, gp.sum(0)
            gy = gy + gp @ params[0][i].T
        for p, g, mi, vi in zip(params, grads, m, v):
            mi[:] = 0.9 * mi + 0.1 * g
            vi[:] = 0.999 * vi + 0.001 * g * g
            p -= 3e-3 * (mi / (1 - 0.9**step)) / (np.sqrt(vi / (1 - 0.999**step)) + 1e-8)
    return tuple(p.astype(np.float32) for p in params)


def trained_relu_model() -> onnx.ModelProto:
    """The trained blocks as the exporter writes them: MatMul + Add (bias), Relu, residual."""
    w1, b1, w2, b2 = trained_weights()
    lines, inits, x = [], {}, "x"
    for i in range(BLOCKS):
        lines += [
            f"h{i} = MatMul({x}, w1_{i})",
            f"hb{i} = Add(h{i}, b1_{i})",
            f"a{i} = Relu(hb{i})",
            f"o{i} = MatMul(a{i}, w2_{i})",
            f"ob{i} = Add(o{i}, b2_{i})",
            f"r{i} = Add({x}, ob{i})",
        ]
        inits.update({f"w1_{i}": w1[i], f"b1_{i}": b1[i], f"w2_{i}": w2[i], f"b2_{i}": b2[i]})
        x = f"r{i}"
    lines.append(f"y = Identity({x})")
    text = (
        '<ir_version: 8, opset_import: ["" : 18]>\n'
        f"ffn (float[T, {D}] x) => (float[T, {D}] y) {{\n  " + "\n  ".join(lines) + "\n}"
    )
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(model)
    return model


def relu_feeds(n: int = 2, tokens: int = 128, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((tokens, D)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def calib() -> Calibration:
    return calibrate_model(trained_relu_model(), relu_feeds(), max_tokens=200)


def test_calibration_records_each_ffn_with_per_channel_quantiles(calib):
    assert [s.tensor for s in calib.layers] == ["a0", "a1"]
    assert [s.input for s in calib.layers] == ["x", "r0"]
    assert calib.tokens == 256
    outs = run_with_outputs(trained_relu_model(), relu_feeds(), ["a0", "a1"])
    for i, s in enumerate(calib.layers):
        assert (s.activation, s.gated, s.D, s.H) == ("relu", False, D, H)
        assert s.quantiles.shape == (len(LEVELS), H) and s.x.shape == (200, D)
        assert np.all(np.diff(s.quantiles, axis=0) >= 0)  # a CDF per channel
        # the sampled tokens are real rows of the FFN input, the quantiles of real |a|
        a = np.concatenate([o[f"a{i}"] for o in outs])
        assert np.all(s.quantiles[-1] <= np.abs(a).max(0) + 1e-6)
        np.testing.assert_allclose(s.mean_abs, np.abs(a).mean(0), rtol=0.35, atol=1e-2)


def test_training_made_activations_sparse_and_thresholds_hit_the_target(calib):
    for s in calib.layers:
        assert s.near_zero > 0.4, s.near_zero  # ReLU trained with L1: mostly inactive
        x = s.x.astype(np.float64)
        w1, b1, _, _ = trained_weights()
        a = np.maximum(x @ w1[int(s.key[1:])] + b1[int(s.key[1:])], 0)
        for target in (0.5, 0.8, 0.9):
            dropped = (np.abs(a) <= s.threshold(target)).mean()
            assert dropped >= target - 0.02, (target, dropped)


def test_save_load_roundtrip(calib, tmp_path):
    path = tmp_path / "calibration.npz"
    artifact.write_bytes_atomic(path, calib.to_bytes())
    back = Calibration.load(path)
    assert back.meta() == calib.meta()
    for a, b in zip(calib.layers, back.layers):
        np.testing.assert_array_equal(a.quantiles, b.quantiles)
        np.testing.assert_array_equal(a.x, b.x)
    assert json.loads(str(np.load(path)["meta"]))["layers"][0]["tensor"] == "a0"


def test_no_ffn_is_a_one_line_error():
    header = '<ir_version: 8, opset_import: ["" : 18]>\n'
    text = header + "g (float[2] x) => (float[2] y) { y = Relu(x) }"
    with pytest.raises(PassError, match="no FFN"):
        calibrate_model(onnx.parser.parse_model(text), [{"x": np.ones(2, np.float32)}])


@functools.lru_cache(maxsize=2)
def zoo_model(name: str) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """A tiny zoo model exported once per test session, with the pipeline's sample feeds."""
    import tempfile
    from pathlib import Path

    from ffnx.export.pipeline import sample_feeds
    from ffnx.export.torch_export import DEFAULT_OPSET, export_onnx
    from ffnx.models import zoo

    spec = zoo.build(name, "tiny")
    path = Path(tempfile.mkdtemp(prefix="ffnx-zoo-")) / "model.onnx"
    export_onnx(spec, path, DEFAULT_OPSET)
    return onnx.load(str(path)), sample_feeds(spec)


@pytest.mark.slow  # exports a zoo model with torch
def test_zoo_gated_model_calibrates_every_layer():
    model, feeds = zoo_model("gpt-swiglu")
    calib = calibrate_model(model, feeds)
    assert len(calib.layers) == 2  # tiny: 2 blocks
    for s in calib.layers:
        assert s.gated and s.activation == "silu" and (s.D, s.H) == (64, 176)
        assert s.x.shape[1] == 64 and np.all(np.isfinite(s.quantiles))
