"""gqa_mask: the model's additive mask is replaced by the padding-only bias only where it adds
nothing inside GQA's causal region, as shown by evaluating it. (End to end, in GQA:
tests/runtime/test_generate.py.)"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from ffnx.graph.builder import Builder, i64
from ffnx.graph.ort import run_subgraph
from ffnx.passes import gqa_mask

MIN = float(np.finfo(np.float32).min)


def mask_graph(window: int | None = None, reads_positions: bool = False) -> tuple:
    """transformers-like mask M [B, 1, S, T]: causal in cache positions (P + s), padding from
    attention_mask, optionally a sliding window (key > query - window)."""
    am = gs.Variable("attention_mask", np.int64, ["B", "T"])
    ids = gs.Variable("input_ids", np.int64, ["B", "S"])
    pos = gs.Variable("position_ids", np.int64, ["B", "S"])
    g = gs.Graph(inputs=[ids, am, pos], opset=18)
    b = Builder(g, "m")
    T = b.op("Squeeze", b.op("Shape", am, start=1, end=2), i64(0))
    S = b.op("Squeeze", b.op("Shape", ids, start=1, end=2), i64(0))
    P = b.op("Sub", T, S)
    q = b.op("Range", P, T, i64(1).reshape(()))
    if reads_positions:  # e.g. packed-sequence detection from position_ids
        q = b.op("Add", q, b.op("ReduceMin", pos, keepdims=0))
    k = b.op("Range", i64(0).reshape(()), T, i64(1).reshape(()))
    qc, kc = b.op("Unsqueeze", q, i64(1)), b.op("Unsqueeze", k, i64(0))
    keep = b.op("LessOrEqual", kc, qc)  # [S, T]
    if window is not None:
        keep = b.op("And", keep, b.op("Greater", kc, b.op("Sub", qc, i64(window).reshape(()))))
    pad = b.op("Unsqueeze", b.op("Cast", am, to=9), i64(1, 2))  # [B, 1, 1, T]
    both = b.op("And", pad, b.op("Unsqueeze", keep, i64(0, 1)))
    m = b.op("Where", both, np.float32(0.0).reshape(()), np.float32(MIN).reshape(()))
    m.dtype = np.float32
    g.outputs = [m]
    return g, m


def test_causal_padding_mask_is_replaced_by_the_padding_bias_exactly_on_the_causal_region():
    g, m = mask_graph()
    value = gqa_mask.check(g, m, 128)
    assert value == MIN
    bias = gqa_mask.padding_bias(g, value)
    am = np.array([[0, 0, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]], np.int64)
    feeds = {"attention_mask": am, "input_ids": np.zeros((2, 3), np.int64)}
    want, got = run_subgraph(g, [m, bias], feeds)
    assert got.shape == want.shape == (2, 1, 3, 6)
    causal = np.arange(6)[None, :] <= (3 + np.arange(3))[:, None]
    np.testing.assert_array_equal(got[:, 0][:, causal], want[:, 0][:, causal])
    assert not np.array_equal(got, want)  # outside the causal region they differ: GQA's business


@pytest.mark.parametrize("kwargs, max_len, why", [
    (dict(window=4), 128, "a window or chunks"),
    (dict(window=100), 128, "a window or chunks"),  # only the T = max_length probe shows it
    (dict(reads_positions=True), 128, "reads position_ids"),
    ({}, None, "no maximum length"),
])  # fmt: skip
def test_masks_that_add_to_the_causal_region_are_kept(kwargs, max_len, why):
    g, m = mask_graph(**kwargs)
    got = gqa_mask.check(g, m, max_len)
    assert isinstance(got, str) and why in got, got
