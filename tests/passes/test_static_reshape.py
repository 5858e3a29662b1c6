"""static_reshape: Reshape targets computed from shapes -> constants."""

from __future__ import annotations

import numpy as np
import onnx

from tests.passes.helpers import (
    check_applied,
    check_unchanged,
    export,
    model,
    op_counts,
    rand,
    skip_reasons,
)

# x [B, S, 32] -> [B, S, 4, 8], the target rebuilt from x's shape as exporters write it
HEADS = """
g (float[B, S, 32] x) => (float[B, S, 4, 8] y) {
    b = Shape <start = 0, end = 1> (x)
    s = Shape <start = 1, end = 2> (x)
    h = Constant <value = int64[1] {4}> ()
    d = Constant <value = int64[1] {8}> ()
    shape = Concat <axis = 0> (b, s, h, d)
    y = Reshape <allowzero = 1> (x, shape)
}
"""
FEEDS = [{"x": rand(2, 3, 32)}, {"x": rand(1, 7, 32, seed=1)}]


def _target(m: onnx.ModelProto) -> list[int]:
    r = next(n for n in m.graph.node if n.op_type == "Reshape")
    init = {t.name: t for t in m.graph.initializer}
    return onnx.numpy_helper.to_array(init[r.input[1]]).tolist()


def test_computed_target_becomes_a_constant_and_the_shape_chain_goes():
    new, _ = check_applied("static_reshape", model(HEADS), FEEDS, n_applied=1)
    assert op_counts(new) == {"Reshape": 1}
    assert _target(new) == [0, 0, 4, 8]


def test_one_unknown_dim_is_inferred_with_minus_one():
    # y [B, S*4, 8]: dim 1 is no dim of x; allowzero unset, so -1 may stand for it
    m = model(
        """
        g (float[B, S, 32] x) => (float[B, N, 8] y) {
            b = Shape <start = 0, end = 1> (x)
            m1 = Constant <value = int64[1] {-1}> ()
            d = Constant <value = int64[1] {8}> ()
            shape = Concat <axis = 0> (b, m1, d)
            y = Reshape (x, shape)
        }
        """
    )
    new, _ = check_applied("static_reshape", m, FEEDS, n_applied=1)
    assert _target(new) == [0, -1, 8]


def test_output_shape_from_data_propagation():
    m = model(HEADS, infer=False)
    m.graph.output[0].type.tensor_type.ClearField("shape")  # only the shape chain tells y's dims
    new, _ = check_applied("static_reshape", m, FEEDS, n_applied=1)
    assert _target(new) == [0, 0, 4, 8]


def test_exporters_allowzero_target_gets_no_minus_one():
    m = model(
        """
        g (float[B, S, 32] x) => (float[B, N, 8] y) {
            b = Shape <start = 0, end = 1> (x)
            s = Shape <start = 1, end = 2> (x)
            four = Constant <value = int64[1] {4}> ()
            n = Mul (s, four)
            d = Constant <value = int64[1] {8}> ()
            shape = Concat <axis = 0> (b, n, d)
            y = Reshape <allowzero = 1> (x, shape)
        }
        """
    )
    rep = check_unchanged("static_reshape", m, FEEDS)
    assert "-1 is undefined on an empty tensor" in skip_reasons(rep)


def test_unknown_dims_are_skipped_with_a_reason():
    m = model(
        """
        g (float[B, S, 32] x, int64[4] shape) => (float[P, Q, R, T] y) {
            y = Reshape (x, shape)
        }
        """
    )
    feeds = [{"x": rand(2, 3, 32), "shape": np.array([2, 3, 4, 8], np.int64)}]
    rep = check_unchanged("static_reshape", m, feeds)
    assert "neither constants nor the input's own" in skip_reasons(rep)


def test_a_torch_view_on_dynamic_dims():
    import torch

    class Heads(torch.nn.Module):
        def forward(self, x):
            b, s, _ = x.shape
            return torch.relu(x.view(b, s, 4, 8)).transpose(1, 2)

    m = export(Heads(), torch.randn(2, 3, 32), dynamic={"x": {0: "batch", 1: "seq"}})
    assert op_counts(m)["Shape"] == 2  # dynamo rebuilds (b, s) from x's shape
    new, _ = check_applied("static_reshape", m, FEEDS, n_applied=1)
    assert "Shape" not in op_counts(new) and "Concat" not in op_counts(new)
