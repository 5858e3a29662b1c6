"""`moe_reference` / `sparse_ffn_reference` against naive per-token loops written from the schema
text (float64, fixed seeds). Tolerance: 1e-5 relative to the output scale (float32 references)."""

from __future__ import annotations

import math

import pytest
import torch

from ffnx.plugins.reference import moe_reference, sparse_ffn_reference
from ffnx.plugins.schema import MOE

D, H, E = 16, 12, 6
ACTS = {
    "silu": lambda v: v / (1 + math.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
    "relu": lambda v: max(v, 0.0),
}
BASE = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def act_vec(h: list[float], activation: str) -> list[float]:
    f = ACTS[BASE.get(activation, activation)]
    if activation in BASE:
        n = len(h) // 2
        return [f(h[i]) * h[n + i] for i in range(n)]
    return [f(v) for v in h]


def linear(x: list[float], w: torch.Tensor, b: torch.Tensor | None = None) -> list[float]:
    out = []
    for r in range(w.shape[0]):
        acc = sum(x[c] * float(w[r, c]) for c in range(w.shape[1]))
        out.append(acc + (float(b[r]) if b is not None else 0.0))
    return out


def top(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def limit(sel: list[float], groups) -> list[float]:
    """sel with the experts outside the topk_group best of n_group groups at -inf."""
    if groups is None:
        return sel
    n_group, topk_group, scoring = groups
    G = len(sel) // n_group
    best = [sorted(sel[g * G : (g + 1) * G], reverse=True) for g in range(n_group)]
    kept = top([sum(v[:2]) if scoring == "top2_sum" else v[0] for v in best], topk_group)
    return [v if e // G in kept else -math.inf for e, v in enumerate(sel)]


def naive_route(s, bias, k, scoring, normalize, scale, groups=None):
    if scoring == "softmax":
        m = max(s)
        z = sum(math.exp(v - m) for v in s)
        p = [math.exp(v - m) / z for v in s]
        sel = [p[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(len(s))]
        idx = top(limit(sel, groups), k)
        w = [p[i] for i in idx]
    elif scoring == "topk_softmax":
        idx = top(limit(s, groups), k)
        m = s[idx[0]]
        z = sum(math.exp(s[i] - m) for i in idx)
        w = [math.exp(s[i] - m) / z for i in idx]
    else:
        p = [1 / (1 + math.exp(-v)) for v in s]
        sel = [p[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(len(s))]
        idx = top(limit(sel, groups), k)
        w = [p[i] for i in idx]
    if normalize:
        w = [v / sum(w) for v in w]
    return idx, [v * scale for v in w]


def naive_moe(x, logits, t, *, k, scoring="softmax", normalize=0, scale=1.0, act="swiglu",
              ids=None, table=None, groups=None):  # fmt: skip
    out = []
    for n in range(x.shape[0]):
        xs = x[n].tolist()
        if ids is not None:
            idx = table[int(ids[n])].tolist()
            w = [scale / len(idx)] * len(idx)
        else:
            idx, w = naive_route(logits[n].tolist(), t.get("score_bias"), k, scoring, normalize,
                                 scale, groups)  # fmt: skip
        y = [0.0] * x.shape[1]
        for e, we in zip(idx, w):
            b1 = t["fc1_bias"][e] if t.get("fc1_bias") is not None else None
            b2 = t["fc2_bias"][e] if t.get("fc2_bias") is not None else None
            ye = linear(act_vec(linear(xs, t["fc1_weight"][e], b1), act), t["fc2_weight"][e], b2)
            y = [a + we * b for a, b in zip(y, ye)]
        if t.get("shared_fc1_weight") is not None:
            ys = linear(act_vec(linear(xs, t["shared_fc1_weight"]), act), t["shared_fc2_weight"])
            g = 1.0
            if t.get("shared_gate_weight") is not None:
                g = 1 / (1 + math.exp(-linear(xs, t["shared_gate_weight"])[0]))
            y = [a + g * b for a, b in zip(y, ys)]
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


def make_moe(seed, act="swiglu", biases=False, shared=False, gate=False):
    g = torch.Generator().manual_seed(seed)
    h1 = 2 * H if act in BASE else H
    t = {
        "fc1_weight": torch.randn(E, h1, D, generator=g) / 4,
        "fc2_weight": torch.randn(E, D, H, generator=g) / 4,
        "fc1_bias": torch.randn(E, h1, generator=g) / 4 if biases else None,
        "fc2_bias": torch.randn(E, D, generator=g) / 4 if biases else None,
        "score_bias": torch.randn(E, generator=g) / 4,
    }
    if shared:
        t["shared_fc1_weight"] = torch.randn(2 * h1, D, generator=g) / 4
        t["shared_fc2_weight"] = torch.randn(D, 2 * H, generator=g) / 4
        t["shared_gate_weight"] = torch.randn(1, D, generator=g) / 4 if gate else None
    # distinct logits per token: no near-ties, so every top-k is unambiguous
    T = 5
    logits = torch.stack([torch.randperm(E, generator=g).float() for _ in range(T)]) * 0.7
    logits += torch.rand(T, E, generator=g) * 0.3
    return torch.randn(T, D, generator=g), logits, t


def run_moe(x, logits, t, **attrs):
    args = [t.get(p.name) for p in MOE.inputs[2:]]
    return moe_reference(x, logits, *args, num_experts=E, **attrs)


def check(got, want, tol=1e-5):
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"max abs err {err:.3g}"


@pytest.mark.parametrize("scoring", ["softmax", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_routing(scoring, normalize, top_k):
    x, logits, t = make_moe(top_k, biases=True)
    attrs = dict(top_k=top_k, scoring=scoring, normalize=normalize, routed_scaling_factor=1.5)
    want = naive_moe(x, logits, t, k=top_k, scoring=scoring, normalize=normalize, scale=1.5)
    check(run_moe(x, logits, t, **attrs), want)


@pytest.mark.parametrize("act", ["swiglu", "geglu", "reglu", "gelu", "relu", "silu"])
def test_moe_activations(act):
    x, logits, t = make_moe(7, act=act)
    check(run_moe(x, logits, t, top_k=2, activation=act), naive_moe(x, logits, t, k=2, act=act))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_moe_without_score_bias(scoring):
    x, logits, t = make_moe(3)
    t["score_bias"] = None
    got = run_moe(x, logits, t, top_k=2, scoring=scoring)
    check(got, naive_moe(x, logits, t, k=2, scoring=scoring))
    t["score_bias"] = torch.full((t["fc1_weight"].shape[0],), 0.5)  # a constant shift: same
    check(run_moe(x, logits, t, top_k=2, scoring=scoring), naive_moe(x, logits, t, k=2,
                                                                     scoring=scoring))  # fmt: skip


@pytest.mark.parametrize("gate", [False, True])
def test_moe_shared_experts(gate):
    x, logits, t = make_moe(11, shared=True, gate=gate)
    check(run_moe(x, logits, t, top_k=2), naive_moe(x, logits, t, k=2))


def test_moe_hash_routing():
    x, _, t = make_moe(5)
    g = torch.Generator().manual_seed(1)
    t["hash_table"] = torch.randint(0, E, (50, 2), generator=g)
    t["token_ids"] = torch.randint(0, 50, (x.shape[0],), generator=g)
    got = run_moe(x, None, t, top_k=2, routing_mode="hash", routed_scaling_factor=2.0)
    want = naive_moe(x, None, t, k=2, scale=2.0, ids=t["token_ids"], table=t["hash_table"])
    check(got, want)


@pytest.mark.parametrize("scoring", ["softmax", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(3, 1, "top2_sum"), (3, 2, "max"), (2, 1, "max")])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_group_limited_routing(scoring, groups, top_k):
    x, logits, t = make_moe(20 + top_k, biases=True)
    attrs = dict(zip(("n_group", "topk_group", "group_scoring"), groups))
    got = run_moe(x, logits, t, top_k=top_k, scoring=scoring, normalize=1, **attrs)
    check(got, naive_moe(x, logits, t, k=top_k, scoring=scoring, normalize=1, groups=groups))


@pytest.mark.parametrize(
    "groups,why",
    [((4, 2), "not a multiple"), ((3, 4), "must be in"), ((3, 0), None), ((1, 5), None)],
)
def test_moe_group_attributes_are_checked(groups, why):
    x, logits, t = make_moe(1)
    attrs = dict(top_k=2, n_group=groups[0], topk_group=groups[1])
    if why is None:  # topk_group=0 (all groups) and n_group=1: plain routing
        check(run_moe(x, logits, t, **attrs), naive_moe(x, logits, t, k=2))
    else:
        with pytest.raises(ValueError, match=why):
            run_moe(x, logits, t, **attrs)


def test_moe_fp16_leading_dims_and_idle_experts():
    x, logits, t = make_moe(9)
    logits[:, 0] = -100.0  # expert 0 never chosen
    want = naive_moe(x, logits, t, k=2)
    t16 = {n: (v.half() if v is not None and n != "score_bias" else v) for n, v in t.items()}
    got = run_moe(x.half().reshape(1, 5, D), logits.half().reshape(1, 5, E), t16, top_k=2)
    assert got.dtype == torch.float16 and got.shape == (1, 5, D)
    want16 = naive_moe(x.half().double(), logits, {n: (v.double() if v is not None else v)
                                                   for n, v in t16.items()}, k=2)  # fmt: skip
    check(got.reshape(5, D), want16, tol=2e-3)
    check(got.reshape(5, D), want, tol=1e-2)


def naive_sparse(x, t, *, mode, k, act, gated):
    out = []
    f = ACTS[BASE.get(act, act)]
    for n in range(x.shape[0]):
        xs = x[n].tolist()
        if gated:
            a = [f(v) for v in linear(xs, t["w_gate"])]
            u = linear(xs, t["w_up"])
        else:
            a = [f(v) for v in linear(xs, t["w_up"], t["b_up"])]
            u = [1.0] * len(a)
        if mode == "threshold":
            keep = {c for c in range(len(a)) if abs(a[c]) > float(t["thresholds"][c])}
        else:
            keep = set(top([abs(v) for v in a], k))
        v = [a[c] * u[c] if c in keep else 0.0 for c in range(len(a))]
        out.append(linear(v, t["w_down"], t["b_down"]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "swiglu"])
def test_sparse_ffn(mode, gated, act):
    if act == "swiglu" and not gated:
        pytest.skip("a gated activation needs a gated FFN")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, D, generator=g)
    t = {
        "w_gate": torch.randn(H, D, generator=g) / 4 if gated else None,
        "w_up": torch.randn(H, D, generator=g) / 4,
        "b_up": None if gated else torch.randn(H, generator=g) / 4,
        "w_down": torch.randn(D, H, generator=g) / 4,
        "b_down": torch.randn(D, generator=g) / 4,
        "thresholds": torch.rand(H, generator=g) * 0.5,
    }
    got = sparse_ffn_reference(x, t["w_gate"], t["w_up"], t["b_up"], t["w_down"], t["b_down"],
                               t["thresholds"], mode=mode, k=5, activation=act)  # fmt: skip
    check(got, naive_sparse(x, t, mode=mode, k=5, act=act, gated=gated))


def test_sparse_ffn_rejects_gated_up_bias():
    w = torch.randn(H, D)
    with pytest.raises(ValueError, match="b_up"):
        sparse_ffn_reference(torch.randn(2, D), w, w, torch.randn(H), w.T, None, None, mode="topk",
                             k=3)  # fmt: skip


def test_runtime_plugin_ops_are_the_schema_ops():
    """The runtime names the plugin creators without importing the schema: they must agree."""
    from ffnx.plugins import schema
    from ffnx.runtime.plugin_library import PLUGIN_OPS

    assert set(PLUGIN_OPS) == set(schema.OPS)
