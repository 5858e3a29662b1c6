"""The model zoo: named GPT / ViT / BERT models, one per FFN variant, norm or block layout.

Weights are random but deterministic: `torch.manual_seed(crc32(name))` before building, in a
forked RNG (the caller's RNG state is left as it was). Models are in eval mode; every norm gets
non-trivial affine parameters and every BatchNorm non-trivial running statistics, so folding
them is numerically visible. Two sizes: `tiny` (D=64, 2 layers,
under 1.5 M parameters, for tests) and `base` (D=512, 4-6 layers, tens of millions).

Text models take `input_ids` int64 [batch, seq] (dynamic batch and seq <= max_positions); ViTs
take `pixels` float32 [batch, 3, S, S] (dynamic batch, S fixed), as do the multi-branch conv nets
(`repvgg`, `mobileone`, family "conv").
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ffnx.errors import ModelSpecError
from ffnx.models.blocks import BERT, GPT, ViT
from ffnx.models.conv_blocks import ConvNet, mobileone_block, repvgg_block
from ffnx.models.ffn import GatedFFN, Mlp, RePaFFN, StructuredFFN
from ffnx.models.moe import DuoMoE, HashMoE, TopKMoE
from ffnx.models.norms import RMSNorm
from ffnx.models.spec import ModelSpec

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 16


@dataclass(frozen=True)
class Size:
    dim: int
    layers: int
    heads: int
    vocab: int
    max_positions: int
    hidden: int  # plain FFN width (4 D)
    gated_hidden: int  # GLU width (~ 8 D / 3, same parameter count as `hidden`)
    experts: int
    expert_hidden: int
    fine_experts: int  # fine-grained: experts split into narrow ones, top-k scaled alike
    fine_top_k: int
    image: int
    patch: int
    classes: int
    vit_layers: int


SIZES = {
    "tiny": Size(64, 2, 4, 512, 128, 256, 176, 8, 128, 16, 4, 32, 8, 10, 2),
    "base": Size(512, 4, 8, 8192, 512, 2048, 1408, 8, 1024, 32, 8, 224, 16, 1000, 6),
}


@dataclass(frozen=True)
class Entry:
    family: str  # "gpt" | "bert" | "vit"
    variant: str
    description: str
    build: Callable[[Size], nn.Module]


def _gpt(s: Size, ffn, **kw) -> GPT:
    return GPT(s.vocab, s.dim, s.layers, s.heads, s.max_positions, ffn, **kw)


def _vit(s: Size, ffn, **kw) -> ViT:
    return ViT(s.image, s.patch, s.dim, s.vit_layers, s.heads, s.classes, ffn, **kw)


# Multi-branch conv nets (family "conv", input `pixels` like the ViTs): widths, depths per size.
_CONV = {
    "repvgg": {64: ([16, 32, 64, 128], [1, 2, 2, 1]),
               512: ([48, 96, 192, 384, 1280], [1, 2, 4, 14, 1])},
    "mobileone": {64: ([32, 64, 128, 256], [1, 2, 2, 1]),
                  512: ([64, 128, 256, 768, 1024], [2, 4, 8, 10, 1])},
}  # fmt: skip


def _conv(s: Size, kind: str) -> ConvNet:
    widths, depths = _CONV[kind][s.dim]
    block = repvgg_block if kind == "repvgg" else mobileone_block
    return ConvNet(block, widths, depths, s.classes)


def _moe(s: Size, **kw) -> Callable[[int], nn.Module]:
    return lambda i: TopKMoE(s.dim, s.expert_hidden, s.experts, **kw)


def _entries() -> dict[str, Entry]:
    mlp = lambda s, act="gelu": lambda i: Mlp(s.dim, s.hidden, act)  # noqa: E731
    glu = lambda s, act: lambda i: GatedFFN(s.dim, s.gated_hidden, act)  # noqa: E731
    E = Entry
    return {
        "gpt-mlp": E("gpt", "gelu", "GPT-2: pre-LN, GELU MLP", lambda s: _gpt(s, mlp(s))),
        "gpt-relu": E("gpt", "relu", "pre-LN, ReLU MLP (OPT)", lambda s: _gpt(s, mlp(s, "relu"))),
        "gpt-swiglu": E("gpt", "swiglu", "pre-LN, SwiGLU FFN (gate/up/down)",
                        lambda s: _gpt(s, glu(s, "swiglu"))),
        "gpt-geglu": E("gpt", "geglu", "pre-LN, GEGLU FFN", lambda s: _gpt(s, glu(s, "geglu"))),
        "gpt-reglu": E("gpt", "reglu", "pre-LN, ReGLU FFN", lambda s: _gpt(s, glu(s, "reglu"))),
        "gpt-rmsnorm": E("gpt", "swiglu", "LLaMA-style: RMSNorm, SwiGLU, no attention biases",
                         lambda s: _gpt(s, glu(s, "swiglu"), norm="rmsnorm", attn_bias=False)),
        "gpt-periln": E("gpt", "gelu", "Peri-LN: norm before and after each sub-block",
                        lambda s: _gpt(s, mlp(s), placement="peri")),
        "gpt-lnfree": E("gpt", "gelu", "LN-free GPT-2 (no norms at all)",
                        lambda s: _gpt(s, mlp(s), norm="none")),
        "paf": E("gpt", "gelu", "GPT-J/PaLM parallel attention + FFN, one shared LN",
                 lambda s: _gpt(s, mlp(s), placement="parallel")),
        "structured": E("gpt", "lowrank", "structured FFN: low-rank fc1/fc2 (rank D/4)",
                        lambda s: _gpt(s, lambda i: StructuredFFN(
                            s.dim, s.hidden, "lowrank", s.dim // 4))),
        "structured-blockdiag": E("gpt", "blockdiag", "structured FFN: 4-block-diagonal fc1/fc2",
                                  lambda s: _gpt(s, lambda i: StructuredFFN(
                                      s.dim, s.hidden, "blockdiag", 4))),
        "gpt-moe": E("gpt", "moe-top2", "MoE top-2 of 8, softmax, renormalised, SwiGLU experts",
                     lambda s: _gpt(s, _moe(s, top_k=2, normalize=True))),
        "gpt-switch": E("gpt", "moe-top1", "Switch: top-1 of 8, softmax, ReLU experts with bias",
                        lambda s: _gpt(s, _moe(s, top_k=1, activation="relu", expert_bias=True))),
        "gpt-moe-topk-softmax": E(
            "gpt", "moe-top2", "MoE top-2 of 8, softmax over the top-k logits, GEGLU experts",
            lambda s: _gpt(s, _moe(s, top_k=2, scoring="topk_softmax", activation="geglu"))),
        "gpt-moe-shared": E(
            "gpt", "moe-top2-shared", "DeepSeek-V3 routing (sigmoid, bias, normalise, x2.5) "
            "+ sigmoid-gated shared expert",
            lambda s: _gpt(s, _moe(s, top_k=2, scoring="sigmoid", score_bias=True,
                                   normalize=True, routed_scaling_factor=2.5,
                                   shared_hidden=s.expert_hidden, shared_gate=True))),
        "gpt-finegrained": E(
            "gpt", "moe-finegrained", "DeepSeekMoE: many narrow experts, larger top-k, "
            "2 shared experts",
            lambda s: _gpt(s, lambda i: TopKMoE(
                s.dim, s.expert_hidden * s.experts // s.fine_experts, s.fine_experts,
                s.fine_top_k, shared_hidden=2 * s.expert_hidden * s.experts // s.fine_experts))),
        "gpt-hash": E("gpt", "moe-hash", "Hash layers: experts fixed by token id, SwiGLU",
                      lambda s: _gpt(s, lambda i: HashMoE(
                          s.dim, s.expert_hidden, s.experts, s.vocab, seed=i))),
        "gpt-duo": E("gpt", "moe-duo", "Duo-LLM: top-1 of small FFN / big FFN / skip",
                     lambda s: _gpt(s, lambda i: DuoMoE(
                         s.dim, s.gated_hidden // 4, s.gated_hidden))),
        "bert-postln": E("bert", "gelu", "BERT: post-LN encoder, GELU MLP",
                         lambda s: BERT(s.vocab, s.dim, s.layers, s.heads, s.max_positions,
                                        mlp(s))),
        "vit-mlp": E("vit", "gelu", "ViT: cls token, pre-LN, GELU MLP",
                     lambda s: _vit(s, mlp(s))),
        "vit-repa": E("vit", "repa", "RePaViT: channel-idle FFN (BN, 75% idle), mean pooling",
                      lambda s: _vit(s, lambda i: RePaFFN(s.dim, s.hidden), pool="mean")),
        "vit-prepbn": E("vit", "gelu", "SLAB PRepBN: BatchNorm token norms, GELU MLP",
                        lambda s: _vit(s, mlp(s), norm="batchnorm")),
        "repvgg": E("conv", "conv-repvgg", "RepVGG-style: 3x3 + 1x1 + identity-BN branches, "
                    "summed (merge_conv_branches; `module.reparameterize()` in torch)",
                    lambda s: _conv(s, "repvgg")),
        "mobileone": E("conv", "conv-mobileone", "MobileOne-style: 2 dw 3x3 + dw 1x1 + BN "
                       "branches, then 2 pointwise 1x1 + BN branches",
                       lambda s: _conv(s, "mobileone")),
    }  # fmt: skip


ZOO = _entries()


def names() -> list[str]:
    """Zoo model names, in listing order."""
    return list(ZOO)


def _lookup(name: str, size: str) -> tuple[Entry, Size]:
    if name not in ZOO:
        raise ModelSpecError(f"unknown model {name!r}; zoo models: {', '.join(ZOO)}")
    if size not in SIZES:
        raise ModelSpecError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
    return ZOO[name], SIZES[size]


def _randomize_norms(module: nn.Module) -> None:
    """Non-trivial norm parameters and BatchNorm running statistics (global RNG)."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(0.2 * torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.empty_like(m.running_var).uniform_(0.5, 2.0))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, RMSNorm)):
            m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            m.bias.copy_(0.1 * torch.randn_like(m.bias))


def _randomize_score_bias(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(getattr(m, "score_bias", None), torch.Tensor):
            m.score_bias.copy_(0.1 * torch.randn_like(m.score_bias))


def _module(name: str, size: str) -> nn.Module:
    entry, s = _lookup(name, size)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the caller's RNG alone
        torch.manual_seed(zlib.crc32(name.encode()))
        model = entry.build(s)
        _randomize_norms(model)
        _randomize_score_bias(model)
    return model.eval()


def _input_maker(entry: Entry, s: Size) -> Callable[[dict[str, int]], dict[str, torch.Tensor]]:
    def make_inputs(dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        batch = dims.get("batch", EXAMPLE_BATCH)
        if entry.family in ("vit", "conv"):
            return {"pixels": torch.randn(batch, 3, s.image, s.image, generator=g)}
        seq = dims.get("seq", EXAMPLE_SEQ)
        return {"input_ids": torch.randint(0, s.vocab, (batch, seq), generator=g)}

    return make_inputs


def build(name: str, size: str = "tiny") -> ModelSpec:
    """Zoo model `name` at `size` ("tiny" | "base") with example inputs and dynamic axes."""
    entry, s = _lookup(name, size)
    make_inputs = _input_maker(entry, s)
    if entry.family in ("vit", "conv"):
        dynamic, max_dims = {"pixels": {0: "batch"}}, {}
    else:
        dynamic = {"input_ids": {0: "batch", 1: "seq"}}
        max_dims = {"seq": s.max_positions}
    return ModelSpec(
        name=name,
        module=_module(name, size),
        inputs=make_inputs({}),
        dynamic=dynamic,
        make_inputs=make_inputs,
        variant=entry.variant,
        description=entry.description,
        max_dims=max_dims,
        output_names=["last_hidden_state" if entry.family == "bert" else "logits"],
    )


def describe(name: str, size: str = "tiny") -> dict:
    """name, variant, params, description, size. Builds on the meta device (no weights)."""
    entry, _ = _lookup(name, size)
    with torch.device("meta"):
        model = entry.build(SIZES[size])
    params = sum(p.numel() for p in model.parameters())
    return {"name": name, "variant": entry.variant, "params": params,
            "description": entry.description, "size": size}  # fmt: skip
