"""MoE capture: swapped modules keep the numerics of zoo and transformers MoE blocks; refused
blocks fail with one line; zoo MoE models export one FfnxMoE node per MoE layer."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
import torch

from ffnx.errors import ExportError
from ffnx.export.capture import captured
from ffnx.export.moe_capture import capture_moe
from ffnx.export.moe_op import MoEOpModule
from ffnx.graph.ort import ort_session
from ffnx.models import zoo
from ffnx.plugins.schema import GROUP_ATTRS

TOKENS = (1, 16, 256)


def _close_to(ref: torch.Tensor, got: torch.Tensor) -> None:
    """fp32 swap exactness: max |got - ref| <= 1e-5 * max |ref|."""
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= 1e-5 * scale, f"max abs error {err:.3g} at scale {scale:.3g}"


# --------------------------------------------------------------------------------------------
# transformers blocks

transformers = pytest.importorskip("transformers")
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)  # fmt: skip
ROUTED = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (config class, config kwargs, MoE block class[, refusal reason])
TWO = dict(num_experts_per_tok=2)
HF_SUPPORTED = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, **TWO), "MixtralSparseMoeBlock"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, **ROUTED,
                  shared_expert_intermediate_size=48), "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, **ROUTED, norm_topk_prob=True),
                  "Qwen3MoeSparseMoeBlock"),
    "qwen3_next": ("Qwen3NextConfig", dict(num_experts=4, **ROUTED,
                   shared_expert_intermediate_size=48), "Qwen3NextSparseMoeBlock"),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, **TWO), "OlmoeSparseMoeBlock"),
    "flex_olmo": ("FlexOlmoConfig", dict(num_experts=4, **TWO), "FlexOlmoSparseMoeBlock"),
    "minimax": ("MiniMaxConfig", dict(num_local_experts=4, **TWO), "MiniMaxSparseMoeBlock"),
    "jamba": ("JambaConfig", dict(num_experts=4, **TWO), "JambaSparseMoeBlock"),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, **TWO), "GraniteMoeMoE"),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(num_local_experts=4, **TWO),
                         "GraniteMoeHybridMoE"),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(num_local_experts=4, **TWO,
                         shared_intermediate_size=32), "GraniteMoeSharedMoE"),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=8, **ROUTED, n_shared_experts=2,
                    n_group=2, topk_group=2, routed_scaling_factor=2.5), "DeepseekV3MoE"),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=8, **ROUTED, n_shared_experts=1),
                 "Glm4MoeMoE"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(n_routed_experts=8, **ROUTED, n_shared_experts=1,
                      n_group=4, topk_group=2), "Glm4MoeLiteMoE"),
    "deepseek_v2": ("DeepseekV2Config", dict(n_routed_experts=8, **ROUTED, n_shared_experts=1,
                    routed_scaling_factor=1.5), "DeepseekV2Moe"),
    "dbrx": ("DbrxConfig", dict(d_model=64, n_heads=4, n_layers=1, ffn_config=dict(
             ffn_hidden_size=96, moe_num_experts=4, moe_top_k=2)), "DbrxFFN"),
    "jetmoe": ("JetMoeConfig", dict(kv_channels=16, num_local_experts=4, **TWO), "JetMoeMoE"),
    # limit 1.5: with weights ~N(0, 0.2) both clamps bind on some channels (checked below)
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, **TWO, swiglu_limit=1.5), "GptOssMLP"),
    # routers and blocks whose forward is one of the above under another class name
    "mellum": ("MellumConfig", dict(num_experts=4, **ROUTED, norm_topk_prob=True),
               "MellumSparseMoeBlock"),
    "dots1": ("Dots1Config", dict(n_routed_experts=8, **ROUTED, n_shared_experts=1, n_group=4,
              topk_group=2, routed_scaling_factor=2.5), "Dots1MoE"),
    "mimo_v2_flash": ("MiMoV2FlashConfig", dict(n_routed_experts=8, **ROUTED, n_group=4,
                      topk_group=2), "MiMoV2FlashMoE"),
    "solar_open": ("SolarOpenConfig", dict(n_routed_experts=8, **ROUTED, n_shared_experts=1),
                   "SolarOpenMoE"),
    "exaone_moe": ("ExaoneMoeConfig", dict(num_experts=8, **ROUTED, num_shared_experts=1,
                   n_group=4, topk_group=2), "ExaoneMoeSparseMoEBlock"),
    "minicpm5_moe": ("MiniCPM5MoeConfig", dict(n_routed_experts=8, **ROUTED, n_shared_experts=1),
                     "MiniCPM5MoeMoE"),
    # their own readers: MiniMax-M2's selection bias lives on the block; Cohere 2 MoE's routing
    # and shared-expert combination are config options (each variant below)
    "minimax_m2": ("MiniMaxM2Config", dict(num_local_experts=8, **ROUTED),
                   "MiniMaxM2SparseMoeBlock"),
    "cohere2_moe": ("Cohere2MoeConfig", dict(num_experts=8, **TWO, num_shared_experts=1),
                    "Cohere2MoeSparseMoeBlock"),
    "cohere2_moe-sigmoid-average": ("Cohere2MoeConfig", dict(
        num_experts=8, **TWO, num_shared_experts=1, expert_selection_fn="sigmoid",
        norm_topk_prob=True, shared_expert_combination_strategy="average"),
        "Cohere2MoeSparseMoeBlock"),
    "afmoe": ("AfmoeConfig", dict(num_experts=8, **ROUTED, num_shared_experts=1, route_scale=2.5),
              "AfmoeSparseMoeBlock"),
    "afmoe-no-shared": ("AfmoeConfig", dict(num_experts=8, **ROUTED, num_shared_experts=0),
                        "AfmoeSparseMoeBlock"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(num_experts=8, **ROUTED,
                     moe_num_shared_experts=1), "Ernie4_5_MoeSparseMoeBlock"),
    "hy_v3": ("HYV3Config", dict(num_local_experts=8, **ROUTED, num_shared_experts=1,
              router_scaling_factor=2.5), "HYV3MoE"),
    "laguna": ("LagunaConfig", dict(num_experts=8, **ROUTED, shared_expert_intermediate_size=48,
               moe_routed_scaling_factor=2.5), "LagunaSparseMoeBlock"),
    "cohere2_moe-sigmoid-unnormalized": ("Cohere2MoeConfig", dict(
        num_experts=8, **TWO, num_shared_experts=0, expert_selection_fn="sigmoid",
        norm_topk_prob=False), "Cohere2MoeSparseMoeBlock"),
}  # fmt: skip
HF_REFUSED = {
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4, **TWO), "PhimoeSparseMoeBlock",
               "sparsemixer"),
    "llama4": ("Llama4TextConfig", dict(num_local_experts=4, num_experts_per_tok=1,
               intermediate_size_mlp=96), "Llama4TextMoe", "scales each expert's input"),
    "laguna-softcap": ("LagunaConfig", dict(num_experts=8, **ROUTED,
                       shared_expert_intermediate_size=48, moe_router_logit_softcapping=30.0),
                       "LagunaSparseMoeBlock", "router logits are soft-capped"),
}  # fmt: skip
# group-limited routing: case -> (family, config class, config kwargs, block class, group attrs)
MOE32 = dict(n_routed_experts=32, moe_intermediate_size=32)
HF_GROUPED = {
    # DeepseekV3Config's defaults (256 experts, n_group=8, topk_group=4, k=8) scaled to 32 experts
    "deepseek_v3-defaults": ("deepseek_v3", "DeepseekV3Config", dict(**MOE32, n_shared_experts=1),
                             "DeepseekV3MoE", (8, 4, "top2_sum")),
    "deepseek_v3-4x2": ("deepseek_v3", "DeepseekV3Config", dict(n_routed_experts=16, **ROUTED,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5), "DeepseekV3MoE",
                        (4, 2, "top2_sum")),
    "glm4_moe-4x2": ("glm4_moe", "Glm4MoeConfig", dict(**MOE32, num_experts_per_tok=4, n_group=4,
                     topk_group=2, n_shared_experts=1), "Glm4MoeMoE", (4, 2, "top2_sum")),
    # DeepSeek-V2's own routing (n_group=8, topk_group=3, k=6) with 32 experts
    "deepseek_v2-greedy": ("deepseek_v2", "DeepseekV2Config", dict(**MOE32, num_experts_per_tok=6,
                           n_group=8, topk_group=3, topk_method="group_limited_greedy",
                           n_shared_experts=1, routed_scaling_factor=1.5), "DeepseekV2Moe",
                           (8, 3, "max")),
}  # fmt: skip


def hf_block(family: str, table: dict) -> torch.nn.Module:
    cfg_cls, kw, block_cls, *_ = table[family]
    base = {} if family == "dbrx" else dict(BASE)
    if family == "jetmoe":
        base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, vocab_size=256)
    config = getattr(transformers, cfg_cls)(**base, **kw)
    family = family.split("-")[0]  # "cohere2_moe-sigmoid-average": a config variant
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    block = getattr(mod, block_cls)(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        for name, b in block.named_buffers():
            if name.endswith("bias"):  # e_score_correction_bias: must change the selection
                b.normal_(0.0, 0.1)
    return block


@pytest.mark.parametrize("family", HF_SUPPORTED)
def test_hf_block_swap_keeps_numerics(family):
    block = hf_block(family, HF_SUPPORTED)
    new = capture_moe("model.layers.0.mlp", block, "ort")
    assert isinstance(new, MoEOpModule)
    for t in TOKENS:
        x = torch.randn(1, t, 64, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ref, got = block(x), new(x)
        first = lambda t: t[0] if isinstance(t, tuple) else t  # noqa: E731 (GptOssMLP: 2-tuple)
        _close_to(first(ref), first(got))


def test_hf_fused_expert_weights_are_shared_not_copied():
    block = hf_block("mixtral", HF_SUPPORTED)
    new = capture_moe("mlp", block, "ort")
    assert new.fc1_weight is block.experts.gate_up_proj
    assert new.fc2_weight is block.experts.down_proj
    assert new.router_weight is block.gate.weight


def test_deepseek_v3_attributes():
    new = capture_moe("mlp", hf_block("deepseek_v3", HF_SUPPORTED), "ort")
    assert new.attrs == dict(num_experts=8, top_k=2, scoring="sigmoid", normalize=1,
                             routed_scaling_factor=2.5, activation="swiglu")  # fmt: skip
    assert new.score_bias.shape == (8,) and new.shared_fc1_weight.shape == (2 * 64, 64)


@pytest.mark.parametrize("case", HF_GROUPED)
def test_hf_group_limited_routing_is_captured(case):
    """Captured with n_group / topk_group / group_scoring, same output as the block at every T;
    the groups matter here: the same node without them (n_group=1) routes differently."""
    import copy

    family, *entry, groups = HF_GROUPED[case]
    block = hf_block(family, {family: entry})
    new = capture_moe("model.layers.0.mlp", block, "ort")
    assert (new.attrs["n_group"], new.attrs["topk_group"], new.attrs["group_scoring"]) == groups
    free = copy.deepcopy(new)
    free.attrs = {k: v for k, v in new.attrs.items() if k not in GROUP_ATTRS}
    differs = []
    for t in TOKENS:
        x = torch.randn(1, t, 64, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ref, got, ungrouped = block(x), new(x), free(x)
        _close_to(ref, got)
        differs.append(not torch.allclose(ungrouped, ref, atol=1e-4))
    assert differs[-1], "n_group=1 routing gave the same output at T=256: groups untested"


def test_hf_group_limited_routing_keeping_all_groups_adds_no_attributes():
    block = hf_block("deepseek_v3", HF_SUPPORTED)  # n_group=2, topk_group=2
    assert not set(GROUP_ATTRS) & set(capture_moe("mlp", block, "ort").attrs)


def test_hf_invalid_group_limited_routing_is_refused():
    entry = HF_GROUPED["deepseek_v3-4x2"]
    block = hf_block("deepseek_v3", {"deepseek_v3": entry[1:4]})
    block.gate.top_k = 12  # more than the 8 experts of 2 groups of 4
    with pytest.raises(ExportError, match="group-limited routing: top_k=12 exceeds the 8"):
        capture_moe("mlp", block, "ort")


@pytest.mark.parametrize("family", HF_REFUSED)
def test_hf_refused_blocks_fail_with_one_line(family):
    block = hf_block(family, HF_REFUSED)
    cls, reason = HF_REFUSED[family][2], HF_REFUSED[family][3]
    with pytest.raises(ExportError) as info:
        capture_moe("model.layers.3.mlp", block, "ort")
    msg = str(info.value)
    assert "\n" not in msg and "model.layers.3.mlp" in msg and cls in msg and reason in msg


def test_refusal_surfaces_from_captured():
    model = torch.nn.Sequential(hf_block("phimoe", HF_REFUSED))
    with pytest.raises(ExportError, match=r"0 \(PhimoeSparseMoeBlock\)"):
        with captured(model, "ort"):
            pass
    assert type(model[0]).__name__ == "PhimoeSparseMoeBlock"


def test_unrelated_modules_are_not_captured():
    assert capture_moe("fc", torch.nn.Linear(4, 4), "ort") is None
    assert capture_moe("mlp", zoo.build("gpt-swiglu", "tiny").module, "ort") is None


# --------------------------------------------------------------------------------------------
# ffnx zoo

ZOO_MOE = ("gpt-moe", "gpt-switch", "gpt-moe-shared", "gpt-finegrained", "gpt-hash", "gpt-duo")


def _zoo(name: str):
    spec = zoo.build(name, "tiny")
    with torch.no_grad():  # a non-zero selection bias, so it matters
        for n, b in spec.module.named_buffers():
            if n.endswith("score_bias"):
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return spec


def _ids(b: int, s: int, vocab: int = 512) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(s))
    }


SHAPES = ((1, 1), (1, 16), (2, 128))


@pytest.mark.parametrize("name", [*ZOO_MOE, "gpt-moe-topk-softmax"])
def test_zoo_swap_keeps_numerics(name):
    model = _zoo(name).module
    for b, s in SHAPES:
        ids = _ids(b, s)
        with torch.no_grad():
            ref = model(**ids)
            with captured(model, "ort") as ops:
                got = model(**ids)
        assert ops == {"FfnxMoE"}
        _close_to(ref, got)


def test_duo_padding_and_skip_are_exact_per_expert():
    """Every Duo expert (small, big, skip) is chosen somewhere, and the padded op matches."""
    from ffnx.models.moe import DuoMoE

    torch.manual_seed(0)
    moe = DuoMoE(64, 40, 176).eval()
    x = torch.randn(256, 64)
    chosen = set(moe.router(x).argmax(-1).tolist())
    assert chosen == {0, 1, 2}
    new = capture_moe("ffn", moe, "ort")
    assert new.fc1_weight.shape == (3, 2 * 176, 64) and not new.fc1_weight[2].any()
    with torch.no_grad():
        _close_to(moe(x), new(x))


# gpt-duo (padding, skip) always; the others are export-heavy (~5-9 s each): pytest -m slow
FAST = ("gpt-duo",)


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ZOO_MOE]
)
def test_zoo_moe_exports_one_node_per_layer(tmp_path, name):
    from ffnx.export.torch_export import export_onnx
    from ffnx.lowering import runnable

    spec = _zoo(name)
    layers = sum(isinstance(m, importlib.import_module("ffnx.models.moe").MoE)
                 for m in spec.module.modules())  # fmt: skip
    with captured(spec.module, "ort") as ops:
        export_onnx(spec, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    moe = [n for n in model.graph.node if n.op_type == "FfnxMoE"]
    assert ops == {"FfnxMoE"} and len(moe) == layers == 2
    assert all(n.domain == "ffnx" for n in moe)
    assert not any(n.op_type in ("NonZero", "ScatterND") for n in model.graph.node)
    sess = ort_session(runnable(model))
    for b, s in SHAPES:
        ids = _ids(b, s)
        with torch.no_grad():
            ref = spec.module(**ids).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in ids.items()})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_hf_transposed_biased_expert_layout_matches_transformers_kernel():
    """`is_transposed` / `has_bias` experts read as transformers' own batched kernel reads them."""
    from transformers.integrations import moe as hf_moe

    from ffnx.export.moe_hf import _hf_experts
    from ffnx.plugins.reference import moe_reference, route

    E, D, H, k = 4, 16, 24, 2
    g = torch.Generator().manual_seed(0)

    class Experts(torch.nn.Module):
        _apply_gate = hf_moe._default_apply_gate
        has_gate, has_bias, is_transposed, is_concatenated = True, True, True, True
        has_post_expert_norm, _is_expert_parallel, num_experts = False, False, E

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, D, 2 * H, generator=g))
            self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(E, 2 * H, generator=g))
            self.down_proj = torch.nn.Parameter(torch.randn(E, H, D, generator=g))
            self.down_proj_bias = torch.nn.Parameter(torch.randn(E, D, generator=g))
            self.act_fn = torch.nn.SiLU()

    experts, x = Experts(), torch.randn(64, D, generator=g)
    logits = torch.randn(64, E, generator=g)
    routing = dict(num_experts=E, top_k=k, scoring="softmax", normalize=1)
    idx, w = route(logits, None, None, None, routing_mode="router", routed_scaling_factor=1.0,
                   **routing)  # fmt: skip
    with torch.no_grad():
        ref = hf_moe.batched_mm_experts_forward(experts, x, idx, w)
        weights, act = _hf_experts(experts)
        got = moe_reference(
            x, logits, weights["fc1_weight"], weights["fc1_bias"], weights["fc2_weight"],
            weights["fc2_bias"], None, None, None, None, None, None, activation=act, **routing,
        )  # fmt: skip
    assert act == "swiglu" and weights["fc1_weight"].shape == (E, 2 * H, D)
    _close_to(ref, got)


# --------------------------------------------------------------------------------------------
# GPT-OSS: clamped SwiGLU experts with biases, router with a bias, top-k then softmax


def test_gpt_oss_activation_matches_transformers_gate():
    """reference.activate(clamped_swiglu) on [gate; up] halves == GptOssExperts._apply_gate on
    the interleaved columns, with values on both sides of +-limit (both clamps bind)."""
    from ffnx.export.moe_gpt_oss import _deinterleave
    from ffnx.plugins.reference import activate

    experts = hf_block("gpt_oss", HF_SUPPORTED).experts
    gu = torch.randn(64, 2 * 96, generator=torch.Generator().manual_seed(0)) * 3
    assert (gu[:, ::2] > 1.5).any() and (gu[:, 1::2].abs() > 1.5).any()
    with torch.no_grad():
        ref = experts._apply_gate(gu)
    got = activate(_deinterleave(gu, 1), "clamped_swiglu", experts.alpha, experts.limit)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    plain = activate(_deinterleave(gu, 1), "clamped_swiglu", experts.alpha, 1e9)
    assert not torch.allclose(plain, ref, atol=1e-3), "the clamps changed nothing: untested"


def test_gpt_oss_experts_match_transformers_experts():
    """The captured node's reference == GptOssExperts.forward for given routing (op level)."""
    from ffnx.plugins.reference import moe_reference

    block = hf_block("gpt_oss", HF_SUPPORTED)
    new = capture_moe("mlp", block, "ort")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, scores, idx = block.router(x)
        ref = block.experts(x, idx, scores)
        w = [new.fc1_weight, new.fc1_bias, new.fc2_weight, new.fc2_bias]
        got = moe_reference(x, logits, *w, None, None, None, None, None, None, **new.attrs)
    _close_to(ref, got)
    assert new.attrs == dict(num_experts=4, top_k=2, scoring="topk_softmax",
                             activation="clamped_swiglu", activation_alpha=1.702,
                             activation_limit=1.5)  # fmt: skip
    assert new.router_bias is block.router.bias and new.fc2_bias is block.experts.down_proj_bias


def test_gpt_oss_node_lowers_exactly_in_every_form(tmp_path):
    """The exported node carries alpha/limit; every standard-ONNX form and com.microsoft::MoE
    (swiglu with activation_alpha, activation_beta=1, swiglu_limit) == the block."""
    from ffnx.graph.ort import run_session
    from ffnx.lowering.moe_forms import FORMS
    from ffnx.lowering.moe_model import MoEConfig, moe_model
    from tests.lowering.test_moe_lowering import lowered

    block = hf_block("gpt_oss", HF_SUPPORTED)
    new = capture_moe("mlp", block, "ort")
    cfg = MoEConfig(D=64, H=96, E=4, k=2, activation="clamped_swiglu", scoring="topk_softmax",
                    bias=True, activation_limit=1.5)  # fmt: skip
    weights = {k: getattr(new, k).detach().numpy() for k in
               ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}  # fmt: skip
    model = moe_model(cfg, weights)
    attrs = {a.name: a for a in model.graph.node[-1].attribute}
    assert attrs["activation_limit"].f == 1.5 and abs(attrs["activation_alpha"].f - 1.702) < 1e-6
    for T in TOKENS:
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            ref = block(x[None])[0][0].numpy()
            logits = block.router(x)[0].numpy()
        for form in [*FORMS, "ort_moe"]:
            sess = ort_session(lowered(model, form))
            got = run_session(sess, {"hidden": x.numpy(), "router_logits": logits})["output"]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=f"{form} T={T}")


def test_gpt_oss_unknown_router_is_refused_with_one_line():
    block = hf_block("gpt_oss", HF_SUPPORTED)
    block.router = torch.nn.Linear(64, 4)
    with pytest.raises(ExportError) as info:
        capture_moe("model.layers.1.mlp", block, "ort")
    msg = str(info.value)
    assert "\n" not in msg and "model.layers.1.mlp (GptOssMLP)" in msg and "GptOssTopKRouter" in msg


@pytest.mark.parametrize("form", ["sorted_int4", "qmoe_int4", "sorted_int8", "qmoe_int8"])
def test_gpt_oss_quantized_experts_compute_with_the_dequantized_weights(form):
    """clamped_swiglu through MatMulNBits (sorted_*) and com.microsoft::QMoE (its swiglu with
    alpha, beta = 1, limit): the torch reference on the dequantized weights, up to the int8
    activation rounding of accuracy_level 4 (~1 % of the output scale)."""
    from ffnx.graph.ort import run_session
    from ffnx.lowering.moe_model import MoEConfig, moe_model
    from ffnx.plugins.reference import moe_reference
    from tests.lowering.test_moe_lowering import _dequantized, lowered

    block = hf_block("gpt_oss", HF_SUPPORTED)
    new = capture_moe("mlp", block, "ort")
    cfg = MoEConfig(D=64, H=96, E=4, k=2, activation="clamped_swiglu", scoring="topk_softmax",
                    bias=True, activation_limit=1.5)  # fmt: skip
    names = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    w = {k: getattr(new, k).detach().numpy() for k in names}
    sess = ort_session(lowered(moe_model(cfg, w), form))
    wq = {k: torch.from_numpy(v) for k, v in _dequantized(w, form, int(form[-1])).items()}
    for T in TOKENS:
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            logits = block.router(x)[0]
        ref = moe_reference(x, logits, *(wq[k] for k in names), *[None] * 6, **new.attrs).numpy()
        got = run_session(sess, {"hidden": x.numpy(), "router_logits": logits.numpy()})["output"]
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, atol=2e-2 * scale, rtol=0, err_msg=f"T={T}")
        cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
        assert cos > 0.999, (T, cos)
