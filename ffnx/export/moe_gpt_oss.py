"""Capture rule for transformers' GPT-OSS MoE block (`GptOssMLP`) as one `ffnx::FfnxMoE` node.

GPT-OSS (transformers `modeling_gpt_oss.py`), on tokens x [T, D]:

    logits = x @ W_r.T + b_r                       router with a bias    [T, E]
    v, idx = topk(logits, k);  w = softmax(v)      top-k first, then the softmax over those k
    gu     = x @ gate_up_proj[e] + gate_up_bias[e] columns interleaved: g0, u0, g1, u1, ...
    g      = min(gu[..., ::2], limit);  u = clamp(gu[..., 1::2], -limit, limit)
    y_e    = (g * sigmoid(alpha * g) * (u + 1)) @ down_proj[e] + down_bias[e]
    y      = sum_j w_j * y_{idx_j}

As FfnxMoE: the router logits (bias included) are computed outside the node (a MatMul + Add),
scoring = "topk_softmax" (exactly topk then softmax over the k values), activation =
"clamped_swiglu" with activation_alpha = alpha and activation_limit = limit, fc1 = the
de-interleaved [gate; up] rows of gate_up_proj transposed to [E, 2H, D] (and its bias the same
way), fc2 = down_proj transposed to [E, D, H], fc2_bias = down_proj_bias. Every step is a
permutation or a transpose of the block's parameters, so the twin computes the same sums in
float32 (the only difference is summation order inside the GEMMs).

The block returns (hidden, router_scores); the decoder layer drops the scores, and the twin
returns (hidden, None) so that unpacking still works.
"""

from __future__ import annotations

import torch
from torch import nn

from ffnx.errors import RefusedError
from ffnx.export.moe_op import MoEOpModule
from ffnx.plugins.schema import CLAMPED_SWIGLU


class GptOssMoEOp(MoEOpModule):
    """GptOssMLP's twin: (hidden) -> (FfnxMoE output, None) like the block's 2-tuple."""

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None):
        return super().forward(hidden, token_ids), None


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """g0, u0, g1, u1, ... along `dim` -> [g0, g1, ...; u0, u1, ...]."""
    n = t.shape[dim]
    even = t.index_select(dim, torch.arange(0, n, 2, device=t.device))
    odd = t.index_select(dim, torch.arange(1, n, 2, device=t.device))
    return torch.cat([even, odd], dim=dim).contiguous()


def gpt_oss_block(block: nn.Module) -> MoEOpModule:
    """GptOssMLP -> its FfnxMoE twin (module docstring); RefusedError naming what differs."""
    children = {n for n, _ in block.named_children()}
    if children != {"router", "experts"}:
        raise RefusedError(f"unexpected submodules {sorted(children)} (want router, experts)")
    router, experts = block.router, block.experts
    if type(router).__name__ != "GptOssTopKRouter":
        raise RefusedError(f"router class {type(router).__name__} is not GptOssTopKRouter")
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if (
        type(experts).__name__ != "GptOssExperts"
        or gate_fn is None
        or (gate_fn.__qualname__ != "GptOssExperts._apply_gate")
    ):
        raise RefusedError(f"experts class {type(experts).__name__} is not GptOssExperts")
    w1 = experts.gate_up_proj.detach().transpose(1, 2)  # [E, 2H, D], rows g0, u0, g1, u1, ...
    weights = {
        "fc1_weight": _deinterleave(w1, 1),
        "fc1_bias": _deinterleave(experts.gate_up_proj_bias.detach(), 1),
        "fc2_weight": experts.down_proj.detach().transpose(1, 2).contiguous(),  # [E, D, H]
        "fc2_bias": experts.down_proj_bias,
    }
    attrs = {
        "num_experts": int(router.weight.shape[0]),
        "top_k": int(router.top_k),
        "scoring": "topk_softmax",
        "activation": CLAMPED_SWIGLU,
        "activation_alpha": float(experts.alpha),
        "activation_limit": float(experts.limit),
    }
    return GptOssMoEOp(
        weights, attrs, router_weight=router.weight, router_bias=router.bias, source="GptOssMLP"
    )
