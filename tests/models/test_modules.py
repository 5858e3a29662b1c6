"""Reference modules against hand-written formulas; MoE layers against a dense computation of the
same routing (every expert on every token, combined with a [N, E] weight matrix)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffnx.models.attention import SelfAttention
from ffnx.models.blocks import BERT, GPT, PLACEMENTS, Block, ViT
from ffnx.models.ffn import GatedFFN, Mlp, RePaFFN, StructuredFFN, make_ffn
from ffnx.models.moe import DuoMoE, HashMoE, SkipExpert, TopKMoE
from ffnx.models.norms import RMSNorm, TokenBatchNorm, make_norm
from ffnx.plugins import schema

D, H = 16, 32
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster than two that must sync on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


ACT = {"swiglu": lambda x: x * torch.sigmoid(x), "geglu": gelu, "reglu": lambda x: x.clamp(min=0),
       "bilinear": lambda x: x, "gelu": gelu, "relu": lambda x: x.clamp(min=0),
       "silu": lambda x: x * torch.sigmoid(x)}  # fmt: skip


def lin(m: nn.Linear, x):
    y = x @ m.weight.T
    return y if m.bias is None else y + m.bias


def randomize_bn(bn: nn.BatchNorm1d) -> None:
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)


# ------------------------------------------------------------------------------------------ FFNs


@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
def test_mlp(act):
    m, x = Mlp(D, H, act), torch.randn(2, 5, D)
    torch.testing.assert_close(m(x), lin(m.fc2, ACT[act](lin(m.fc1, x))), **TOL)
    assert m.activation == act and m.fc1.bias is not None


@pytest.mark.parametrize("act", ["swiglu", "geglu", "reglu", "bilinear"])
def test_gated_ffn(act):
    m, x = GatedFFN(D, H, act), torch.randn(2, 5, D)
    want = lin(m.down, ACT[act](lin(m.gate, x)) * lin(m.up, x))
    torch.testing.assert_close(m(x), want, **TOL)
    assert m(x).shape == x.shape and m.gate.bias is None


def test_make_ffn_and_bad_activations():
    assert isinstance(make_ffn(D, H, "swiglu"), GatedFFN)
    assert isinstance(make_ffn(D, H, "relu", bias=True), Mlp)
    with pytest.raises(ValueError, match="not in"):
        GatedFFN(D, H, "gelu")
    with pytest.raises(ValueError, match="not in"):
        Mlp(D, H, "swiglu")


def test_structured_lowrank_is_a_rank_r_dense_ffn():
    m, x = StructuredFFN(D, H, "lowrank", 4), torch.randn(3, D)
    w1 = m.fc1.up.weight @ m.fc1.down.weight
    w2 = m.fc2.up.weight @ m.fc2.down.weight
    assert torch.linalg.matrix_rank(w1) == 4 and w1.shape == (H, D)
    want = gelu(x @ w1.T + m.fc1.up.bias) @ w2.T + m.fc2.up.bias
    torch.testing.assert_close(m(x), want, **TOL)


def test_structured_blockdiag_is_a_block_diagonal_dense_ffn():
    m, x = StructuredFFN(D, H, "blockdiag", 4), torch.randn(2, 3, D)
    w1, w2 = torch.block_diag(*m.fc1.weight), torch.block_diag(*m.fc2.weight)
    assert w1.shape == (H, D) and w2.shape == (D, H)
    want = gelu(x @ w1.T + m.fc1.bias) @ w2.T + m.fc2.bias
    torch.testing.assert_close(m(x), want, **TOL)
    with pytest.raises(ValueError, match="do not divide"):
        StructuredFFN(D, H, "blockdiag", 3)
    with pytest.raises(ValueError, match="kind"):
        StructuredFFN(D, H, "butterfly")


def test_repa_ffn_formula_and_reparameterisation():
    m = RePaFFN(D, H, idle_ratio=0.75).eval()
    randomize_bn(m.bn)
    x, a = torch.randn(2, 5, D), m.num_active
    assert a == H // 4
    bn = m.bn
    h = (lin(m.fc1, x) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    h = h * bn.weight + bn.bias
    want = lin(m.fc2, torch.cat([gelu(h[..., :a]), h[..., a:]], -1))
    torch.testing.assert_close(m(x), want, **TOL)
    # idle channels = one D x D linear map: y = fc2[:, :A] gelu(h[:, :A]) + x M^T + c
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w1 = m.fc1.weight * s[:, None]
    b1 = (m.fc1.bias - bn.running_mean) * s + bn.bias
    M = m.fc2.weight[:, a:] @ w1[a:]
    c = m.fc2.weight[:, a:] @ b1[a:] + m.fc2.bias
    active = gelu(x @ w1[:a].T + b1[:a]) @ m.fc2.weight[:, :a].T
    torch.testing.assert_close(m(x), active + x @ M.T + c, **TOL)


# ----------------------------------------------------------------------------------------- norms


def test_rmsnorm():
    m, x = RMSNorm(D), torch.randn(2, 5, D)
    with torch.no_grad():
        m.weight.normal_(1, 0.3)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + m.eps) * m.weight
    torch.testing.assert_close(m(x), want, **TOL)


def test_token_batchnorm_uses_running_stats_per_channel():
    m, x = TokenBatchNorm(D).eval(), torch.randn(2, 5, D)
    randomize_bn(m.bn)
    bn = m.bn
    want = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(m(x), want, **TOL)


def test_make_norm():
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(make_norm("layernorm", D)(x), F.layer_norm(x, (D,)))
    assert isinstance(make_norm("rmsnorm", D), RMSNorm)
    assert isinstance(make_norm("batchnorm", D), TokenBatchNorm)
    assert make_norm("none", D)(x) is x
    with pytest.raises(ValueError, match="layernorm, rmsnorm, batchnorm, none"):
        make_norm("groupnorm", D)


# ------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(causal):
    m, x = SelfAttention(D, 4, causal=causal), torch.randn(2, 7, D)

    def heads(t):
        return t.reshape(2, 7, 4, 4).transpose(1, 2)

    q, k, v = heads(lin(m.q, x)), heads(lin(m.k, x)), heads(lin(m.v, x))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(m(x), lin(m.o, o.transpose(1, 2).reshape(2, 7, D)), **TOL)


def test_causal_attention_ignores_the_future():
    m, x = SelfAttention(D, 2, causal=True), torch.randn(1, 6, D)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, D)
    torch.testing.assert_close(m(x)[:, :4], m(y)[:, :4], **TOL)


# ---------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_block_placements(placement):
    b, x = Block(D, 4, Mlp(D, H), "rmsnorm", placement), torch.randn(2, 5, D)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, RMSNorm):
                m.weight.normal_(1, 0.3)
    A, Fn, n1, n2 = b.attn, b.ffn, b.attn_norm, b.ffn_norm
    if placement == "pre":
        h = x + A(n1(x))
        want = h + Fn(n2(h))
    elif placement == "post":
        h = n1(x + A(x))
        want = n2(h + Fn(h))
    elif placement == "peri":
        h = x + b.attn_out_norm(A(n1(x)))
        want = h + b.ffn_out_norm(Fn(n2(h)))
    else:
        assert n2 is None
        want = x + A(n1(x)) + Fn(n1(x))
    torch.testing.assert_close(b(x), want, **TOL)


def test_models_shapes_and_gpt_causality():
    ids = torch.randint(0, 50, (2, 9))
    gpt = GPT(50, D, 2, 4, 32, lambda i: Mlp(D, H)).eval()
    logits = gpt(ids)
    assert logits.shape == (2, 9, 50)
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 1) % 50
    torch.testing.assert_close(gpt(ids2)[:, :6], logits[:, :6], **TOL)
    assert BERT(50, D, 2, 4, 32, lambda i: Mlp(D, H))(ids).shape == (2, 9, D)
    for pool in ("cls", "mean"):
        vit = ViT(16, 4, D, 2, 4, 10, lambda i: Mlp(D, H), pool=pool)
        assert vit(torch.randn(3, 3, 16, 16)).shape == (3, 10)


def test_hash_moe_gets_token_ids_through_gpt():
    gpt = GPT(50, D, 2, 4, 32, lambda i: HashMoE(D, H, 4, 50, seed=i)).eval()
    ids = torch.randint(0, 50, (2, 9))
    before = gpt(ids)
    gpt.blocks[0].ffn.hash_table.copy_((gpt.blocks[0].ffn.hash_table + 1) % 4)
    assert not torch.allclose(gpt(ids), before)


# ------------------------------------------------------------------------------------------- MoE


def dense_moe(moe, x, w):
    """y = sum_e W[:, e] * expert_e(x) + shared(x), every expert on every token."""
    flat = x.reshape(-1, x.shape[-1])
    ys = torch.stack([torch.zeros_like(flat) if isinstance(e, SkipExpert) else e(flat)
                      for e in moe.experts])  # fmt: skip
    y = torch.einsum("ne,end->nd", w, ys)
    if moe.shared is not None:
        s = moe.shared(flat)
        y = y + (s if moe.shared_gate is None else torch.sigmoid(lin(moe.shared_gate, flat)) * s)
    return y.reshape(x.shape)


def topk_mask(scores, k):
    kth = scores.sort(dim=-1, descending=True).values[:, k - 1 : k]
    return scores >= kth


def dense_weights(moe, x):
    """[N, E] routing weights, derived from the schema text rather than from `route`."""
    s = lin(moe.router, x.reshape(-1, x.shape[-1]))
    if moe.scoring == "softmax":
        p = s.softmax(-1)
        w = p * topk_mask(p, moe.top_k)
    elif moe.scoring == "topk_softmax":
        w = s.masked_fill(~topk_mask(s, moe.top_k), float("-inf")).softmax(-1)
    else:
        p = torch.sigmoid(s)
        sel = p if moe.score_bias is None else p + moe.score_bias
        w = p * topk_mask(sel, moe.top_k)
    if moe.normalize:
        w = w / w.sum(-1, keepdim=True)
    return w * moe.routed_scaling_factor


MOE_CASES = {
    "softmax-top2": dict(top_k=2),
    "softmax-top2-norm": dict(top_k=2, normalize=True),
    "switch-top1-relu-bias": dict(top_k=1, activation="relu", expert_bias=True),
    "topk-softmax-geglu": dict(top_k=2, scoring="topk_softmax", activation="geglu"),
    "sigmoid-bias-norm-scaled": dict(top_k=2, scoring="sigmoid", score_bias=True,
                                     normalize=True, routed_scaling_factor=2.5),
    "shared": dict(top_k=2, shared_hidden=2 * H),
    "shared-gated-sigmoid": dict(top_k=3, scoring="sigmoid", shared_hidden=H, shared_gate=True),
    "gelu-plain": dict(top_k=2, activation="gelu"),
}  # fmt: skip


@pytest.mark.parametrize("case", MOE_CASES)
def test_topk_moe_matches_dense_routing(case):
    moe, x = TopKMoE(D, H, 6, **MOE_CASES[case]).eval(), torch.randn(4, 32, D)
    if moe.score_bias is not None:
        with torch.no_grad():
            moe.score_bias.normal_(0, 0.05)
        p = torch.sigmoid(lin(moe.router, x.reshape(-1, D)))
        assert not torch.equal(topk_mask(p, 2), topk_mask(p + moe.score_bias, 2))
    w = dense_weights(moe, x)
    assert (w > 0).sum(-1).eq(moe.top_k).all() and (w > 0).any(0).all()  # every expert used
    torch.testing.assert_close(moe(x), dense_moe(moe, x, w), **TOL)


def test_moe_attributes_follow_the_schema():
    moe = TopKMoE(D, H, 6, 2, scoring="sigmoid", score_bias=True, normalize=True,
                  routed_scaling_factor=2.5, shared_hidden=H, shared_gate=True)  # fmt: skip
    assert moe.scoring in schema.MOE.attr("scoring").choices
    assert moe.activation in schema.ACTIVATIONS and moe.routing_mode == "router"
    assert (moe.num_experts, moe.top_k, moe.normalize, moe.routed_scaling_factor) == (
        6,
        2,
        True,
        2.5,
    )
    assert moe.router.weight.shape == (6, D) and moe.router.bias is None
    assert moe.score_bias.shape == (6,) and "score_bias" in dict(moe.named_buffers())
    assert moe.shared_gate.weight.shape == (1, D) and moe.shared.gate.bias is None
    assert moe.expert_hidden == [H] * 6 and moe.hash_table is None
    plain = TopKMoE(D, H, 4, 1)
    assert plain.score_bias is None and plain.shared is None and plain.shared_gate is None
    with pytest.raises(ValueError, match="sigmoid"):
        TopKMoE(D, H, 4, 2, score_bias=True)
    with pytest.raises(ValueError, match="top_k"):
        TopKMoE(D, H, 4, 5)
    with pytest.raises(ValueError, match="bilinear"):
        TopKMoE(D, H, 4, 2, activation="bilinear")


@pytest.mark.parametrize("k", [1, 2])
def test_hash_moe_matches_dense_routing(k):
    moe, x = HashMoE(D, H, 4, vocab_size=40, top_k=k, seed=3).eval(), torch.randn(2, 16, D)
    ids = torch.randint(0, 40, (2, 16))
    table = moe.hash_table
    assert table.shape == (40, k) and table.dtype == torch.int64 and moe.router is None
    assert all(len(set(row.tolist())) == k for row in table)
    w = torch.zeros(32, 4)
    for n, tok in enumerate(ids.reshape(-1).tolist()):
        for e in table[tok].tolist():
            w[n, e] += 1.0 / k
    torch.testing.assert_close(moe(x, ids), dense_moe(moe, x, w), **TOL)
    assert torch.equal(HashMoE(D, H, 4, 40, k, seed=3).hash_table, table)
    assert not torch.equal(HashMoE(D, H, 4, 40, k, seed=4).hash_table, table)
    assert moe.routing_mode == "hash" and moe.needs_token_ids


def test_duo_moe_routes_each_token_to_small_big_or_skip():
    moe, x = DuoMoE(D, H // 4, H).eval(), torch.randn(4, 32, D)
    with torch.no_grad():
        moe.router.weight.mul_(4)  # spread the choices so every route is taken
    assert moe.expert_hidden == [H // 4, H, 0] and moe.top_k == 1
    w = dense_weights(moe, x)
    assert (w > 0).any(0).all()
    y = moe(x)
    torch.testing.assert_close(y, dense_moe(moe, x, w), **TOL)
    skipped = w.argmax(-1) == 2
    assert skipped.any() and y.reshape(-1, D)[skipped].abs().max() == 0
