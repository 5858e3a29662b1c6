"""Mixture-of-Experts FFN layers, written the way model authors write them (HF Mixtral's eager
code): a router Linear, an `nn.ModuleList` of expert FFNs and a Python loop over experts that
gathers each expert's tokens with `torch.where(idx == e)` and scatters back with `index_add_`.

The routing semantics live in attributes that follow `ffnx.plugins.schema.MOE` exactly, so a
module swap to one `ffnx::FfnxMoE` node with stacked weights keeps the numerics:

    num_experts, top_k, routing_mode ("router" | "hash"), scoring ("softmax" | "topk_softmax" |
    "sigmoid"), normalize (bool), routed_scaling_factor (float), activation (schema name),
    router (Linear(D, E, bias=False) or None), score_bias (buffer [E] or None), hash_table
    (int64 buffer [V, k] or None), experts (ModuleList; expert_hidden lists their widths),
    shared (one dense FFN, several shared experts concatenated, or None), shared_gate
    (Linear(D, 1, bias=False) or None), needs_token_ids (forward takes (x, token_ids)).

Routing on logits s = router(x) [N, E] (see `route`); the output is

    y = sum_j w_j * expert_{idx_j}(x) + [sigmoid(shared_gate(x)) *] shared(x)

Gated experts are `GatedFFN` (down(act(gate(x)) * up(x))), plain ones `Mlp` (fc2(act(fc1(x)))).
"""

from __future__ import annotations

import torch
from torch import nn

from ffnx.models.ffn import GatedFFN, Mlp, make_ffn
from ffnx.plugins.schema import ACTIVATIONS

SCORINGS = ("softmax", "topk_softmax", "sigmoid")


def route(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    normalize: bool = False,
    routed_scaling_factor: float = 1.0,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing weights and expert ids, both [N, k], from router logits s [N, E]:

    softmax (Shazeer et al. 2017; Mixtral):   p = softmax(s); idx = topk(p, k); w = p[idx]
    topk_softmax (GraniteMoE, JetMoE):        idx = topk(s, k); w = softmax(s[idx])
    sigmoid (DeepSeek-V3):                    p = sigmoid(s); idx = topk(p + score_bias, k);
                                              w = p[idx]  (the bias only selects)
    normalize: w = w / sum(w), then w = w * routed_scaling_factor.
    """
    if scoring == "softmax":
        w, idx = logits.softmax(dim=-1).topk(top_k, dim=-1)
    elif scoring == "topk_softmax":
        top, idx = logits.topk(top_k, dim=-1)
        w = top.softmax(dim=-1)
    elif scoring == "sigmoid":
        p = logits.sigmoid()
        _, idx = (p if score_bias is None else p + score_bias).topk(top_k, dim=-1)
        w = p.gather(-1, idx)
    else:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        w = w * routed_scaling_factor
    return w, idx


class SkipExpert(nn.Module):
    """An expert that contributes nothing (Duo-LLM's "skip"): y = 0, width 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def ffn_hidden(expert: nn.Module) -> int:
    """Hidden width of an expert FFN (0 for `SkipExpert`)."""
    if isinstance(expert, GatedFFN):
        return expert.gate.out_features
    if isinstance(expert, Mlp):
        return expert.fc1.out_features
    if isinstance(expert, SkipExpert):
        return 0
    raise TypeError(f"unknown expert type {type(expert).__name__}")


class MoE(nn.Module):
    """Shared machinery of the MoE layers below: attributes, the expert loop, shared experts.

    Shared experts (DeepSeekMoE, Dai et al. 2024) are one always-on dense FFN of width
    `shared_hidden` (n shared experts of width H = one FFN of width n*H) with the routed
    experts' activation and no biases, optionally scaled by sigmoid(shared_gate(x))
    (Qwen2-MoE's `shared_expert_gate`).
    """

    routing_mode = "router"
    needs_token_ids = False

    def __init__(
        self,
        dim: int,
        experts: list[nn.Module],
        *,
        top_k: int,
        activation: str,
        scoring: str = "softmax",
        normalize: bool = False,
        routed_scaling_factor: float = 1.0,
        score_bias: bool = False,
        shared_hidden: int = 0,
        shared_gate: bool = False,
    ):
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MoE activation {activation!r} not in {', '.join(ACTIVATIONS)}")
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k {top_k} not in [1, {len(experts)}]")
        if score_bias and scoring != "sigmoid":
            raise ValueError("score_bias is defined for sigmoid scoring only")
        if shared_gate and not shared_hidden:
            raise ValueError("shared_gate needs shared experts (shared_hidden > 0)")
        self.dim, self.num_experts, self.top_k = dim, len(experts), top_k
        self.activation, self.scoring, self.normalize = activation, scoring, bool(normalize)
        self.routed_scaling_factor = float(routed_scaling_factor)
        hashed = self.routing_mode == "hash"
        self.router = None if hashed else nn.Linear(dim, self.num_experts, bias=False)
        self.register_buffer("score_bias", torch.zeros(self.num_experts) if score_bias else None)
        self.register_buffer("hash_table", None)
        self.experts = nn.ModuleList(experts)
        self.expert_hidden = [ffn_hidden(e) for e in experts]
        self.shared = make_ffn(dim, shared_hidden, activation) if shared_hidden else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None

    def dispatch(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """y[n] = sum_j w[n, j] * expert_{idx[n, j]}(x[n]) for x [N, D], w and idx [N, k]."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            if isinstance(expert, SkipExpert):
                continue
            tok, slot = torch.where(idx == e)
            y = expert(x[tok]) * w[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y.to(x.dtype))
        return out

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared is None:
            return out
        s = self.shared(x)
        if self.shared_gate is not None:
            s = torch.sigmoid(self.shared_gate(x)) * s
        return out + s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = route(
            self.router(flat),
            self.top_k,
            self.scoring,
            self.normalize,
            self.routed_scaling_factor,
            self.score_bias,
        )
        return self.add_shared(flat, self.dispatch(flat, w, idx)).reshape(x.shape)


class TopKMoE(MoE):
    """Top-k routed MoE with `num_experts` equal experts of width `hidden`.

    softmax scoring, top-k: Shazeer et al. 2017, "Outrageously Large Neural Networks"
    (normalize=True: Mixtral); top_k=1: Switch Transformer (Fedus et al. 2021).
    sigmoid scoring with `score_bias`, normalize and `routed_scaling_factor`: DeepSeek-V3
    (2024). Many narrow experts with a larger top_k plus shared experts: fine-grained expert
    segmentation (DeepSeekMoE, Dai et al. 2024; Finedeep). Experts: `GatedFFN` for gated
    activations, `Mlp` (fc1/fc2, optional biases) otherwise.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int = 2,
        *,
        activation: str = "swiglu",
        expert_bias: bool = False,
        scoring: str = "softmax",
        normalize: bool = False,
        routed_scaling_factor: float = 1.0,
        score_bias: bool = False,
        shared_hidden: int = 0,
        shared_gate: bool = False,
    ):
        experts = [make_ffn(dim, hidden, activation, bias=expert_bias) for _ in range(num_experts)]
        super().__init__(
            dim,
            experts,
            top_k=top_k,
            activation=activation,
            scoring=scoring,
            normalize=normalize,
            routed_scaling_factor=routed_scaling_factor,
            score_bias=score_bias,
            shared_hidden=shared_hidden,
            shared_gate=shared_gate,
        )


class DuoMoE(MoE):
    """Duo-LLM routing (Alizadeh et al. 2024, "Duo-LLM: A Framework for Studying Adaptive
    Computation in Large Language Models"): each token goes to exactly one of a small FFN, a
    big FFN or skip (zero contribution), chosen top-1 by a router:

        y = p_e * FFN_e(x),  e = argmax softmax(router(x)),  FFN_skip = 0

    experts = [small, big, `SkipExpert`]; one activation for both FFNs.
    """

    def __init__(
        self,
        dim: int,
        small_hidden: int,
        big_hidden: int,
        *,
        activation: str = "swiglu",
        scoring: str = "softmax",
        normalize: bool = False,
    ):
        experts = [
            make_ffn(dim, small_hidden, activation),
            make_ffn(dim, big_hidden, activation),
            SkipExpert(),
        ]
        super().__init__(
            dim, experts, top_k=1, activation=activation, scoring=scoring, normalize=normalize
        )


class HashMoE(MoE):
    """Hash-routed MoE (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a token's
    experts are fixed by its id through a random table drawn once from `seed`,

        idx = hash_table[token_id] (k distinct experts),  w = 1/k each.

    No router. The forward takes the token ids ([B, T] for x [B, T, D]).
    """

    routing_mode = "hash"
    needs_token_ids = True

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        vocab_size: int,
        top_k: int = 1,
        *,
        activation: str = "swiglu",
        seed: int = 0,
    ):
        experts = [make_ffn(dim, hidden, activation) for _ in range(num_experts)]
        super().__init__(dim, experts, top_k=top_k, activation=activation)
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(vocab_size, num_experts, generator=g, device="cpu")
        table = scores.argsort(dim=-1)[:, :top_k]
        self.hash_table = table.contiguous()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        idx = self.hash_table[token_ids.reshape(-1)]
        w = torch.full(idx.shape, 1.0 / self.top_k, dtype=x.dtype, device=x.device)
        return self.add_shared(flat, self.dispatch(flat, w, idx)).reshape(x.shape)
