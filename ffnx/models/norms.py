"""Token norms: LayerNorm, RMSNorm, BatchNorm-as-token-norm, or none.

All map (B, T, C) -> (B, T, C) and normalise over C (LayerNorm, RMSNorm) or per channel with
statistics over batch and tokens (BatchNorm).
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("layernorm", "rmsnorm", "batchnorm", "none")


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"):

        y = x * rsqrt(mean(x^2, -1) + eps) * weight

    written out by hand (as LLaMA/T5 code does) so the graph shows Pow/ReduceMean/Add/Sqrt/Div
    or Rsqrt/Mul, the pattern an RMSNorm fusion looks for.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TokenBatchNorm(nn.Module):
    """BatchNorm as the token norm of a transformer (SLAB, Guo et al. 2024, "SLAB: Efficient
    Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
    Normalization"; its PRepBN is pure BatchNorm at inference):

        y[b, t, c] = (x[b, t, c] - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

    a BatchNorm1d over channels applied by transposing (B, T, C) -> (B, C, T). In eval mode it
    uses running statistics, so it is a per-channel affine map that folds into the next Linear.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def make_norm(kind: str, dim: int) -> nn.Module:
    """Token norm by name: layernorm | rmsnorm | batchnorm (`TokenBatchNorm`) | none.

    none is `nn.Identity` (LN-free transformers: Heimersheim 2024, "You can remove GPT2's
    LayerNorm by fine-tuning").
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "batchnorm":
        return TokenBatchNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORMS)}")
