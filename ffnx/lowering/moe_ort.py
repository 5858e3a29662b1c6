"""Lowerings onto ONNX Runtime contrib ops (domain com.microsoft), each with its fit check.

ort_moe      com.microsoft::MoE. ORT 1.32 CPU: softmax over all E logits, top-k, optional
             renormalisation; activations relu/silu/swiglu (its gelu is the tanh approximation,
             so not used); gated weights as interleaved rows g0,u0,g1,u1,... (swiglu_fusion=1).
             Our scorings map onto it exactly:
               softmax, normalize n      -> router_probs = s, normalize_routing_weights = n
               topk_softmax              -> router_probs = s, normalize = 1 (softmax of the
                                            top-k logits = renormalised softmax restricted to them)
               sigmoid, no score_bias    -> router_probs = log sigmoid(s) = -softplus(-s):
                                            softmax(log p) = p / sum(p) keeps the top-k order;
                                            (normalize 0: see `_router`)
             routed_scaling_factor multiplies the output. Hash routing, score_bias and
             group-limited routing (n_group > 1) do not fit. clamped_swiglu (GPT-OSS) is its
             swiglu with activation_alpha = alpha, activation_beta = 1 (the up + 1) and
             swiglu_limit = limit: min(g, limit) * sigmoid(alpha * min(g, limit)) *
             (clamp(u, -limit, limit) + beta), the schema's formula.
qmoe_int4/8  com.microsoft::QMoE: the same, with block-wise symmetric int4/int8 expert weights;
             an unnormalised softmax or sigmoid goes in as router_weights = p beside
             router_probs = s (see `_router`): the op's renormalisation never sees it.
             A softmax / sigmoid routing the op cannot choose by itself (score_bias,
             group-limited) gives it the selection scores as router_probs (-inf outside the
             kept groups) and the weights row as router_weights (`_selection`). Others (hash,
             top-k-then-softmax in groups) are
             computed by `route` and handed over precomputed: router_probs = router_weights =
             R [T, E], R[t, idx[t, j]] = w[t, j] and -inf elsewhere (ScatterElements), with
             normalize_routing_weights = 0. QMoE takes the top-k of router_probs, which is
             exactly idx (k finite entries, E - k at -inf), and aggregates with router_weights'
             values there, so y = sum_j w_j FFN_idx_j(x) as in every other form (checked
             against numpy on ORT 1.32: the weights are used as given, not renormalised).
             Exact when a token's k experts are distinct (TopK's are; a hash table is checked).
sorted_int4/8  the `sorted` decomposition with com.microsoft::MatMulNBits expert projections.
"""

from __future__ import annotations

import numpy as np

from ffnx.graph.builder import Builder, f32, i64
from ffnx.graph.opsets import MS_DOMAIN
from ffnx.lowering.moe_common import (
    LoweringError,
    MoESite,
    group_mask,
    route,
    router_logits,
    router_scores,
    selection_scores,
)
from ffnx.lowering.moe_forms import sorted_experts
from ffnx.lowering.quantize import BITS, pick_block, quantize
from ffnx.plugins.schema import CLAMPED_SWIGLU, group_limited

ORT_ACTIVATIONS = ("relu", "silu", "swiglu", CLAMPED_SWIGLU)
# int8 activations in the quantized expert GEMMs: 4.3x (int4) / 2.2x (int8) over fp32 at T=1 on
# AVX2 (Mixtral-like layer, benchmarks/moe.py); with fp32 activations (0) int4 ran no faster than
# fp32 and MatMulNBits int8 fell back to a slow path (~50x slower).
ACCURACY_LEVEL = 4


def routing_misfit(s: MoESite) -> str | None:
    """Why the ops' own routing (softmax over router_probs, top-k) cannot compute this node's
    (None: it can)."""
    a = s.attrs
    if a["routing_mode"] != "router":
        return "hash routing"
    if group_limited(a):
        return f"group-limited routing (n_group={a['n_group']}, topk_group={a['topk_group']})"
    if s.inputs["score_bias"] is not None:
        return "score_bias (selection differs from weighting)"
    return None


def expert_misfit(s: MoESite) -> str | None:
    """Why the ops cannot compute this node's experts (None: they can)."""
    if s.activation not in ORT_ACTIVATIONS:
        return f"activation {s.activation} (ORT CPU MoE: {', '.join(ORT_ACTIVATIONS)})"
    if not s.is_const("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        return "expert weights are not initializers"
    return None


def ort_moe_misfit(s: MoESite) -> str | None:
    """Why com.microsoft::MoE cannot express this node (None: it can): it has no
    router_weights input, so its own routing must fit."""
    return routing_misfit(s) or expert_misfit(s)


def qmoe_misfit(s: MoESite) -> str | None:
    """Why com.microsoft::QMoE cannot express this node (None: it can). Any routing fits:
    one its own top-k cannot compute is passed precomputed (module docstring)."""
    if why := expert_misfit(s):
        return why
    table = s.value("hash_table") if s.attrs["routing_mode"] == "hash" else None
    if table is None and s.attrs["routing_mode"] == "hash":
        return "the hash table is not an initializer"
    if table is not None and table.ndim == 2 and table.shape[1] > 1:
        if (np.diff(np.sort(table, axis=1), axis=1) == 0).any():
            return "a hash-table row names an expert twice (a precomputed routing needs k distinct)"
    return quant_misfit(s)


def quant_misfit(s: MoESite) -> str | None:
    """Why the experts cannot be quantized block-wise (None: they can)."""
    if not s.is_const("fc1_weight", "fc2_weight"):
        return "expert weights are not initializers"
    if pick_block(s.D) is None or pick_block(s.H) is None:
        return f"D={s.D} and H={s.H} must be multiples of 16"
    return None


def _interleave(v: np.ndarray, gated: bool) -> np.ndarray:
    """[gate; up] rows along axis 1 -> g0, u0, g1, u1, ..."""
    if not gated:
        return v
    g, u = np.split(v, 2, axis=1)
    return np.stack([g, u], axis=2).reshape(v.shape)


def _router(b: Builder, s: MoESite, weights_input: bool = False):
    """-> (router_probs, router_weights or None, per-token output factor or None).

    ORT 1.32's CPU ops renormalise the top-k weights even with normalize_routing_weights=0.
    QMoE (`weights_input`) takes the unnormalised scores p as router_weights and selects by the
    logits (softmax and sigmoid are increasing, so the logits' top-k is p's): no extra kernel.
    MoE has no such input: it gets normalize=1 and y * sum_j p_j restores normalize=0 (top-k p;
    y is linear in w)."""
    logits = router_logits(b, s)
    scoring, normalize = s.attrs["scoring"], int(s.attrs["normalize"])
    if scoring == "topk_softmax":
        return logits, None, None
    if weights_input and not normalize:
        return logits, router_scores(b, s, logits), None
    if scoring == "softmax":
        probs = logits
    else:
        probs = b.op("Neg", b.op("Softplus", b.op("Neg", logits)))
    if normalize:
        return probs, None, None
    top, _ = b.op("TopK", router_scores(b, s, logits), i64(s.k), axis=1, n_out=2)
    return probs, None, b.reduce_sum(top, 1, keepdims=1)


def _precomputed(b: Builder, s: MoESite):
    """`route`'s (idx, w) as R [T, E]: w at idx, -inf elsewhere (the module docstring)."""
    idx, w = route(b, s)
    rows = b.op("Shape", idx, start=0, end=1)
    shape = b.op("Concat", rows, i64(s.E), axis=0)
    empty = b.op("Expand", f32(-np.inf).reshape(1, 1), shape)
    return b.op("ScatterElements", empty, idx, w, axis=1)


def _selection(b: Builder, s: MoESite):
    """-> (router_probs, router_weights) [T, E] for a softmax or sigmoid router whose choice
    QMoE cannot compute (a score_bias, group-limited routing): the selection scores choose
    (p + bias, experts outside the kept groups at -inf, as `route`), and the weights row is p
    times the token's factor scale / sum_j p_j over the chosen j (scale alone without
    normalize), so QMoE's weights at its choice are `route`'s w. Four kernels fewer than
    `_precomputed`'s scatter (none of `route`'s TopK without normalize). Exact where QMoE's
    top-k and TopK pick the same experts: always, but for exact ties of selection scores."""
    a = s.attrs
    p, sel = selection_scores(b, s, router_logits(b, s))
    if group_limited(a):
        sel = group_mask(b, s, sel)
    scale = float(a["routed_scaling_factor"])
    if not int(a["normalize"]):
        return sel, (p if scale == 1.0 else b.mul(p, f32(scale)))
    _, idx = b.op("TopK", sel, i64(s.k), axis=1, n_out=2)
    total = b.reduce_sum(b.op("GatherElements", p, idx, axis=1), 1, keepdims=1)
    return sel, b.mul(p, b.op("Div", f32(scale), total))


def _fused(b: Builder, s: MoESite, x, op: str, weights: list, **attrs):
    misfit = ort_moe_misfit(s) if op == "MoE" else qmoe_misfit(s)
    if misfit:
        raise LoweringError(f"{s.node.name}: {op} cannot express {misfit}")
    own = routing_misfit(s) is None
    slot = [None] * (14 - 2 - len(weights))  # QMoE's router_weights is input 14
    if own:
        probs, given, factor = _router(b, s, weights_input=op == "QMoE")
        extra, normalize = ([], 1) if given is None else ([*slot, given], 0)
    elif s.attrs["routing_mode"] == "router" and s.attrs["scoring"] != "topk_softmax":
        (probs, given), factor = _selection(b, s), None  # the scaling factor is in the weights
        extra, normalize = [*slot, given], 0
    else:  # routed here; the scaling factor is already in w
        probs, factor = _precomputed(b, s), None
        extra, normalize = [*slot, probs], 0
    act = "swiglu" if s.gated else s.activation
    fusion = {"swiglu_fusion": 1} if s.gated else {}
    if s.activation == CLAMPED_SWIGLU:
        fusion.update(activation_alpha=float(s.attrs["activation_alpha"]), activation_beta=1.0,
                      swiglu_limit=float(s.attrs["activation_limit"]))  # fmt: skip
    y = b.op(
        op,
        x,
        probs,
        *weights,
        *extra,
        domain=MS_DOMAIN,
        k=s.k,
        activation_type=act,
        normalize_routing_weights=normalize,
        **fusion,
        **attrs,
    )
    if factor is not None:
        y = b.mul(y, factor)
    scale = float(s.attrs["routed_scaling_factor"]) if own else 1.0
    return y if scale == 1.0 else b.mul(y, f32(scale))


def _bias(b: Builder, s: MoESite, name: str, interleave: bool = False):
    v = s.value(name)
    if v is None:
        return None
    return s.constant(b, ("ort", name, interleave), lambda: _interleave(v, interleave), name)


def ort_moe(b: Builder, s: MoESite, x):
    fc1 = b.const(_interleave(s.value("fc1_weight"), s.gated), "fc1_weight")
    weights = [
        fc1,
        _bias(b, s, "fc1_bias", s.gated),
        s.tensor(b, "fc2_weight"),
        _bias(b, s, "fc2_bias"),
    ]
    return _fused(b, s, x, "MoE", weights)


def qmoe(bits: int):
    def lower(b: Builder, s: MoESite, x):
        misfit = quant_misfit(s)
        if misfit:
            raise LoweringError(f"{s.node.name}: cannot quantize experts: {misfit}")
        block = min(pick_block(s.D), pick_block(s.H))
        q1 = quantize(_interleave(s.value("fc1_weight"), s.gated), bits, block)
        q2 = quantize(s.value("fc2_weight"), bits, block)
        weights = [
            b.const(q1.packed, "fc1_q"),
            b.const(q1.scales, "fc1_scales"),
            _bias(b, s, "fc1_bias", s.gated),
            b.const(q2.packed, "fc2_q"),
            b.const(q2.scales, "fc2_scales"),
            _bias(b, s, "fc2_bias"),
        ]
        return _fused(
            b,
            s,
            x,
            "QMoE",
            weights,
            expert_weight_bits=bits,
            block_size=block,
            accuracy_level=ACCURACY_LEVEL,
        )

    return lower


def sorted_nbits(bits: int, accuracy_level: int = ACCURACY_LEVEL):
    def lower(b: Builder, s: MoESite, x):
        misfit = quant_misfit(s)
        if misfit:
            raise LoweringError(f"{s.node.name}: cannot quantize experts: {misfit}")
        quant = {
            "fc1": quantize(s.value("fc1_weight"), bits, pick_block(s.D)),
            "fc2": quantize(s.value("fc2_weight"), bits, pick_block(s.H)),
        }

        def linear(b: Builder, s: MoESite, rows, fc: str, e: int):
            q = quant[fc]
            N, K = q.shape[1:]
            bias = s.value(f"{fc}_bias")
            return b.op(
                "MatMulNBits",
                rows,
                s.constant(b, (fc, e, bits, "q"), lambda: q.blocked()[e], f"{fc}{e}_q"),
                s.constant(
                    b, (fc, e, bits, "scales"), lambda: q.scales[e].reshape(-1), f"{fc}{e}_scales"
                ),  # fmt: skip
                None,
                None,
                None
                if bias is None
                else s.constant(
                    b, (fc, e, "bias"), lambda: bias[e].copy(), f"{fc}{e}_bias"
                ),  # fmt: skip
                domain=MS_DOMAIN,
                K=K,
                N=N,
                bits=bits,
                block_size=q.block,
                accuracy_level=accuracy_level,
            )

        idx, w = route(b, s)
        return sorted_experts(b, s, x, idx, w, linear=linear)

    return lower


ORT_FORMS = {"ort_moe": ort_moe}
for _name, _bits in BITS.items():
    ORT_FORMS[f"qmoe_{_name}"] = qmoe(_bits)
    ORT_FORMS[f"sorted_{_name}"] = sorted_nbits(_bits)

__all__ = ["ORT_FORMS", "ort_moe_misfit", "qmoe_misfit", "quant_misfit"]
