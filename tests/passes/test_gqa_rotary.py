"""gqa_rotary: the rotary tables group_query_attention feeds GQA's fused rotary are the graph's
own cos/sin at every position, and only when they are an elementwise function of position_ids.
(End to end, fused into GQA: tests/runtime/test_generate.py.)"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from ffnx.graph.builder import Builder, i64
from ffnx.passes import gqa_rotary

H = 4  # half the head dim


def rotary_graph(kind: str = "elementwise") -> tuple[gs.Graph, gs.Node]:
    """position_ids [B, S] -> angles = position x inv_freq (+ a term by `kind`) -> cos/sin
    tables [B*S, H] -> RotaryEmbedding(x [B, S, 2H], rows, C, S)."""
    pos = gs.Variable("position_ids", np.int64, ["B", "S"])
    ids = gs.Variable("input_ids", np.int64, ["B", "S"])
    x = gs.Variable("x", np.float32, ["B", "S", 2 * H])
    g = gs.Graph(inputs=[pos, ids, x], opset=18)
    b = Builder(g, "t")
    inv = (1.0 / 10000 ** (np.arange(H) / H)).astype(np.float32)
    ang = b.op("Mul", b.op("Unsqueeze", b.op("Cast", pos, to=1), i64(-1)), inv)
    if kind == "longest":  # dynamic-NTK-like: depends on the largest position
        top = b.op("ReduceMax", b.op("Cast", pos, to=1), keepdims=0)
        ang = b.op("Mul", ang, b.op("Add", top, 1.0))
    if kind == "other_input":
        ang = b.op("Add", ang, b.op("Unsqueeze", b.op("Cast", ids, to=1), i64(-1)))
    c, s = (b.op("Reshape", b.op(op, ang), i64(-1, H)) for op in ("Cos", "Sin"))
    rows = b.op("ReduceProd", b.op("Shape", pos), keepdims=0)
    r = b.op("Expand", b.op("Reshape", b.op("Range", i64(0).reshape(()), rows,
                                               i64(1).reshape(())), b.op("Shape", pos)),
             b.op("Shape", pos))  # fmt: skip
    out = gs.Variable("y", np.float32)
    rot = gs.Node("RotaryEmbedding", inputs=[x, r, c, s], outputs=[out], domain="com.microsoft")
    g.nodes.append(rot)
    g.outputs = [out]
    return g, rot


def test_tables_are_the_graphs_cos_sin_at_every_position():
    g, rot = rotary_graph()
    assert gqa_rotary.rotary_of(rot.outputs[0]) is rot
    cos, sin = gqa_rotary.tables(g, rot, 50, {})
    inv = (1.0 / 10000 ** (np.arange(H) / H)).astype(np.float32)
    ang = np.arange(50, dtype=np.float32)[:, None] * inv
    assert cos.shape == sin.shape == (50, H) and cos.dtype == np.float32
    np.testing.assert_allclose(cos, np.cos(ang), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(ang), atol=1e-6)


@pytest.mark.parametrize("kind, why", [
    ("longest", "not an elementwise function of position_ids"),
    ("other_input", "read input_ids, not only position_ids"),
])  # fmt: skip
def test_tables_refuse_cos_sin_that_are_not_per_position(kind, why):
    g, rot = rotary_graph(kind)
    got = gqa_rotary.tables(g, rot, 50, {})
    assert isinstance(got, str) and why in got


def test_tables_need_a_maximum_length_and_are_cached_per_pair():
    g, rot = rotary_graph()
    assert "no maximum length" in gqa_rotary.tables(g, rot, None, {})
    cache: dict = {}
    first = gqa_rotary.tables(g, rot, 16, cache)
    assert gqa_rotary.tables(g, rot, 16, cache) is first and len(cache) == 1


def test_a_rotary_not_built_by_the_rotary_pass_is_not_taken():
    g, rot = rotary_graph()
    rot.inputs[1] = g.inputs[0]  # real position ids into a cos cache: not this pass's layout
    assert gqa_rotary.rotary_of(rot.outputs[0]) is None
    rot.inputs[1] = g.inputs[0]
    rot.attrs["interleaved"] = 1
    assert gqa_rotary.rotary_of(rot.outputs[0]) is None
