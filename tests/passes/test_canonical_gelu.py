"""canonical_gelu: torch's erf-GELU regrouped so ONNX Runtime fuses it; bit-exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from .helpers import (
    apply,
    check_applied,
    check_unchanged,
    export,
    feeds_of,
    model,
    ort_kernels,
    rand,
)

NAME = "canonical_gelu"
D, H = 8, 32
FEEDS = feeds_of(rand(2, 3, D, seed=1, lo=-3, hi=3), rand(1, 5, D, seed=2, lo=-3, hi=3))


class GeluFFNs(nn.Module):
    """A GELU MLP (bias), a GeGLU, and a bare GELU on the input."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.gate, self.up = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.down = nn.Linear(H, D, bias=False)

    def forward(self, x):
        mlp = self.fc2(nn.functional.gelu(self.fc1(x)))
        glu = self.down(nn.functional.gelu(self.gate(x)) * self.up(x))
        return mlp + glu, nn.functional.gelu(x)


@pytest.fixture(scope="module")
def gelus():
    torch.manual_seed(0)
    return export(GeluFFNs(), torch.randn(2, 3, D), dynamic={"x": {0: "b", 1: "t"}})


def unfused(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Outputs with ORT's graph optimizations off: the graph's own math, op by op."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_exported_gelus_are_regrouped_bit_exactly(gelus, tmp_path):
    new, rep = check_applied(NAME, gelus, FEEDS, n_applied=3)  # fused by ORT: fp32-close
    for f in FEEDS:  # the regrouped graph itself gives the same bits
        for a, b in zip(unfused(gelus, f), unfused(new, f)):
            np.testing.assert_array_equal(a, b)
    before, after = ort_kernels(gelus, tmp_path), ort_kernels(new, tmp_path)
    assert before["Erf"] == 3 and before["Gelu"] + before["BiasGelu"] == 0
    assert after["Erf"] == 0 and after["Gelu"] + after["BiasGelu"] == 3, after


def test_canonical_and_other_forms_are_left_alone(gelus):
    new, _ = apply(NAME, gelus, FEEDS)
    check_unchanged(NAME, new, FEEDS)  # already regrouped
    m = model(  # x * 0.5 * (1 + erf(x * 0.7071)) : Mul instead of Div, ORT's form anyway
        """
        g (float[N, 4] x) => (float[N, 4] y) {
            s = Constant <value = float {0.70710678}> ()
            h = Constant <value = float {0.5}> ()
            one = Constant <value = float {1.0}> ()
            z = Mul(x, s)
            e = Erf(z)
            a = Add(e, one)
            p = Mul(h, a)
            y = Mul(x, p)
        }
        """
    )
    check_unchanged(NAME, m, feeds_of(rand(3, 4)))


def test_shared_intermediate_is_not_rewritten():
    """0.5·(1+erf) is also a graph output: regrouping would remove it."""
    m = model(
        """
        g (float[N, 4] x) => (float[N, 4] y, float[N, 4] p) {
            r = Constant <value = float {1.41421356}> ()
            h = Constant <value = float {0.5}> ()
            one = Constant <value = float {1.0}> ()
            z = Div(x, r)
            e = Erf(z)
            a = Add(e, one)
            p = Mul(h, a)
            y = Mul(x, p)
        }
        """
    )
    check_unchanged(NAME, m, feeds_of(rand(3, 4)))
