"""`ffnx::moe`: the MoE op in torch (custom op), at ONNX export (one `ffnx::FfnxMoE` node).

Contract: `ffnx.plugins.schema.MOE`. Eager math is `ffnx.plugins.reference.moe_reference`, the one
torch reference. `MoEOpModule` is what capture rules swap in for an MoE block: it holds the stacked
expert weights, computes router logits with the block's own router weight (a plain MatMul in the
graph) and calls `moe()`, which during `torch.onnx.export` becomes exactly one node:

    FfnxMoE(hidden, router_logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, score_bias,
            token_ids, hash_table, shared_fc1_weight, shared_fc2_weight, shared_gate_weight)
    domain "ffnx", attributes = schema attributes (plugin_namespace="ffnx", plugin_version="1")

Absent optional inputs are empty input names in their schema positions (trailing ones dropped).
`torch.onnx.ops.symbolic` emits the node inside the forward, so `export_onnx` needs no
translation table and dynamic dims stay symbolic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ffnx.plugins import schema
from ffnx.plugins.schema import MOE

INPUTS = tuple(p.name for p in MOE.inputs)
ROUTING_ATTRS = ("num_experts", "top_k", "routing_mode", "scoring", "normalize",
                 "routed_scaling_factor", "activation", *schema.GROUP_ATTRS,
                 *schema.CLAMPED_ATTRS)  # fmt: skip


@torch.library.custom_op("ffnx::moe", mutates_args=())
def moe_op(
    hidden: torch.Tensor,
    router_logits: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    score_bias: torch.Tensor | None,
    token_ids: torch.Tensor | None,
    hash_table: torch.Tensor | None,
    shared_fc1_weight: torch.Tensor | None,
    shared_fc2_weight: torch.Tensor | None,
    shared_gate_weight: torch.Tensor | None,
    num_experts: int,
    top_k: int,
    routing_mode: str,
    scoring: str,
    normalize: int,
    routed_scaling_factor: float,
    activation: str,
    n_group: int = 1,
    topk_group: int = 0,
    group_scoring: str = "top2_sum",
    activation_alpha: float = schema.CLAMPED_DEFAULTS["activation_alpha"],
    activation_limit: float = schema.CLAMPED_DEFAULTS["activation_limit"],
) -> torch.Tensor:
    """Eager `ffnx::moe`: the schema's math via the single torch reference."""
    from ffnx.plugins.reference import moe_reference

    return moe_reference(
        hidden, router_logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, score_bias,
        token_ids, hash_table, shared_fc1_weight, shared_fc2_weight, shared_gate_weight,
        num_experts=num_experts, top_k=top_k, routing_mode=routing_mode, scoring=scoring,
        normalize=normalize, routed_scaling_factor=routed_scaling_factor, activation=activation,
        n_group=n_group, topk_group=topk_group, group_scoring=group_scoring,
        activation_alpha=activation_alpha, activation_limit=activation_limit,
    ).contiguous()  # fmt: skip


@moe_op.register_fake
def _moe_fake(hidden, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(hidden)


def moe(inputs: dict[str, torch.Tensor | None], attrs: dict) -> torch.Tensor:
    """One MoE layer: `ffnx::FfnxMoE` under `torch.onnx.export`, `torch.ops.ffnx.moe` otherwise.

    inputs: schema input name -> tensor (missing names are absent); attrs: the routing attributes.
    """
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise ValueError(f"unknown FfnxMoE input(s) {sorted(unknown)}; known: {INPUTS}")
    args = [inputs.get(n) for n in INPUTS]
    full = {**MOE.defaults(), **attrs}
    hidden = args[0]
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{schema.DOMAIN}::{MOE.op_type}",
            args,
            {name: full[name] for name in schema.written_attrs(full)},
            dtype=hidden.dtype,
            shape=hidden.shape,
            version=schema.DOMAIN_VERSION,
        )
    return moe_op(*args, **{k: full[k] for k in ROUTING_ATTRS})


class MoEOpModule(torch.nn.Module):
    """An MoE layer as one `ffnx::moe` call, with the weights laid out as the schema wants.

    router_weight [E, D]: logits = hidden @ router_weight.T (+ router_bias [E] when given; a
    plain MatMul and Add in the graph); None for hash routing. Tensors in `weights` (schema
    input names) are registered as parameters (float) or buffers (int64, score_bias); passing
    an existing Parameter shares it (no copy). `attrs`: the routing attributes (schema
    defaults for missing ones), cast to the schema's kinds; group attributes are checked
    against E (`schema.group_error`).
    """

    ffnx_op_type = MOE.op_type

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        attrs: dict,
        router_weight: torch.Tensor | None = None,
        source: str = "",
        router_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        bad = set(weights) - set(INPUTS[2:])
        if bad:
            raise ValueError(f"unknown MoE weight(s) {sorted(bad)}")
        if router_bias is not None and router_weight is None:
            raise ValueError("router_bias needs router_weight")
        routers = [("router_weight", router_weight), ("router_bias", router_bias)]
        for name, t in [*routers, *weights.items()]:
            if t is None:
                continue
            if isinstance(t, torch.nn.Parameter) or (
                t.is_floating_point() and name != "score_bias"
            ):
                self.register_parameter(name, _param(t))
            else:
                self.register_buffer(name, t.detach())
        kinds = {"int": int, "float": float, "string": str}
        self.attrs = {k: kinds[MOE.attr(k).kind](attrs[k]) for k in ROUTING_ATTRS if k in attrs}
        fc1 = weights.get("fc1_weight")
        E = int(fc1.shape[0]) if fc1 is not None else self.attrs.get("num_experts", 0)
        if err := schema.group_error({**self.attrs, "num_experts": E}):
            raise ValueError(f"group-limited routing: {err}")
        # blocks that call `ffn(h, token_ids)` for hash-routed layers read this flag
        self.needs_token_ids = self.attrs.get("routing_mode") == "hash"
        self.source = source

    def _get(self, name: str) -> torch.Tensor | None:
        return getattr(self, name, None)

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None):
        logits = None
        if self._get("router_weight") is not None:
            logits = F.linear(hidden, self.router_weight, self._get("router_bias"))
        inputs = {n: self._get(n) for n in INPUTS[2:]}
        inputs.update(hidden=hidden, router_logits=logits)
        if token_ids is not None:
            inputs["token_ids"] = token_ids
        return moe(inputs, self.attrs)

    def extra_repr(self) -> str:
        fc1 = tuple(self.fc1_weight.shape)
        return f"source={self.source!r}, fc1={fc1}, " + ", ".join(
            f"{k}={v!r}" for k, v in self.attrs.items()
        )


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    if isinstance(t, torch.nn.Parameter):
        return t
    return torch.nn.Parameter(t.detach(), requires_grad=False)
