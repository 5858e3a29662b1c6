"""Multi-head self-attention written out with Linear q/k/v/o, MatMul and Softmax.

Not `nn.MultiheadAttention`: its fused fast path breaks the TorchScript exporter and hides the
projections from graph passes.
"""

from __future__ import annotations

import torch
from torch import nn


class SelfAttention(nn.Module):
    """Scaled dot-product multi-head self-attention (Vaswani et al. 2017, "Attention Is All You
    Need"): for each head h,

        A_h = softmax(Q_h K_h^T / sqrt(d) + M),  out = o(concat_h A_h V_h)

    with Q = q(x), K = k(x), V = v(x), d = dim / heads and M = -inf above the diagonal when
    `causal` (GPT), else 0. Batch and sequence length may both be dynamic at export.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if self.causal:
            pos = torch.arange(n, device=x.device)
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, dim))
