"""Multi-branch convolution blocks (RepVGG, MobileOne) with a torch-side `reparameterize()`.

Training-time form: parallel branches on one input, each a Conv + BatchNorm (or a BatchNorm
alone, the identity branch), summed, then ReLU. Inference-time form: one Conv with bias.

Reparameterization (the math the graph pass `merge_conv_branches` applies to the ONNX graph):
a Conv + BN branch is W·s, b·s + t with s = γ/sqrt(var + ε), t = β − μ·s per output channel;
a 1×1 kernel is zero-padded to k×k around the centre; the identity branch is a k×k kernel with 1
at the centre of channel c's own input slot (group-aware: input slot c mod C/groups); kernels and
biases of all branches add. Exact when all branches share stride, dilation 1 and groups, and the
paddings put each branch's kernel centre on the same input position (p = k // 2 for odd k).
"""

from __future__ import annotations

import torch
from torch import nn


def _fuse(conv: nn.Conv2d | None, bn: nn.BatchNorm2d, channels: int, groups: int, k: int):
    """(kernel [C, C/g, k, k], bias [C]) of one branch: Conv+BN, or BN alone (identity)."""
    std = (bn.running_var + bn.eps).sqrt()
    s = bn.weight / std
    t = bn.bias - bn.running_mean * s
    if conv is None:
        w = torch.zeros(channels, channels // groups, k, k)
        idx = torch.arange(channels)
        w[idx, idx % (channels // groups), k // 2, k // 2] = 1.0
    else:
        w = conv.weight
        p = (k - w.shape[-1]) // 2
        w = nn.functional.pad(w, [p, p, p, p])
    b = conv.bias if conv is not None and conv.bias is not None else 0.0
    return w * s.reshape(-1, 1, 1, 1), b * s + t


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))  # fmt: skip


class MultiBranchConv(nn.Module):
    """Sum of `n_kxk` k×k Conv+BN branches, an optional 1×1 Conv+BN branch and, when the shape
    allows (cin == cout, stride 1), a BN-only identity branch; then ReLU. `reparameterize()`
    replaces the branches with one Conv (in place); forward is unchanged up to rounding."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, n_kxk=1, scale=True, identity=True):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.kxk = nn.ModuleList(ConvBN(cin, cout, k, stride, groups) for _ in range(n_kxk))
        self.scale = ConvBN(cin, cout, 1, stride, groups) if scale and k > 1 else None
        self.skip = nn.BatchNorm2d(cout) if identity and cin == cout and stride == 1 else None
        self.fused: nn.Conv2d | None = None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        y = sum(b(x) for b in self.kxk)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.fused is not None:
            return
        parts = [_fuse(b[0], b[1], self.cout, self.groups, self.k) for b in self.kxk]
        if self.scale is not None:
            parts.append(_fuse(self.scale[0], self.scale[1], self.cout, self.groups, self.k))
        if self.skip is not None:
            parts.append(_fuse(None, self.skip, self.cout, self.groups, self.k))
        conv = nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.k // 2,
                         groups=self.groups, bias=True)  # fmt: skip
        conv.weight.copy_(sum(w for w, _ in parts))
        conv.bias.copy_(sum(b for _, b in parts))
        self.fused = conv
        self.kxk, self.scale, self.skip = nn.ModuleList(), None, None


def repvgg_block(cin: int, cout: int, stride: int) -> MultiBranchConv:
    """RepVGG: 3×3 + 1×1 + identity BN."""
    return MultiBranchConv(cin, cout, 3, stride)


def mobileone_block(cin: int, cout: int, stride: int, branches: int = 2) -> nn.Sequential:
    """MobileOne: depthwise (`branches` 3×3 dw + 1×1 dw + identity BN), then pointwise
    (`branches` 1×1 + identity BN)."""
    return nn.Sequential(
        MultiBranchConv(cin, cin, 3, stride, groups=cin, n_kxk=branches),
        MultiBranchConv(cin, cout, 1, 1, n_kxk=branches, scale=False),
    )


class ConvNet(nn.Module):
    """Stem + stages of multi-branch blocks + global average pool + linear classifier.
    Input `pixels` [B, 3, S, S] -> logits [B, classes]."""

    def __init__(self, block, widths: list[int], depths: list[int], classes: int):
        super().__init__()
        layers, cin = [], 3
        for w, d in zip(widths, depths):
            for i in range(d):
                layers.append(block(cin, w, 2 if i == 0 else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).mean(dim=(2, 3)))

    def reparameterize(self) -> ConvNet:
        """Merge every multi-branch block into one Conv (in place); returns self."""
        for m in self.modules():
            if isinstance(m, MultiBranchConv):
                m.reparameterize()
        return self
