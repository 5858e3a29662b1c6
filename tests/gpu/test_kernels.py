"""CUDA kernels (libffnx_kernels.so through ctypes) against `ffnx.plugins.reference`.

Tolerances, as max |got - ref| over max |ref| (the output scale): fp32 1e-4, fp16 1e-2,
bf16 3e-2. The reference runs in fp32 on the same inputs (TF32 off). Router logits are drawn
with distinct gaps per token, so no top-k is decided by rounding. Outputs are poisoned with NaN
before each launch, so an unwritten element fails.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from ffnx.errors import BackendError  # noqa: E402
from ffnx.plugins import build  # noqa: E402
from ffnx.plugins.reference import (  # noqa: E402
    base_activation,
    group_mask,
    moe_reference,
    sparse_ffn_reference,
)
from tests.gpu import launchers  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
E, D, H = 8, 256, 200  # H % 64 != 0: partial column tiles


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """$FFNX_PLUGIN_DIR's library when set (built there if missing), else a build for this GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    if os.environ.get("FFNX_PLUGIN_DIR"):
        return build.load_kernels()
    major, minor = torch.cuda.get_device_capability()
    out = tmp_path_factory.mktemp("kernels")
    return build.load_kernels(build.build_kernels(archs=(f"sm_{major}{minor}",), out_dir=out))


def close(got, want, dtype):
    assert not torch.isnan(got).any(), "unwritten (NaN) output elements"
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} > {TOL[dtype]} x scale {scale:.3g}"


def moe_inputs(T, dtype, *, act="swiglu", d=D, h=H, biases=True, shared=False, gate=False,
               seed=0):  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = dict(device="cuda", generator=g)
    h1 = 2 * h if act in ("swiglu", "geglu", "reglu", "clamped_swiglu") else h
    r = lambda *s: (torch.randn(*s, **dev) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    t = dict(hidden=torch.randn(T, d, **dev).to(dtype), fc1_weight=r(E, h1, d),
             fc1_bias=r(E, h1) if biases else None, fc2_weight=r(E, d, h),
             fc2_bias=r(E, d) if biases else None,
             score_bias=torch.randn(E, **dev) / 8)  # fmt: skip
    # distinct per-token logits, skewed: expert 0 busiest, expert E-1 never chosen
    perm = torch.argsort(torch.rand(T, E, **dev), dim=1).float()
    skew = torch.tensor([1.5, 0.5] + [0.0] * (E - 3) + [-30.0], device="cuda")
    t["router_logits"] = (perm * 0.6 + torch.rand(T, E, **dev) * 0.2 + skew).to(dtype)
    if shared:
        t["shared_fc1_weight"], t["shared_fc2_weight"] = r(2 * h1, d), r(d, 2 * h)
        t["shared_gate_weight"] = r(1, d) if gate else None
    return t


def run_moe(lib, t, **attrs):
    args = [
        t.get(p)
        for p in (
            "hidden",
            "router_logits",
            "fc1_weight",
            "fc1_bias",
            "fc2_weight",
            "fc2_bias",
            "score_bias",
            "token_ids",
            "hash_table",
            "shared_fc1_weight",
            "shared_fc2_weight",
            "shared_gate_weight",
        )
    ]
    want = moe_reference(*args, num_experts=E, **attrs)
    out = torch.full_like(t["hidden"], float("nan"))
    got = launchers.moe_forward(lib, *args, num_experts=E, out=out, **attrs)
    torch.cuda.synchronize()
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 7, 16, 256, 4096])
def test_moe_sizes(lib, T, top_k, dtype):
    t = moe_inputs(T, dtype, seed=T + top_k)
    close(*run_moe(lib, t, top_k=top_k), dtype)


@pytest.mark.parametrize("scoring", ["softmax", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("T", [7, 300])
def test_moe_scoring(lib, scoring, normalize, T):
    t = moe_inputs(T, torch.float32, seed=1)
    attrs = dict(top_k=2, scoring=scoring, normalize=normalize, routed_scaling_factor=2.5)
    close(*run_moe(lib, t, **attrs), torch.float32)


@pytest.mark.parametrize("scoring", ["softmax", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(4, 2, "top2_sum"), (4, 1, "max"), (2, 1, "top2_sum")])
@pytest.mark.parametrize("T", [7, 300])
def test_moe_group_limited_routing(lib, scoring, groups, T):
    t = moe_inputs(T, torch.float32, seed=8)
    n_group, topk_group, group_scoring = groups
    attrs = dict(top_k=2, scoring=scoring, normalize=1, routed_scaling_factor=2.5,
                 n_group=n_group, topk_group=topk_group, group_scoring=group_scoring)  # fmt: skip
    close(*run_moe(lib, t, **attrs), torch.float32)


def deepseek_logits(T, bias, dtype, g, margin=1e-5):
    """Router logits [T, 256] whose 4 of 8 groups and top-8 experts (sigmoid + bias, top2_sum)
    are each decided by more than `margin` in float64: no choice hangs on rounding."""
    rows = []
    while len(rows) < T:
        s = (torch.randperm(256, device="cuda", generator=g).float() * 0.03 - 3.8).to(dtype)
        sel = torch.sigmoid(s.double()) + bias.double()
        groups = sel.view(8, 32).topk(2).values.sum(-1).sort(descending=True).values
        top = group_mask(sel[None], 8, 4, "top2_sum")[0].sort(descending=True).values
        if groups[3] - groups[4] > margin and top[7] - top[8] > margin:
            rows.append(s)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 16, 256])
def test_moe_deepseek_v3_routing(lib, dtype, T):
    """DeepSeek-V3's shape of routing: 256 experts, n_group=8, topk_group=4, top-8, sigmoid +
    score bias; the groups change the choice (checked against the reference without them)."""
    n_exp, d, h = 256, 128, 64
    g = torch.Generator(device="cuda").manual_seed(T)
    dev = dict(device="cuda", generator=g)
    r = lambda *s: (torch.randn(*s, **dev) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    bias = torch.randn(n_exp, **dev) / 16
    args = [torch.randn(T, d, **dev).to(dtype), deepseek_logits(T, bias, dtype, g),
            r(n_exp, 2 * h, d), None, r(n_exp, d, h), None, bias] + [None] * 5  # fmt: skip
    attrs = dict(num_experts=n_exp, top_k=8, scoring="sigmoid", normalize=1,
                 routed_scaling_factor=2.5)  # fmt: skip
    groups = dict(n_group=8, topk_group=4, group_scoring="top2_sum")
    want = moe_reference(*args, **attrs, **groups)
    got = launchers.moe_forward(lib, *args, **attrs, **groups)
    torch.cuda.synchronize()
    close(got, want, dtype)
    if T > 1:
        assert not torch.allclose(want, moe_reference(*args, **attrs), atol=1e-3)


@pytest.mark.parametrize("act", ["swiglu", "geglu", "reglu", "gelu", "relu", "silu",
                                 "clamped_swiglu"])  # fmt: skip
@pytest.mark.parametrize("T", [5, 200])
def test_moe_activations(lib, act, T):
    t = moe_inputs(T, torch.float16, act=act, seed=2)
    # clamped_swiglu (GPT-OSS) with a limit that binds on many of these O(1) pre-activations
    clamp = dict(activation_alpha=1.702, activation_limit=0.5) if act == "clamped_swiglu" else {}
    close(*run_moe(lib, t, top_k=2, activation=act, **clamp), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [3, 512])
def test_moe_hash_routing(lib, dtype, T):
    t = moe_inputs(T, dtype, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    t["hash_table"] = torch.randint(0, E - 1, (97, 2), device="cuda", generator=g)
    t["token_ids"] = torch.randint(0, 97, (T,), device="cuda", generator=g)
    close(*run_moe(lib, t, top_k=2, routing_mode="hash", routed_scaling_factor=1.5), dtype)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [4, 1000])
def test_moe_shared_experts(lib, gate, dtype, T):
    t = moe_inputs(T, dtype, shared=True, gate=gate, seed=5)
    close(*run_moe(lib, t, top_k=2, scoring="sigmoid", normalize=1), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [9, 700])
def test_moe_unaligned_shapes_use_fallbacks(lib, dtype, T):
    t = moe_inputs(T, dtype, d=100, h=52, biases=False, seed=6)  # K % 8 != 0: no tensor cores
    close(*run_moe(lib, t, top_k=2), dtype)


def test_moe_bf16_and_leading_dims(lib):
    t = moe_inputs(2 * 300, torch.bfloat16, seed=7)
    t["hidden"] = t["hidden"].reshape(2, 300, D)
    t["router_logits"] = t["router_logits"].reshape(2, 300, E)
    got, want = run_moe(lib, t, top_k=2)
    assert got.shape == (2, 300, D)
    close(got, want, torch.bfloat16)


def test_moe_errors(lib):
    t = moe_inputs(4, torch.float32)
    args = [t.get(n) for n in ("hidden", "router_logits", "fc1_weight", "fc1_bias", "fc2_weight",
                               "fc2_bias", "score_bias")] + [None] * 5  # fmt: skip
    with pytest.raises(BackendError, match="invalid argument"):
        launchers.moe_forward(lib, *args, num_experts=E, top_k=E + 1)
    for bad in (dict(n_group=3, topk_group=1), dict(n_group=4, topk_group=5),
                dict(n_group=4, topk_group=1, top_k=3), dict(n_group=8, topk_group=2)):  # fmt: skip
        with pytest.raises(BackendError, match="invalid argument"):  # schema group_error
            launchers.moe_forward(lib, *args, num_experts=E, **{"top_k": 2, **bad})
    p = build.MoEParams(4, D, H, E, 2, 0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0)
    size = lib.ffnx_moe_workspace_size(p)
    assert size > 0
    ptr = {n: t[n].data_ptr() for n in ("hidden", "router_logits", "fc1_weight", "fc2_weight")}
    tensors = build.MoETensors(**ptr, output=torch.empty_like(t["hidden"]).data_ptr())
    ws = torch.empty(size, dtype=torch.uint8, device="cuda")
    assert lib.ffnx_moe_launch(p, tensors, ws.data_ptr(), size - 1, None) == 3


# ---- sparse FFN ------------------------------------------------------------------------------
def sparse_inputs(T, dtype, gated, mode, seed, act="relu"):
    """Inputs whose kept set is unambiguous: thresholds and top-k cuts sit >= 1e-5 (relative)
    away from every |activation|, far beyond the kernels' rounding differences (~1e-7)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = dict(device="cuda", generator=g)
    Hs, k = 512, 96
    r = lambda *s: (torch.randn(*s, **dev) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    for _ in range(20):
        t = dict(hidden=torch.randn(T, D, **dev).to(dtype), w_gate=r(Hs, D) if gated else None,
                 w_up=r(Hs, D), b_up=None if gated else r(Hs), w_down=r(D, Hs),
                 b_down=r(D))  # fmt: skip
        w = t["w_gate"] if gated else t["w_up"]
        pre = t["hidden"].double() @ w.double().T + (0 if gated else t["b_up"].double())
        a = base_activation(act)(pre).abs()
        margin = 1e-5 * a.max().item()
        if mode == "threshold":
            thr = torch.rand(Hs, **dev) * a.max().item() * 0.6
            for _ in range(50):
                bad = ((a - thr.double()).abs() < margin).any(0)
                if not bad.any():
                    break
                thr[bad] = torch.rand(int(bad.sum()), **dev) * a.max().item() * 0.6
            t["thresholds"] = thr.float()
            if not ((a - thr.double()).abs() < margin).any():
                return t, k
        else:
            top = a.topk(k + 1, dim=1).values
            if ((top[:, k - 1] - top[:, k]) > margin).all() or (top[:, k - 1] == 0).all():
                t["thresholds"] = None
                return t, k
    raise AssertionError("could not draw unambiguous sparse inputs")


def run_sparse(lib, t, *, mode, k, act, packed):
    args = [t[n] for n in ("hidden", "w_gate", "w_up", "b_up", "w_down", "b_down", "thresholds")]
    want = sparse_ffn_reference(*args, mode=mode, k=k, activation=act)
    w_down_t = launchers.pack_down(lib, t["w_down"]) if packed else None
    out = torch.full_like(t["hidden"], float("nan"))
    got = launchers.sparse_ffn_forward(lib, *args, mode=mode, k=k, activation=act,
                                       w_down_t=w_down_t, out=out)  # fmt: skip
    torch.cuda.synchronize()
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("T", [1, 4, 16, 200])
def test_sparse_ffn(lib, T, mode, gated, dtype):
    t, k = sparse_inputs(T, dtype, gated, mode, seed=T)
    close(*run_sparse(lib, t, mode=mode, k=k, act="relu", packed=True), dtype)


@pytest.mark.parametrize("act", ["silu", "swiglu", "gelu"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_sparse_ffn_unpacked_down_and_activations(lib, act, mode):
    t, k = sparse_inputs(8, torch.float16, True, mode, seed=11, act=act)
    close(*run_sparse(lib, t, mode=mode, k=k, act=act, packed=False), torch.float16)


def test_pack_down_is_a_transpose(lib):
    w = torch.randn(96, 40, device="cuda", dtype=torch.float16)
    assert torch.equal(launchers.pack_down(lib, w), w.T.contiguous())
