"""Feed-forward networks (FFNs) written the way model authors write them.

Every FFN maps (..., D) -> (..., D) and carries `activation`, a name from
`ffnx.plugins.schema.ACTIVATIONS` (plus "bilinear" for the ungated-activation GLU), so graph
passes and module swaps read the math from attributes instead of guessing it from classes.
"""

from __future__ import annotations

import torch
from torch import nn

GATED = {"swiglu": nn.SiLU, "geglu": nn.GELU, "reglu": nn.ReLU, "bilinear": nn.Identity}
PLAIN = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class Mlp(nn.Module):
    """The original Transformer FFN (Vaswani et al. 2017): y = fc2(act(fc1(x))).

    act is GELU (erf form, Hendrycks & Gimpel 2016; GPT-2, BERT, ViT), ReLU or SiLU.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        if activation not in PLAIN:
            raise ValueError(f"Mlp activation {activation!r} not in {sorted(PLAIN)}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = PLAIN[activation]()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedFFN(nn.Module):
    """GLU-variant FFN (Shazeer 2020, "GLU Variants Improve Transformer"):

        y = down(act(gate(x)) * up(x))

    act: swiglu = SiLU (LLaMA, Mistral), geglu = GELU (erf; T5 v1.1, Gemma uses tanh), reglu =
    ReLU, bilinear = identity. `gate` and `up` are separate Linear layers on the same input, so
    the exported graph shows two MatMuls sharing x (the pattern a gate/up fusion looks for).
    """

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        if activation not in GATED:
            raise ValueError(f"GatedFFN activation {activation!r} not in {sorted(GATED)}")
        self.activation = activation
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.act = GATED[activation]()
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def make_ffn(dim: int, hidden: int, activation: str, bias: bool = False) -> nn.Module:
    """A `GatedFFN` for a gated activation name, else an `Mlp` (the MoE expert factory)."""
    if activation in GATED:
        return GatedFFN(dim, hidden, activation, bias=bias)
    return Mlp(dim, hidden, activation, bias=bias)


class LowRankLinear(nn.Module):
    """W = U V with rank r << min(in, out): y = up(down(x)), 2 thin MatMuls (Wei et al. 2024)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class BlockDiagLinear(nn.Module):
    """Block-diagonal W = diag(W_1, ..., W_b), W_i in R^{out/b x in/b} (Wei et al. 2024):

        y[..., i*o:(i+1)*o] = x[..., i*n:(i+1)*n] @ W_i^T + bias_i

    computed as one batched MatMul over the b blocks.
    """

    def __init__(self, in_features: int, out_features: int, blocks: int, bias: bool = True):
        super().__init__()
        if in_features % blocks or out_features % blocks:
            raise ValueError(f"{blocks} blocks do not divide {in_features} -> {out_features}")
        self.blocks = blocks
        n, o = in_features // blocks, out_features // blocks
        bound = n**-0.5  # nn.Linear's default init range for each block's fan-in
        self.weight = nn.Parameter(torch.empty(blocks, o, n).uniform_(-bound, bound))
        self.bias = (
            nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, o, n = self.weight.shape
        xb = x.reshape(*x.shape[:-1], b, 1, n)  # (..., b, 1, n) @ (b, n, o) -> (..., b, 1, o)
        y = (xb @ self.weight.transpose(1, 2)).reshape(*x.shape[:-1], b * o)
        return y if self.bias is None else y + self.bias


class StructuredFFN(nn.Module):
    """FFN with structured fc1/fc2 ("Building on Efficient Foundations: Effectively Training
    LLMs with Structured Feedforward Layers", Wei et al. 2024): y = fc2(act(fc1(x))) where fc1
    and fc2 are `LowRankLinear` (kind="lowrank", rank r) or `BlockDiagLinear` (kind="blockdiag",
    b blocks). `structure` is r or b.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        kind: str = "lowrank",
        structure: int = 4,
        activation: str = "gelu",
    ):
        super().__init__()
        if kind == "lowrank":
            make = LowRankLinear
        elif kind == "blockdiag":
            make = BlockDiagLinear
        else:
            raise ValueError(f"StructuredFFN kind {kind!r} not in ['blockdiag', 'lowrank']")
        self.kind, self.structure, self.activation = kind, structure, activation
        self.fc1 = make(dim, hidden, structure)
        self.act = PLAIN[activation]()
        self.fc2 = make(hidden, dim, structure)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RePaFFN(nn.Module):
    """Channel-idle FFN of RePaViT (Xu et al. 2025, "RePaViT: Scalable Vision Transformer
    Acceleration via Structural Reparameterization on Feedforward Network Layers"):

        h = BN(fc1(x));  a = [act(h[:, :A]), h[:, A:]];  y = fc2(a),  A = round(H (1 - idle))

    BN is a BatchNorm1d over the H hidden channels (running stats at inference). The idle
    channels h[:, A:] pass linearly, so at inference fc2[:, A:] . BN_idle . fc1[A:] is one D x D
    linear map (plus bias) that joins the residual path, and only A channels remain an FFN.
    """

    def __init__(self, dim: int, hidden: int, idle_ratio: float = 0.75, activation: str = "gelu"):
        super().__init__()
        if not 0.0 <= idle_ratio <= 1.0:
            raise ValueError(f"idle_ratio {idle_ratio} not in [0, 1]")
        self.idle_ratio, self.activation = idle_ratio, activation
        self.num_active = int(round(hidden * (1.0 - idle_ratio)))
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = PLAIN[activation]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.bn(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        a = self.num_active
        h = torch.cat([self.act(h[..., :a]), h[..., a:]], dim=-1)
        return self.fc2(h)
