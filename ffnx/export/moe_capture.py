"""Capture rules for MoE blocks: each supported block becomes a `MoEOpModule` (one FfnxMoE node).

Every rewrite keeps the block's numerics (tests compare swapped and original modules):

- experts are stacked as fc1 [E, H1, D] ([gate; up] rows for gated activations), fc2 [E, D, H];
  transformers' fused 3-D expert parameters already have this layout and are shared, not copied;
- shared experts (several are one wide FFN) become shared_fc1 = [gate; up], shared_fc2 = down;
- Duo-LLM small/big/skip experts are zero-padded to the big width: act(0) = 0 for every
  activation in the schema, so padded channels add exactly 0; the skip expert is all-zero;
- JetMoE's output bias b is folded into every expert's fc2 bias: its top-k softmax weights sum
  to 1, so sum_j w_j (y_j + b) = sum_j w_j y_j + b.

transformers blocks are read in `ffnx.export.moe_hf`; GPT-OSS (`GptOssMLP`: router bias, top-k
then softmax, clamped SwiGLU with interleaved gate/up columns, expert biases) in
`ffnx.export.moe_gpt_oss`.

Group-limited routing (DeepSeek-V2/V3, GLM-4.5 with n_group > 1) becomes the n_group /
topk_group / group_scoring attributes when it restricts the choice (topk_group < n_group).

A supported architecture whose configuration the schema cannot express (an unknown activation,
groups the schema does not allow, ...) and the refused architectures raise `ExportError` naming
the module, its class and the reason. Unknown modules are left alone (the stock exporter handles
them, or reports why not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ffnx.errors import ExportError, RefusedError
from ffnx.export.moe_hf import hf_block
from ffnx.export.moe_op import MoEOpModule
from ffnx.graph.onnx_schemas import register_onnx_schemas

# --------------------------------------------------------------------------------------------
# ffnx zoo (ffnx.models.moe)


def _expert_tensors(expert: nn.Module, width: int, gated: bool, D: int, like: torch.Tensor):
    """One zoo expert as (fc1 [H1, D], b1 [H1] | None, fc2 [D, width], b2 [D] | None), its
    channels zero-padded to `width`: a padded channel's pre-activation is 0 and act(0) = 0 (times
    up = 0 when gated), so it adds exactly nothing. A SkipExpert is all zeros."""
    if type(expert).__name__ == "SkipExpert":
        return like.new_zeros((2 if gated else 1) * width, D), None, like.new_zeros(D, width), None
    first = [expert.gate, expert.up] if gated else [expert.fc1]
    last = expert.down if gated else expert.fc2
    grow = lambda t: F.pad(t.detach(), (0, 0) * (t.dim() - 1) + (0, width - t.shape[0]))  # noqa: E731
    fc1 = torch.cat([grow(lin.weight) for lin in first])
    b1 = None if first[0].bias is None else torch.cat([grow(lin.bias) for lin in first])
    fc2 = F.pad(last.weight.detach(), (0, width - last.in_features))
    return fc1, b1, fc2, None if last.bias is None else last.bias.detach()


def _stack(ts: list[torch.Tensor | None], shape: tuple, like: torch.Tensor):
    """Stack per-expert tensors; a missing one (a skip expert's bias) is zeros."""
    if all(t is None for t in ts):
        return None
    return torch.stack([like.new_zeros(shape) if t is None else t for t in ts])


def zoo_block(module: nn.Module) -> MoEOpModule | None:
    """The FfnxMoE twin of an ffnx zoo MoE layer (`ffnx.models.moe.MoE`), else None (also when
    its activation is not a schema activation: the stock exporter handles it then)."""
    from ffnx.models.moe import MoE
    from ffnx.plugins.schema import ACTIVATIONS, GATED_ACTIVATIONS

    if not isinstance(module, MoE) or module.activation not in ACTIVATIONS:
        return None
    gated = module.activation in GATED_ACTIVATIONS
    width = max(max(module.expert_hidden), 1)
    like = next(module.parameters())  # dtype and device
    experts = [_expert_tensors(e, width, gated, module.dim, like) for e in module.experts]
    fc1, b1, fc2, b2 = zip(*experts)
    weights = {"fc1_weight": torch.stack(fc1), "fc2_weight": torch.stack(fc2)}
    for key, ts in (("fc1_bias", b1), ("fc2_bias", b2)):
        shape = (fc1[0].shape[0],) if key == "fc1_bias" else (module.dim,)
        if (t := _stack(list(ts), shape, like)) is not None:
            weights[key] = t
    if module.score_bias is not None:
        weights["score_bias"] = module.score_bias.detach().float()
    if module.shared is not None:
        sh = module.shared
        lins = [sh.gate, sh.up, sh.down] if gated else [sh.fc1, sh.fc2]
        if any(lin.bias is not None for lin in lins):
            return None
        weights["shared_fc1_weight"] = torch.cat([lin.weight for lin in lins[:-1]]).detach()
        weights["shared_fc2_weight"] = lins[-1].weight
    if module.shared_gate is not None:
        weights["shared_gate_weight"] = module.shared_gate.weight
    hashed = module.routing_mode == "hash"
    if hashed:
        weights["hash_table"] = module.hash_table
    attrs = {"num_experts": module.num_experts, "activation": module.activation,
             "top_k": int(module.hash_table.shape[1]) if hashed else module.top_k,
             "routing_mode": module.routing_mode, "scoring": module.scoring,
             "normalize": int(module.normalize),
             "routed_scaling_factor": module.routed_scaling_factor}  # fmt: skip
    router = None if hashed else module.router.weight
    return MoEOpModule(weights, attrs, router_weight=router, source=type(module).__name__)


# --------------------------------------------------------------------------------------------
# rule


def capture_moe(name: str, module: nn.Module, target: str) -> nn.Module | None:
    """Capture rule (listed in `capture.default_rules`): MoE blocks (ffnx zoo, transformers) ->
    MoEOpModule."""
    try:
        new = hf_block(module)
        if new is None:
            new = zoo_block(module)
    except RefusedError as e:  # Refused here, or from the per-architecture modules
        raise ExportError(
            f"cannot export MoE block {name} ({type(module).__qualname__}) as ffnx::FfnxMoE: {e}"
        ) from None
    if new is not None:
        register_onnx_schemas()
        new.train(module.training)
    return new
