"""fuse_attention: exported self-attention (a masked BERT-style layer with a Mul scale, an
unmasked ViT-style layer with a Div scale) -> com.microsoft Attention, equal to the graph before
it and honouring the padding mask; cross-attention, a shared intermediate and graphs without
attention are left byte-identical."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from .helpers import (
    check_applied,
    check_unchanged,
    export,
    model,
    op_counts,
    ort_kernels,
    rand,
    run,
)

NAME = "fuse_attention"
D, N = 16, 4


class Encoder(nn.Module):
    """Two attention layers: q, k, v linears, heads, scaled scores (+ additive mask), softmax,
    output projection, residual. kinds per layer: "mask" (Mul by 1/√h, mask added), "div"
    (divided by √h, no mask), "cross" (K, V read a second tensor), "expose" (the scores are
    also an output)."""

    def __init__(self, kinds=("mask", "div")):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.ModuleList(nn.Linear(D, D) for _ in kinds)
                                          for _ in range(4))  # fmt: skip
        self.kinds = kinds

    def heads(self, t):
        b, s, _ = t.shape
        return t.reshape(b, s, N, D // N).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        extra = []
        for kind, q, k, v, o in zip(self.kinds, self.q, self.k, self.v, self.o):
            kv = mask.float()[..., None] * x if kind == "cross" else x
            a = self.heads(q(x)) @ self.heads(k(kv)).transpose(-1, -2)
            a = a / math.sqrt(D // N) if kind == "div" else a * (1 / math.sqrt(D // N))
            extra += [a] if kind == "expose" else []
            p = torch.softmax(a if kind == "div" else a + bias, dim=-1)
            x = x + o((p @ self.heads(v(kv))).permute(0, 2, 1, 3).reshape(x.shape))
        return (x, *extra)


@functools.cache
def _export(kinds=("mask", "div")):
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.int64)
    dyn = {"x": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}
    return export(Encoder(kinds).eval(), x, mask, dynamic=dyn, names=("x", "mask"))


def _feeds():
    m1 = np.ones((2, 5), np.int64)
    m1[1, 3:] = 0  # a padded row: the mask matters
    m2 = np.ones((3, 7), np.int64)
    m2[0, 1:] = 0
    return [{"x": rand(2, 5, D, seed=1), "mask": m1}, {"x": rand(3, 7, D, seed=2), "mask": m2}]


def test_self_attention_becomes_one_attention_node_per_layer(tmp_path):
    m = _export()
    new, rep = check_applied(NAME, m, _feeds(), n_applied=2)
    assert op_counts(new)["Attention"] == 2 and op_counts(new)["Softmax"] == 0
    assert ort_kernels(new, tmp_path)["Attention"] == 2
    # the mask is honoured (one masked layer): changing padded tokens leaves the kept ones alone
    one = _export(("mask",))
    new1, _ = check_applied(NAME, one, _feeds(), n_applied=1)
    f = _feeds()[0]
    g = {"x": f["x"].copy(), "mask": f["mask"]}
    g["x"][1, 3:] += 5.0
    a, b = list(run(new1, f).values())[0], list(run(new1, g).values())[0]
    np.testing.assert_allclose(a[1, :3], b[1, :3], rtol=1e-5, atol=1e-5)
    assert np.abs(a[1, 3:] - b[1, 3:]).max() > 1.0


def test_cross_attention_and_shared_scores_are_left_alone():
    rep = check_unchanged(NAME, _export(("cross", "expose")), _feeds())
    reasons = " | ".join(s["reason"] for s in rep["skipped"])
    assert rep["matches"] == 2 and "cross-attention" in reasons and "outside" in reasons


def test_graph_without_attention_is_byte_identical():
    m = model(
        """g (float[N, 8] x) => (float[N, 8] y) {
            h = MatMul(x, w)
            y = Softmax <axis = -1> (h) }""",
        {"w": rand(8, 8)},
    )
    check_unchanged(NAME, m, [{"x": rand(3, 8)}])
