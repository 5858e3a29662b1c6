"""fuse_sibling_linears: linears on one input (Q/K/V, RePaViT branches) become one MatMul +
Split, exactly; FFN input projections and merges that save no kernel are left alone."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

from ffnx.graph.ffn_match import find_ffns
from ffnx.models import zoo

from .helpers import (
    apply,
    check_applied,
    check_unchanged,
    export,
    feeds_of,
    model,
    op_counts,
    rand,
    skip_reasons,
)

NAME = "fuse_sibling_linears"
D = 8
FEEDS = feeds_of(rand(2, 3, D, seed=1, lo=-2, hi=2), rand(1, 5, D, seed=2, lo=-2, hi=2))


class QKV(nn.Module):
    """Three biased projections of one input (attention's Q, K, V) and a GELU MLP beside them."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D, bias=False)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x)[..., :D].transpose(-1, -2), -1) @ self.v(x)
        return att + self.fc2(nn.functional.gelu(self.fc1(x)))


@pytest.fixture(scope="module")
def qkv():
    torch.manual_seed(0)
    return export(QKV(), torch.randn(2, 3, D), dynamic={"x": {0: "b", 1: "t"}})


def test_qkv_become_one_matmul_and_a_split(qkv):
    new, rep = check_applied(NAME, qkv, FEEDS, n_applied=1, rtol=1e-6, atol=1e-6)
    before, after = op_counts(qkv), op_counts(new)
    assert after["MatMul"] == before["MatMul"] - 2 and after["Split"] == 1
    assert after["Add"] == before["Add"] - 1  # q's and k's biases: one Add (v's part is zeros)
    split = next(n for n in gs.import_onnx(new).nodes if n.op == "Split")
    assert list(split.inputs[1].values) == [D, 2 * D, D]
    assert rep["notes"]["merged"] == [3]
    (ffn,) = find_ffns(gs.import_onnx(new))  # the MLP's fc1 reads x too, and is left alone
    assert not ffn.fc1.fused


def test_zoo_attention_and_repavit_blocks_are_merged():
    spec = zoo.build("vit-repa", "tiny")
    m = export(spec.module, spec.inputs["pixels"], dynamic={"pixels": {0: "b"}}, names=("pixels",))
    feeds = [{"pixels": spec.make_inputs({"batch": b}, seed=b)["pixels"].numpy()} for b in (1, 3)]
    for before in ("fold_batchnorm", "reparameterize_ffn"):
        m, _ = apply(before, m, feeds)
    _, rep = check_applied(NAME, m, feeds, n_applied=2, rtol=1e-5, atol=1e-5)  # 2 blocks
    assert rep["notes"]["merged"] == [3, 3]  # Q, K, V
    assert "FFN input projections" in skip_reasons(rep)  # fc1 beside RePaViT's idle branch


def test_unmatched_graphs_are_unchanged():
    one = model(
        """
        g (float[N, 4] x) => (float[N, 3] y) {
            h = MatMul(x, w)
            y = Add(h, b)
        }
        """,
        {"w": rand(4, 3), "b": rand(3, seed=1)},
    )
    check_unchanged(NAME, one, feeds_of(rand(2, 4, seed=3)))
    two_plain = model(  # two linears without bias: 2 kernels either way, the Split only adds
        """
        g (float[N, 4] x) => (float[N, 3] y, float[N, 5] z) {
            y = MatMul(x, w1)
            z = MatMul(x, w2)
        }
        """,
        {"w1": rand(4, 3), "w2": rand(4, 5, seed=1)},
    )
    rep = check_unchanged(NAME, two_plain, feeds_of(rand(2, 4, seed=3)))
    assert "no kernel launch saved" in skip_reasons(rep)


def test_dynamic_weights_and_shared_products_are_left_alone():
    dynamic = model(  # the second weight is an input: nothing to concatenate
        """
        g (float[N, 4] x, float[4, 3] w2) => (float[N, 3] y, float[N, 3] z) {
            h1 = MatMul(x, w1)
            y = Add(h1, b1)
            h2 = MatMul(x, w2)
            z = Add(h2, b2)
        }
        """,
        {"w1": rand(4, 3), "b1": rand(3, seed=1), "b2": rand(3, seed=2)},
    )
    feeds = [{"x": rand(2, 4, seed=3), "w2": rand(4, 3, seed=4)}]
    check_unchanged(NAME, dynamic, feeds)
    shared = model(  # h1 is read by its bias Add and by the output: the merge would lose it
        """
        g (float[N, 4] x) => (float[N, 3] y, float[N, 3] z, float[N, 3] h1) {
            h1 = MatMul(x, w1)
            y = Add(h1, b1)
            h2 = MatMul(x, w2)
            z = Add(h2, b2)
        }
        """,
        {"w1": rand(4, 3), "b1": rand(3, seed=1), "w2": rand(4, 3, seed=5), "b2": rand(3, seed=2)},
    )
    rep = check_unchanged(NAME, shared, feeds_of(rand(2, 4, seed=3)))
    assert "no kernel launch saved" in skip_reasons(rep)  # y1 keeps its MatMul: 3 kernels


def test_a_product_split_again_merges_into_one_split():
    """MLA's query and latent projections: q = x·Wq and [c | r] = Split(x·Wkv): one MatMul and
    one three-way Split (cleanup merges the split of the split)."""
    m = model(
        """
        g (float[N, 4] x) => (float[N, 3] q, float[N, 5] c, float[N, 2] r) {
            q = MatMul(x, wq)
            kv = MatMul(x, wkv)
            s = Constant <value = int64[2] {5, 2}> ()
            c, r = Split <axis = -1> (kv, s)
        }
        """,
        {"wq": rand(4, 3), "wkv": rand(4, 7, seed=1)},
    )
    new, _ = check_applied(NAME, m, feeds_of(rand(2, 4, seed=3)), n_applied=1)
    assert op_counts(new) == {"MatMul": 1, "Split": 1}


def test_a_router_stays_its_own_product():
    m = model(
        """
        g (float[N, 4] x) => (float[N, 3] q, float[N, 2] c, float[N, 2] r, float[N, 1] v,
                              int64[N, 1] i) {
            q = MatMul(x, wq)
            kv = MatMul(x, wkv)
            s = Constant <value = int64[2] {2, 2}> ()
            c, r = Split <axis = -1> (kv, s)
            logits = MatMul(x, wr)
            p = Softmax <axis = -1> (logits)
            k = Constant <value = int64[1] {1}> ()
            v, i = TopK (p, k)
        }
        """,
        {"wq": rand(4, 3), "wkv": rand(4, 4, seed=1), "wr": rand(4, 5, seed=2)},
    )
    new, _ = check_applied(NAME, m, feeds_of(rand(2, 4, seed=3)), n_applied=1)
    assert op_counts(new)["MatMul"] == 2  # q|kv merged, the router kept
