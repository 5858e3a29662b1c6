"""The torch reference of every ffnx op: the one place that says, in code, what the schemas in
`ffnx.plugins.schema` mean. Export (the `ffnx::moe` custom op), the ORT lowerings' tests and the
CUDA kernels' tests all compare against these functions.

Numerics: inputs of any float dtype are computed in float32 (a float16/bfloat16 model gets float32
accumulation, as the kernels do) and the output is cast back to `hidden`'s dtype. Works on CPU and
CUDA; vectorised over tokens (the MoE loops over experts only).

MoE (x = hidden flattened to [T, D]):
  router  s = router_logits [T, E]
    softmax       p = softmax(s);  idx = topk(p, k);  w = p[idx]
    topk_softmax  v, idx = topk(s, k);  w = softmax(v)
    sigmoid       p = sigmoid(s);  idx = topk(p + score_bias, k);  w = p[idx]
                  (softmax with a score_bias likewise: idx = topk(p + score_bias, k), w = p[idx])
    normalize=1   w = w / sum_j w_j;   then always  w = w * routed_scaling_factor
    n_group > 1   idx = topk over sel (p, s, p + score_bias) with the experts outside the
                  topk_group best of n_group contiguous groups masked to -inf; group score =
                  sum of its top-2 sel (top2_sum) or its max sel (max); w from unmasked p
  hash    idx = hash_table[token_ids] [T, k];  w = routed_scaling_factor / k
  FFN_e(x) = act(x @ fc1_weight[e].T + fc1_bias[e]) @ fc2_weight[e].T + fc2_bias[e]
  y = sum_j w_j * FFN_{idx_j}(x) + shared(x),  shared(x) = act(x @ Ws1.T) @ Ws2.T
      (times sigmoid(x @ shared_gate_weight.T) when the gate is given)
  Gated activations split fc1's output into [gate; up] halves: act(h) = base(gate) * up with
  base = silu (swiglu), gelu-erf (geglu), relu (reglu); clamped_swiglu (GPT-OSS):
  g = min(gate, limit), u = clamp(up, -limit, limit), act(h) = g * sigmoid(alpha * g) * (u + 1).
  Expert ids outside [0, E) (a bad hash table) select nothing.

Sparse FFN:
  gated      a = base(x @ w_gate.T),  u = x @ w_up.T,  y = (keep * a * u) @ w_down.T + b_down
  non-gated  a = act(x @ w_up.T + b_up),               y = (keep * a) @ w_down.T + b_down
  keep = |a| > thresholds (mode='threshold') or the k largest |a| per token (mode='topk').
  For a gated FFN the activation names the gate's nonlinearity (swiglu and silu both mean silu);
  b_up belongs to non-gated FFNs only (the schema's gated formula has no up bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ffnx.plugins.schema import (
    ACTIVATIONS,
    BASE_ACTIVATION,
    CLAMPED_DEFAULTS,
    CLAMPED_SWIGLU,
    GATED_ACTIVATIONS,
    group_error,
    group_limited,
)

_FUNCS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "relu": F.relu,
}


def base_activation(name: str):
    """The elementwise function of an activation name (a gated name gives its gate function)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {ACTIVATIONS}")
    return _FUNCS[BASE_ACTIVATION.get(name, name)]


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float):
    """GPT-OSS's expert activation: g = min(gate, limit), u = clamp(up, -limit, limit),
    g * sigmoid(alpha * g) * (u + 1)."""
    g = gate.clamp(max=limit)
    return g * torch.sigmoid(alpha * g) * (up.clamp(-limit, limit) + 1)


def activate(
    h: torch.Tensor,
    activation: str,
    activation_alpha: float = CLAMPED_DEFAULTS["activation_alpha"],
    activation_limit: float = CLAMPED_DEFAULTS["activation_limit"],
) -> torch.Tensor:
    """act(h) over the last dim; gated activations read h as [gate; up] halves (not interleaved);
    alpha and limit are read by clamped_swiglu only."""
    if activation == CLAMPED_SWIGLU:
        gate, up = h.chunk(2, dim=-1)
        return clamped_swiglu(gate, up, activation_alpha, activation_limit)
    f = base_activation(activation)
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        return f(gate) * up
    return f(h)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def route(
    router_logits: torch.Tensor | None,
    score_bias: torch.Tensor | None,
    token_ids: torch.Tensor | None,
    hash_table: torch.Tensor | None,
    *,
    num_experts: int,
    top_k: int,
    routing_mode: str,
    scoring: str,
    normalize: int,
    routed_scaling_factor: float,
    n_group: int = 1,
    topk_group: int = 0,
    group_scoring: str = "top2_sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids idx [T, k] (int64) and routing weights w [T, k] (float32), per the schema."""
    groups = dict(n_group=n_group, topk_group=topk_group, group_scoring=group_scoring)
    err = group_error(dict(num_experts=num_experts, top_k=top_k, routing_mode=routing_mode,
                           **groups))  # fmt: skip
    if err:
        raise ValueError(err)
    if routing_mode == "hash":
        if token_ids is None or hash_table is None:
            raise ValueError("routing_mode='hash' needs token_ids and hash_table")
        idx = hash_table[token_ids.reshape(-1)].long()
        w = torch.full(idx.shape, routed_scaling_factor / idx.shape[1], device=idx.device)
        return idx, w
    if routing_mode != "router":
        raise ValueError(f"unknown routing_mode {routing_mode!r}")
    if router_logits is None:
        raise ValueError("routing_mode='router' needs router_logits")
    s = router_logits.reshape(-1, num_experts).float()
    if group_limited(groups):
        idx, w = _group_route(s, score_bias, top_k, scoring, **groups)
    elif scoring == "topk_softmax":
        v, idx = s.topk(top_k, dim=-1)
        w = torch.softmax(v, dim=-1)
    elif scoring in ("softmax", "sigmoid"):  # a score_bias moves the choice, not the weights
        p = torch.softmax(s, dim=-1) if scoring == "softmax" else torch.sigmoid(s)
        sel = p if score_bias is None else p + score_bias.float()
        idx = sel.topk(top_k, dim=-1).indices
        w = p.gather(-1, idx)
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w * routed_scaling_factor


def group_mask(sel: torch.Tensor, n_group: int, topk_group: int, group_scoring: str):
    """sel [T, E] with the experts outside each token's topk_group best groups set to -inf."""
    T, E = sel.shape
    g = sel.reshape(T, n_group, E // n_group)
    score = g.topk(2, dim=-1).values.sum(-1) if group_scoring == "top2_sum" else g.amax(-1)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(topk_group, dim=-1).indices, True)
    return g.masked_fill(~keep.unsqueeze(-1), float("-inf")).reshape(T, E)


def _group_route(s, score_bias, top_k, scoring, n_group, topk_group, group_scoring):
    """Group-limited (idx, w before normalize/scale) from logits s [T, E] (module docstring)."""
    if scoring == "topk_softmax":
        p = sel = s
    elif scoring in ("softmax", "sigmoid"):
        p = torch.softmax(s, dim=-1) if scoring == "softmax" else torch.sigmoid(s)
        sel = p if score_bias is None else p + score_bias.float()
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    idx = group_mask(sel, n_group, topk_group, group_scoring).topk(top_k, dim=-1).indices
    w = p.gather(-1, idx)
    return idx, torch.softmax(w, dim=-1) if scoring == "topk_softmax" else w


def moe_reference(
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
    *,
    num_experts: int,
    top_k: int,
    routing_mode: str = "router",
    scoring: str = "softmax",
    normalize: int = 0,
    routed_scaling_factor: float = 1.0,
    activation: str = "swiglu",
    n_group: int = 1,
    topk_group: int = 0,
    group_scoring: str = "top2_sum",
    activation_alpha: float = CLAMPED_DEFAULTS["activation_alpha"],
    activation_limit: float = CLAMPED_DEFAULTS["activation_limit"],
) -> torch.Tensor:
    """`ffnx::FfnxMoE` (module docstring): hidden [*, D] -> [*, D], same dtype as hidden.

    Weights: fc1_weight [E, H1, D] (H1 = 2H when gated), fc2_weight [E, D, H], biases [E, H1] and
    [E, D], shared_fc1_weight [Hs1, D], shared_fc2_weight [D, Hs], shared_gate_weight [1, D].
    """
    shape, D = hidden.shape, hidden.shape[-1]
    x = hidden.reshape(-1, D).float()
    idx, w = route(router_logits, score_bias, token_ids, hash_table, num_experts=num_experts,
                   top_k=top_k, routing_mode=routing_mode, scoring=scoring, normalize=normalize,
                   routed_scaling_factor=routed_scaling_factor, n_group=n_group,
                   topk_group=topk_group, group_scoring=group_scoring)  # fmt: skip
    act = dict(activation=activation, activation_alpha=activation_alpha,
               activation_limit=activation_limit)  # fmt: skip
    out = torch.zeros_like(x)
    for e in range(num_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        b1 = None if fc1_bias is None else fc1_bias[e].float()
        b2 = None if fc2_bias is None else fc2_bias[e].float()
        h = activate(F.linear(x[tok], fc1_weight[e].float(), b1), **act)
        y = F.linear(h, fc2_weight[e].float(), b2)
        out.index_add_(0, tok, y * w[tok, slot].unsqueeze(-1))
    if shared_fc1_weight is not None:
        ys = F.linear(activate(F.linear(x, shared_fc1_weight.float()), **act),
                      _f32(shared_fc2_weight))  # fmt: skip
        if shared_gate_weight is not None:
            ys = ys * torch.sigmoid(F.linear(x, shared_gate_weight.float()))
        out += ys
    return out.to(hidden.dtype).reshape(shape)


def sparse_keep(a: torch.Tensor, thresholds: torch.Tensor | None, *, mode: str, k: int):
    """Boolean mask of kept channels for activations a [T, H]."""
    if mode == "threshold":
        if thresholds is None:
            raise ValueError("mode='threshold' needs thresholds")
        return a.abs() > thresholds.to(a.dtype)
    if mode != "topk":
        raise ValueError(f"unknown sparse mode {mode!r}")
    k = max(0, min(int(k), a.shape[-1]))
    keep = torch.zeros_like(a, dtype=torch.bool)
    return keep.scatter_(-1, a.abs().topk(k, dim=-1).indices, True)


def sparse_ffn_reference(
    hidden: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    thresholds: torch.Tensor | None,
    *,
    mode: str = "threshold",
    k: int = 0,
    activation: str = "relu",
) -> torch.Tensor:
    """`ffnx::FfnxSparseFFN` (module docstring): hidden [*, D] -> [*, D], same dtype as hidden.

    w_gate, w_up [H, D], b_up [H], w_down [D, H], b_down [D], thresholds [H] (float32). The
    math runs in float32, or in float64 for a float64 `hidden` (the exact reference the ORT
    lowering tests compare with).
    """
    shape, D = hidden.shape, hidden.shape[-1]
    ct = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    c = lambda t: None if t is None else t.to(ct)  # noqa: E731
    x = c(hidden.reshape(-1, D))
    f = base_activation(activation)
    if w_gate is not None:
        if b_up is not None:
            raise ValueError("a gated sparse FFN takes no b_up (schema: u = x @ w_up.T)")
        a = f(F.linear(x, c(w_gate)))
        v = a * F.linear(x, c(w_up))
    else:
        if activation in GATED_ACTIVATIONS:
            raise ValueError(f"non-gated sparse FFN with gated activation {activation!r}")
        a = f(F.linear(x, c(w_up), c(b_up)))
        v = a
    v = v * sparse_keep(a, None if thresholds is None else c(thresholds), mode=mode, k=k)
    y = F.linear(v, c(w_down), c(b_down))
    return y.to(hidden.dtype).reshape(shape)
