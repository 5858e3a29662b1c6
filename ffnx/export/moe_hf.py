"""transformers MoE blocks -> `MoEOpModule` (one FfnxMoE node each): the readers
`moe_capture.capture_moe` applies. A block is read by its class: `HF_BLOCKS` + `HF_ROUTERS` (the
generic gate/experts/shared layout, one routing reader per router class), `HF_SPECIAL` (a reader
of its own) or `HF_REFUSED` (one line saying why FfnxMoE cannot express it). Every reader keeps
the block's numerics (tests/export/test_moe_capture.py compares swapped and original blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from ffnx.errors import RefusedError
from ffnx.export.moe_gpt_oss import gpt_oss_block
from ffnx.export.moe_op import MoEOpModule
from ffnx.plugins.schema import BASE_ACTIVATION, GATED_ACTIVATION, group_error


class Refused(RefusedError):
    """This block cannot be expressed as FfnxMoE; the message says why."""


def activation_name(act: nn.Module | str) -> str:
    """'silu' | 'gelu' (erf) | 'relu' for an activation module or config name, else Refused."""
    if isinstance(act, str):
        names = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
        if act not in names:
            raise Refused(f"activation {act!r} is not one of ffnx's (silu, gelu (erf), relu)")
        return names[act]
    n = type(act).__name__
    if n in ("SiLU", "SiLUActivation"):
        return "silu"
    if n == "GELUActivation" or (n == "GELU" and getattr(act, "approximate", "none") == "none"):
        return "gelu"
    if n == "ReLU":
        return "relu"
    raise Refused(f"activation {n} is not one of ffnx's (silu, gelu (erf), relu)")


def _no_bias(*linears: nn.Linear) -> None:
    for lin in linears:
        if lin.bias is not None:
            raise Refused("a shared-expert projection has a bias, which FfnxMoE does not take")


def shared_weights(mlp: nn.Module, routed_activation: str) -> dict[str, torch.Tensor]:
    """A gated MLP (gate_proj/up_proj/down_proj) as shared_fc1 = [gate; up], shared_fc2 = down;
    its activation must be the routed experts' (`swiglu` -> `silu`)."""
    routed_act = BASE_ACTIVATION.get(routed_activation, routed_activation)
    _no_bias(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    act = activation_name(getattr(mlp, "act_fn", None) or mlp.activation_fn)
    if act != routed_act:
        raise Refused(f"shared experts use {act} but routed experts {routed_act}")
    return {
        "shared_fc1_weight": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
        "shared_fc2_weight": mlp.down_proj.weight,
    }


# --------------------------------------------------------------------------------------------
# transformers


def _hf_experts(experts: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """transformers' fused experts (`use_experts_implementation` layout flags) -> fc1/fc2.

    The default `_apply_gate` reads gate_up as [gate; up] halves (whatever `is_concatenated`
    says: that flag only steers fused kernels), which is fc1's layout; a class with its own
    `_apply_gate` computes something else and is refused."""
    if getattr(experts, "has_post_expert_norm", False):
        raise Refused("experts apply a norm after the down projection")
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if gate_fn is not None and gate_fn.__name__ != "_default_apply_gate":
        raise Refused(f"experts use a custom gated activation ({gate_fn.__qualname__})")
    gated = getattr(experts, "has_gate", True)
    w1 = experts.gate_up_proj if gated else experts.up_proj
    w2 = experts.down_proj
    b1 = b2 = None
    if getattr(experts, "has_bias", False):
        b1 = experts.gate_up_proj_bias if gated else experts.up_proj_bias
        b2 = experts.down_proj_bias
    if getattr(experts, "is_transposed", False):
        w1, w2 = (w.detach().transpose(1, 2).contiguous() for w in (w1, w2))
    act = activation_name(experts.act_fn)
    weights = {"fc1_weight": w1, "fc1_bias": b1, "fc2_weight": w2, "fc2_bias": b2}
    kept = {k: v for k, v in weights.items() if v is not None}
    return kept, GATED_ACTIVATION[act] if gated else act


def _groups(r: nn.Module, scoring: str) -> dict:
    """A router's group-limited routing as FfnxMoE attributes ({} when it keeps every group)."""
    n_group, topk_group = int(r.num_group or 1), int(r.topk_group or 1)
    if n_group <= 1 or topk_group >= n_group:
        return {}
    E, k = int(r.weight.shape[0]), int(r.top_k)
    attrs = dict(n_group=n_group, topk_group=topk_group, group_scoring=scoring)
    err = group_error(dict(num_experts=E, top_k=k, **attrs))
    if err:
        raise Refused(f"group-limited routing: {err}")
    return attrs


def _softmax(normalize):
    return lambda r: {"scoring": "softmax", "normalize": int(normalize(r))}


def _deepseek_v3(r: nn.Module) -> dict:
    return {
        "scoring": "sigmoid",
        "normalize": int(r.norm_topk_prob),
        "routed_scaling_factor": float(r.routed_scaling_factor),
        "score_bias": r.e_score_correction_bias.detach().float(),
        **_groups(r, "top2_sum"),  # group score: sum of its top-2 biased sigmoid scores
    }


def _deepseek_v2(r: nn.Module) -> dict:
    if r.topk_method not in ("greedy", "group_limited_greedy"):
        raise Refused(f"topk_method {r.topk_method!r} is not plain or group-limited greedy")
    groups = _groups(r, "max") if r.topk_method == "group_limited_greedy" else {}
    scale = float(r.routed_scaling_factor)
    # transformers masks to 0, not -inf: the same choice, softmax scores being > 0 (one that
    # underflows to 0 weighs 0 whichever expert it picks)
    return {"scoring": "softmax", "normalize": 0, "routed_scaling_factor": scale, **groups}


_ALWAYS, _NEVER = (lambda r: True), (lambda r: False)
_NORM = lambda r: r.norm_topk_prob  # noqa: E731
_TOPK_SOFTMAX = lambda r: {"scoring": "topk_softmax"}  # noqa: E731

# router class -> its routing as FfnxMoE attributes (read from the eager forward of each)
HF_ROUTERS = {
    "MixtralTopKRouter": _softmax(_ALWAYS),
    "MiniMaxTopKRouter": _softmax(_ALWAYS),
    "Qwen2MoeTopKRouter": _softmax(_NORM),
    "Qwen3MoeTopKRouter": _softmax(_NORM),
    "Qwen3NextTopKRouter": _softmax(_NORM),
    "OlmoeTopKRouter": _softmax(_NORM),
    "FlexOlmoTopKRouter": _softmax(_NORM),
    "JambaTopKRouter": _softmax(_NEVER),
    "GraniteMoeTopKRouter": _TOPK_SOFTMAX,
    "GraniteMoeSharedTopKRouter": _TOPK_SOFTMAX,
    "GraniteMoeHybridTopKRouter": _TOPK_SOFTMAX,
    "DeepseekV3TopkRouter": _deepseek_v3,
    "Glm4MoeTopkRouter": _deepseek_v3,
    "Glm4MoeLiteTopkRouter": _deepseek_v3,  # GLM-4.7-Flash: DeepSeek-V3's router, MLA attention
    "DeepseekV2TopkRouter": _deepseek_v2,
    # ERNIE 4.5: softmax, the choice biased by moe_statics' e_score_correction_bias, weights
    # from the plain softmax, normalized by max(sum, moe_norm_min): the sum of k softmax
    # probabilities is >= k/E, far above moe_norm_min (1e-12), so plain normalization
    "Ernie4_5_MoeTopKRouter": lambda r: {
        "scoring": "softmax",
        "normalize": 1,
        "score_bias": r.moe_statics.e_score_correction_bias.detach().float().reshape(-1),
    },
    # the same forward as one above, class names aside (compared source to source, 5.25)
    "MellumTopKRouter": _softmax(_NORM),  # Qwen2-MoE's
    "Dots1TopkRouter": _deepseek_v3,
    "MiMoV2FlashTopkRouter": _deepseek_v3,
    "SolarOpenTopkRouter": _deepseek_v3,
    "ExaoneMoeTopkRouter": _deepseek_v3,  # reads config.num_experts instead
    "MiniCPM5MoeTopkRouter": _deepseek_v3,  # its linear under autocast disabled: fp32 anyway
}

# block class -> its children; any other child means semantics this reader does not know
HF_BLOCKS = {
    "MixtralSparseMoeBlock": {"gate", "experts"},
    "MiniMaxSparseMoeBlock": {"gate", "experts"},
    "Qwen2MoeSparseMoeBlock": {"gate", "experts", "shared_expert", "shared_expert_gate"},
    "Qwen3MoeSparseMoeBlock": {"gate", "experts"},
    "Qwen3NextSparseMoeBlock": {"gate", "experts", "shared_expert", "shared_expert_gate"},
    "OlmoeSparseMoeBlock": {"gate", "experts"},
    "FlexOlmoSparseMoeBlock": {"gate", "experts"},
    "JambaSparseMoeBlock": {"router", "experts"},
    "GraniteMoeMoE": {"router", "experts"},
    "GraniteMoeSharedMoE": {"router", "experts"},
    "GraniteMoeHybridMoE": {"router", "experts"},
    "DeepseekV3MoE": {"gate", "experts", "shared_experts"},
    "Glm4MoeMoE": {"gate", "experts", "shared_experts"},
    "Glm4MoeLiteMoE": {"gate", "experts", "shared_experts"},
    "DeepseekV2Moe": {"gate", "experts", "shared_experts"},
    # forwards equal to Qwen3-MoE's (Mellum) or DeepSeek-V3's block (the rest; MiMo-V2-Flash
    # without its shared experts)
    "MellumSparseMoeBlock": {"gate", "experts"},
    "Ernie4_5_MoeSparseMoeBlock": {"gate", "experts", "shared_experts"},
    "Dots1MoE": {"gate", "experts", "shared_experts"},
    "MiMoV2FlashMoE": {"gate", "experts"},
    "SolarOpenMoE": {"gate", "experts", "shared_experts"},
    "ExaoneMoeSparseMoEBlock": {"gate", "experts", "shared_experts"},
    "MiniCPM5MoeMoE": {"gate", "experts", "shared_experts"},
}

HF_REFUSED = {
    "PhimoeSparseMoeBlock": "sparsemixer routing (the second expert is picked after masking the "
    "first, weights from jitter-thresholded masked softmaxes) has no FfnxMoE scoring mode",
    "Llama4TextMoe": "the router score scales each expert's input, FFN(s*x), while FfnxMoE "
    "weights expert outputs, s*FFN(x); they differ for gated experts",
}


def _children(block: nn.Module, allowed: set[str]) -> set[str]:
    """The block's child names; Refused if any is not `allowed` (semantics unknown here)."""
    children = {n for n, _ in block.named_children()}
    if children - allowed:
        raise Refused(f"unexpected submodule(s) {sorted(children - allowed)} for this class")
    return children


def _hf_generic(block: nn.Module) -> MoEOpModule:
    cls = type(block).__name__
    children = _children(block, HF_BLOCKS[cls])
    router = block.gate if "gate" in children else block.router
    rcls = type(router).__name__
    if rcls not in HF_ROUTERS:
        raise Refused(f"router class {rcls} is not one ffnx reads")
    routing = dict(HF_ROUTERS[rcls](router))
    weights, activation = _hf_experts(block.experts)
    if "score_bias" in routing:
        weights["score_bias"] = routing.pop("score_bias")
    for shared in ("shared_expert", "shared_experts"):
        if shared in children:
            weights.update(shared_weights(getattr(block, shared), activation))
    if "shared_expert_gate" in children:
        gate = block.shared_expert_gate
        _no_bias(gate)
        weights["shared_gate_weight"] = gate.weight
    attrs = {"num_experts": int(router.weight.shape[0]), "top_k": int(router.top_k),
             "activation": activation, **routing}  # fmt: skip
    return MoEOpModule(weights, attrs, router_weight=router.weight, source=cls)


def _hf_dbrx(block: nn.Module) -> MoEOpModule:
    p = block.moe_normalize_expert_weights
    if p is not None and float(p) != 1.0:
        raise Refused(f"routing weights are divided by their L{p} norm; FfnxMoE normalizes by L1")
    glu, E = block.experts.mlp, int(block.experts.num_experts)
    H, D = int(block.experts.ffn_hidden_size), int(block.experts.hidden_size)
    act = activation_name(glu.activation_fn)
    weights = {
        "fc1_weight": torch.cat([glu.w1.view(E, H, D), glu.v1.view(E, H, D)], dim=1).detach(),
        "fc2_weight": glu.w2.view(E, H, D).transpose(1, 2).contiguous().detach(),
    }
    attrs = {"num_experts": E, "top_k": int(block.top_k), "scoring": "softmax",
             "normalize": int(p is not None), "activation": GATED_ACTIVATION[act]}  # fmt: skip
    return MoEOpModule(weights, attrs, router_weight=block.router.layer.weight, source="DbrxFFN")


def _hf_jetmoe(block: nn.Module) -> MoEOpModule:
    E = int(block.router.num_experts)
    fc2 = block.output_linear.weight
    weights = {
        "fc1_weight": block.input_linear.weight,
        "fc2_weight": fc2,
        "fc2_bias": block.bias.detach().expand(E, fc2.shape[1]).contiguous(),
    }
    attrs = {"num_experts": E, "top_k": int(block.router.top_k), "scoring": "topk_softmax",
             "activation": GATED_ACTIVATION[activation_name(block.activation)]}  # fmt: skip
    return MoEOpModule(weights, attrs, router_weight=block.router.layer.weight, source="JetMoeMoE")


def _biased_sigmoid(
    block: nn.Module,
    router_weight: torch.Tensor,
    top_k: int,
    bias: torch.Tensor,
    scale: float,
    shared: nn.Module | None,
) -> MoEOpModule:
    """p = sigmoid(x @ router_weight.T), experts = topk(p + bias), w = p[idx] / sum(p[idx]) *
    scale, plus a shared gated MLP (sum): DeepSeek-V3's routing without groups. Where the block
    divides by (sum + 1e-20), that changes no float32 sum of k sigmoids above 1e-12."""
    weights, activation = _hf_experts(block.experts)
    weights["score_bias"] = bias.detach().float()
    if shared is not None and shared.down_proj.weight.numel():
        weights.update(shared_weights(shared, activation))
    attrs = {"num_experts": int(router_weight.shape[0]), "top_k": int(top_k),
             "activation": activation, "scoring": "sigmoid", "normalize": 1,
             "routed_scaling_factor": float(scale)}  # fmt: skip
    return MoEOpModule(weights, attrs, router_weight=router_weight, source=type(block).__name__)


def _hf_minimax_m2(block: nn.Module) -> MoEOpModule:
    """MiniMax-M2: the block's e_score_correction_bias, no scaling, no shared experts."""
    _children(block, {"gate", "experts"})
    g = block.gate
    return _biased_sigmoid(block, g.weight, g.top_k, block.e_score_correction_bias, 1.0, None)


def _hf_afmoe(block: nn.Module) -> MoEOpModule:
    """AFMoE: the block's expert_bias, the router's route_scale, shared experts (or none)."""
    _children(block, {"router", "experts", "shared_experts"})
    r = block.router
    return _biased_sigmoid(block, r.gate.weight, r.top_k, block.expert_bias, r.route_scale,
                           block.shared_experts)  # fmt: skip


def _hf_hy_v3(block: nn.Module) -> MoEOpModule:
    """HY-V3: the block's e_score_correction_bias, the router's router_scaling_factor, shared
    experts (its fp32 combine is a no-op in fp32)."""
    _children(block, {"gate", "experts", "shared_experts"})
    g = block.gate
    return _biased_sigmoid(block, g.weight, g.top_k, block.e_score_correction_bias,
                           g.router_scaling_factor, block.shared_experts)  # fmt: skip


def _hf_laguna(block: nn.Module) -> MoEOpModule:
    """Laguna: the router's own e_score_correction_bias; the routed sum scaled by the block's
    routed_scaling_factor (= each w scaled); shared experts. A router logit soft-cap
    (cap·tanh(s/cap)) is not in FfnxMoE's schema: refused."""
    _children(block, {"gate", "experts", "shared_experts"})
    g = block.gate
    if g.router_logit_softcapping > 0.0:
        raise Refused("router logits are soft-capped (moe_router_logit_softcapping > 0)")
    return _biased_sigmoid(block, g.weight, g.top_k, g.e_score_correction_bias,
                           block.routed_scaling_factor, block.shared_experts)  # fmt: skip


def _hf_cohere2_moe(block: nn.Module) -> MoEOpModule:
    """Cohere 2 MoE: experts = topk(s); w = softmax over those k (`topk_softmax`), or sigmoid of
    them, optionally normalized (sigmoid is monotonic: topk(sigmoid(s)) picks the same experts).
    Shared experts combined by "sum" add; by "average", (routed + shared) / 2 = routed with w / 2
    plus shared with its down projection / 2 (halving is exact in floating point)."""
    children = _children(block, {"gate", "experts", "shared_experts"})
    r = block.gate
    weights, activation = _hf_experts(block.experts)
    if r.expert_selection_fn == "softmax":
        routing = {"scoring": "topk_softmax"}
    elif r.expert_selection_fn == "sigmoid":
        routing = {"scoring": "sigmoid", "normalize": int(bool(r.norm_topk_prob))}
    else:
        raise Refused(f"expert_selection_fn {r.expert_selection_fn!r}")
    strategy = block.shared_expert_combination_strategy
    if strategy not in ("sum", "average"):
        raise Refused(f"shared experts combined by {strategy!r}")
    half = strategy == "average" and "shared_experts" in children
    if "shared_experts" in children:
        shared = shared_weights(block.shared_experts, activation)
        if half:
            shared["shared_fc2_weight"] = shared["shared_fc2_weight"].detach() * 0.5
        weights.update(shared)
    attrs = {"num_experts": int(r.weight.shape[0]), "top_k": int(r.top_k),
             "activation": activation, "routed_scaling_factor": 0.5 if half else 1.0,
             **routing}  # fmt: skip
    return MoEOpModule(weights, attrs, router_weight=r.weight, source="Cohere2MoeSparseMoeBlock")


HF_SPECIAL = {"DbrxFFN": _hf_dbrx, "JetMoeMoE": _hf_jetmoe, "GptOssMLP": gpt_oss_block,
              "MiniMaxM2SparseMoeBlock": _hf_minimax_m2, "AfmoeSparseMoeBlock": _hf_afmoe,
              "HYV3MoE": _hf_hy_v3, "LagunaSparseMoeBlock": _hf_laguna,
              "Cohere2MoeSparseMoeBlock": _hf_cohere2_moe}  # fmt: skip


def hf_block(module: nn.Module) -> MoEOpModule | None:
    """The FfnxMoE twin of a transformers MoE block, None if not an MoE block, Refused if the
    block is MoE but cannot be expressed."""
    if not type(module).__module__.startswith("transformers."):
        return None
    cls = type(module).__name__
    if cls in HF_REFUSED:
        raise Refused(HF_REFUSED[cls])
    if cls in HF_SPECIAL:
        return HF_SPECIAL[cls](module)
    if cls in HF_BLOCKS:
        return _hf_generic(module)
    return None
