"""Transformer blocks (four norm placements) and the small GPT, ViT and BERT models of the zoo.

Every block takes a norm kind (`ffnx.models.norms.make_norm`) and an FFN module; an FFN with
`needs_token_ids = True` (hash-routed MoE) is called as ffn(h, token_ids), so the models pass
their input ids down.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ffnx.models.attention import SelfAttention
from ffnx.models.norms import make_norm

PLACEMENTS = ("pre", "post", "peri", "parallel")
FfnFactory = Callable[[int], nn.Module]  # layer index -> FFN module


class Block(nn.Module):
    """One transformer layer; N = norm, A = self-attention, F = FFN:

    pre (GPT-2, Xiong et al. 2020):   x = x + A(N1(x));          x = x + F(N2(x))
    post (BERT, Vaswani et al. 2017): x = N1(x + A(x));          x = N2(x + F(x))
    peri (Kim et al. 2025, "Peri-LN: Revisiting Layer Normalization in the Transformer
        Architecture"):               x = x + N1o(A(N1(x)));     x = x + N2o(F(N2(x)))
    parallel (GPT-J, PaLM):           x = x + A(N1(x)) + F(N1(x))
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn: nn.Module,
        norm: str = "layernorm",
        placement: str = "pre",
        causal: bool = False,
        attn_bias: bool = True,
    ):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
        self.placement = placement
        self.attn_norm = make_norm(norm, dim)
        self.attn = SelfAttention(dim, heads, causal=causal, bias=attn_bias)
        self.ffn_norm = None if placement == "parallel" else make_norm(norm, dim)
        self.ffn = ffn
        peri = placement == "peri"
        self.attn_out_norm = make_norm(norm, dim) if peri else None
        self.ffn_out_norm = make_norm(norm, dim) if peri else None

    def _ffn(self, h: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        if getattr(self.ffn, "needs_token_ids", False):
            return self.ffn(h, token_ids)
        return self.ffn(h)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.attn_norm(x))
            return x + self._ffn(self.ffn_norm(x), token_ids)
        if self.placement == "post":
            x = self.attn_norm(x + self.attn(x))
            return self.ffn_norm(x + self._ffn(x, token_ids))
        if self.placement == "peri":
            x = x + self.attn_out_norm(self.attn(self.attn_norm(x)))
            return x + self.ffn_out_norm(self._ffn(self.ffn_norm(x), token_ids))
        h = self.attn_norm(x)
        return x + self.attn(h) + self._ffn(h, token_ids)


class GPT(nn.Module):
    """Decoder-only LM (Radford et al. 2019, GPT-2): token + learned position embeddings,
    causal blocks, final norm, LM head. forward(input_ids [B, T] int64) -> logits [B, T, V].

    Peri-LN also normalises the embeddings; post-LN has no final norm (GPT-1 / BERT style).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        layers: int,
        heads: int,
        max_positions: int,
        ffn: FfnFactory,
        norm: str = "layernorm",
        placement: str = "pre",
        attn_bias: bool = True,
    ):
        super().__init__()
        self.max_positions = max_positions
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_positions, dim)
        self.emb_norm = make_norm(norm if placement == "peri" else "none", dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, ffn(i), norm, placement, causal=True, attn_bias=attn_bias)
            for i in range(layers)
        )
        self.norm = make_norm("none" if placement == "post" else norm, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.emb_norm(self.tok(input_ids) + self.pos(pos))
        for block in self.blocks:
            x = block(x, input_ids)
        return self.head(self.norm(x))


class BERT(nn.Module):
    """Post-LN encoder (Devlin et al. 2019, BERT): token + position embeddings, embedding norm,
    bidirectional post-LN blocks. forward(input_ids [B, T]) -> hidden states [B, T, D].
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        layers: int,
        heads: int,
        max_positions: int,
        ffn: FfnFactory,
        norm: str = "layernorm",
    ):
        super().__init__()
        self.max_positions = max_positions
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_positions, dim)
        self.emb_norm = make_norm(norm, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, ffn(i), norm, "post", causal=False) for i in range(layers)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.emb_norm(self.tok(input_ids) + self.pos(pos))
        for block in self.blocks:
            x = block(x, input_ids)
        return x


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021): Conv2d patch embedding, cls token (pool =
    "cls") or mean pooling over patches (pool = "mean"), learned positions, pre-norm blocks,
    final norm, linear head. forward(pixels [B, 3, S, S], S = image_size fixed) -> logits [B, C].
    """

    def __init__(
        self,
        image_size: int,
        patch: int,
        dim: int,
        layers: int,
        heads: int,
        num_classes: int,
        ffn: FfnFactory,
        norm: str = "layernorm",
        pool: str = "cls",
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"unknown pool {pool!r}; expected 'cls' or 'mean'")
        self.image_size, self.pool = image_size, pool
        tokens = (image_size // patch) ** 2 + (pool == "cls")
        self.patch = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(dim, heads, ffn(i), norm, "pre", causal=False) for i in range(layers)
        )
        self.norm = make_norm(norm, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))
