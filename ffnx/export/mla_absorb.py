"""Capture rule: multi-head latent attention (MLA: DeepSeek-V3, GLM-4.7-Flash, MiniCPM3, ...)
exported in its weight-absorbed form.

transformers caches MLA's latents, c [B, 1, T, R] (the normed compressed kv, R = kv_lora_rank)
and the shared rotary key r [B, 1, T, P], and `expand_kv` rebuilds every head's key and value
from the whole cache at every call: kv_b_proj on all T positions ([T, R] @ [R, H*(N+V)]), a
Transpose, and a key assembled by slice copies (ScatterND and Transposes in ONNX). A decode step
then costs O(T * R * H * (N + V)) on top of the attention, and every cached position is rewritten.

With kv_b_proj's weight split per head h into W_uk[h] [N, R] and W_uv[h] [V, R] (no bias), the key
of head h at position t is [W_uk[h] c_t ; r_t] and its value W_uv[h] c_t, so for a query
[q_n ; q_r] of head h

  score_t = q_n . (W_uk[h] c_t) + q_r . r_t = (W_uk[h]^T q_n) . c_t + q_r . r_t
  out     = sum_t p_t W_uv[h] c_t         = W_uv[h] (sum_t p_t c_t)

(associativity: exact in real arithmetic; in fp32 the sums are taken in another order). The
absorbed form is therefore multi-query attention over the latent cache itself: every head's
query is projected once into the latent space (q_lat = q_n @ W_uk[h], [B, H, S, R]), all H*S
query rows meet the one cached c and r in one GEMM each (the softmax scale s applied to the
queries: s(a.b) = (s a).b up to rounding), softmax (mask unchanged), and
the [B, H, S, R] result is mapped back through W_uv[h]. Nothing of size T is rewritten per step.

Per call of S new tokens over T cached ones the multiply-adds are
  expanded: T*R*H*(N+V) + S*H*T*(N+P+V)       absorbed: S*H*T*(2R+P) + S*H*R*(N+V)
so a decode step (S = 1) costs about T*H*(2R+P) instead of T*R*H*(N+V) (DeepSeek-V3: ~120x
fewer), while a long prefill costs more (S = T = 1000 at DeepSeek-V3's sizes: ~2.7x the FLOPs);
`bench --decode` reports time to first token beside decode speed.

The twin runs the module's own forward with `expand_kv` returning the latents unchanged and the
attention interface replaced by `absorbed_attention`, so it applies to the classes in ABSORBED:
their forward passes expand_kv's key and value straight to the attention interface (checked by
reading each, and tested: tests/export/test_mla_absorb.py). The other transformers MLA classes
keep the expanded export: several put code between the two (the sparse-attention indexers of
DeepSeek-V3.2, GLM-MoE-DSA, HY-V4, Mistral-Large-4, AXK2, Dots3-Note and GLM5-Next build their
mask from the expanded key's shape; Kimi-Linear's and Bailing-Hybrid's linear-attention layers are
refused before this). So do a kv_b_proj with a bias and a config whose attention implementation
is not eager (the masks differ). The export is verified against the original modules either way.

Interleaved rotary (`config.rope_interleave`, DeepSeek-V3's default): transformers rotates the P
rotary dims of q and of the shared key r as pairs (x[2i], x[2i+1]) and returns them
de-interleaved, y = Concat(a*c - b*s, b*c + a*s) with a = x[0::2], b = x[1::2] and c, s the
first half of cos, sin (cos = Concat(f, f)). That is transformers' rotate-half rotary applied to
x' = Concat(a, b), and x' is what the projection gives when its rotary output rows are taken in
the order [0, 2, ..., P-2, 1, 3, ..., P-1]. So the twin runs the forward with
`rope_interleave = False` and copies of q_b_proj (q_proj) and kv_a_proj_with_mqa whose rotary rows
(and bias entries) are permuted that way: the same dot products, so q, r, the cached r and the
logits are bit-identical, and the graph carries the rotate-half form the rotary_embedding pass
fuses into one RotaryEmbedding op (nine kernels per tensor become one; quantized weights quantize
per output row, so int4 stays identical too). LongCat-Flash interleaves without consulting the
config: its module-level `apply_rotary_pos_emb_interleave` (y = Concat(a*c - b*s, b*c + a*s)
on the strided a = x[0::2], b = x[1::2]) is replaced for the twin's forward by the rotate-half
one, fed the same row-permuted projection copies, which computes the same products in the same
order on a = x'[:P/2], b = x'[P/2:] (bit-identical, and fused like DeepSeek-V3's).

Complex rotary (DeepSeek-V2, COMPLEX_ROTARY): its rotary module returns torch.polar(1, θ) *
scaling and `apply_rotary_emb` multiplies view_as_complex of the pairs (x[2i], x[2i+1]) by it;
torch's exporter lowers no complex tensor. The `real_rotary` rule returns [cos θ; sin θ] *
scaling instead (RealRotary; rope types with fixed frequencies only, STATIC_ROPE), and the twin
runs the forward with the module-level `apply_rotary_emb` replaced by `_rotated_pairs`:
(a + ib)(c + is) = (a*c - b*s) + i(a*s + b*c), written back interleaved, so the cached rotary key
keeps transformers' layout and the export is verified against its presents. Equal to the complex
product up to fp32 rounding (tests: logits within 1e-5 relative).
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

ATTENTION_KEY = "ffnx_mla_absorbed"
# transformers classes whose forward hands `expand_kv`'s key and value to the attention interface
ABSORBED = ("DeepseekV2Attention", "DeepseekV3Attention", "Glm4MoeLiteAttention",
            "MiniCPM3Attention", "YoutuAttention", "AXK1Attention", "LongcatFlashMLA",
            "Mistral4Attention")  # fmt: skip


def absorbed_attention(module: nn.Module, query, key, value, attention_mask, scaling: float,
                       dropout: float = 0.0, **kwargs):  # fmt: skip
    """transformers' attention-interface signature, with key = c [B, 1, T, R] and value = r
    [B, 1, T, P] (the latents `expand_kv` passes through): returns (out [B, S, H, V], probs)."""
    batch, heads, seq, _ = query.shape
    nope, v_dim, rank = module.qk_nope_head_dim, module.v_head_dim, module.kv_lora_rank
    q_nope, q_rot = torch.split(query, [nope, query.shape[-1] - nope], dim=-1)
    w = module.kv_b_proj.weight.view(heads, nope + v_dim, rank)
    w_uk, w_uv = torch.split(w, [nope, v_dim], dim=1)  # [H, N, R], [H, V, R]
    # the scale rides on the queries: on W_uk (a constant the export folds) and on q_rot right
    # before its GEMM (ONNX Runtime folds that Mul into the product's alpha): no kernel of its own
    q_lat = torch.matmul(q_nope, w_uk * scaling)  # [B, H, S, R]
    # all H*S query rows against the one latent head: one GEMM each, no per-head copy of c
    rows = (batch, 1, heads * seq)
    scores = torch.matmul(q_lat.reshape(*rows, rank), key.transpose(2, 3)) + torch.matmul(
        q_rot.reshape(*rows, q_rot.shape[-1]) * scaling, value.transpose(2, 3)
    )
    scores = scores.reshape(batch, heads, seq, -1)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    o_lat = torch.matmul(probs.reshape(*rows, -1), key).reshape(batch, heads, seq, rank)
    out = torch.matmul(o_lat, w_uv.transpose(1, 2))  # [B, H, S, V]
    return out.transpose(1, 2).contiguous(), probs


# classes whose rotary is complex-valued: `apply_rotary_emb` multiplies view_as_complex(pairs
# x[2i], x[2i+1]) by the rotary module's torch.polar output, which torch's exporter cannot lower
COMPLEX_ROTARY = ("DeepseekV2Attention",)
# classes that rotate interleaved pairs whatever the config says: the module-level function
# the twin replaces by `_rotate_half_rotary` (it reads the de-interleaved projection copies)
ALWAYS_INTERLEAVED = {"LongcatFlashMLA": "apply_rotary_pos_emb_interleave"}
# rope types whose frequencies do not depend on the sequence (no dynamic_rope_update at run time)
STATIC_ROPE = ("default", "linear", "yarn", "llama3")


def _rotate_half_rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers' rotate-half rotary, x*cos + rotate_half(x)*sin with cos = Concat(f, f):
    (a*c - b*s, b*c + a*s) on the halves a, b of x, the products `apply_rotary_pos_emb_
    interleave` takes on the strided pairs (the module docstring: interleaved rotary)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rotated_pairs(xq, xk, freqs):
    """DeepSeek-V2's `apply_rotary_emb` in real arithmetic: each pair (a, b) = (x[2i], x[2i+1])
    of q and k times c + is is (a*c - b*s, a*s + b*c), written back in the same interleaved
    layout (so the cached rotary key is transformers' own). `freqs`: the complex c + is of
    transformers' rotary module, or [c; s] stacked by `RealRotary`."""
    cos, sin = (freqs.real, freqs.imag) if freqs.is_complex() else (freqs[0], freqs[1])
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, P/2]: every head

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


class RealRotary(nn.Module):
    """DeepSeek-V2's rotary module returning [cos; sin] stacked ([2, B, S, P/2], scaled as
    transformers scales its torch.polar output) instead of the complex c + is."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.inner = rotary

    def forward(self, x, position_ids):
        r = self.inner
        freqs = position_ids[..., None].float() * r.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack((freqs.cos(), freqs.sin())) * r.attention_scaling


def rotary_fits(module: nn.Module) -> bool:
    """Whether `real_rotary` takes this (DeepSeek-V2 rotary) module: fixed frequencies."""
    return getattr(module, "rope_type", None) in STATIC_ROPE


def real_rotary(name: str, module: nn.Module, target: str) -> nn.Module | None:
    """Capture rule (listed in `capture.default_rules`): DeepSeek-V2's complex rotary module ->
    RealRotary, for rope types with fixed frequencies; anything else -> None."""
    if type(module).__name__ != "DeepseekV2RotaryEmbedding":
        return None
    if not type(module).__module__.startswith("transformers.") or not rotary_fits(module):
        return None
    return RealRotary(module)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_KEY, absorbed_attention)


def _latents(c, r):
    return c, r


def _rotary_rows_first(linear: nn.Linear, period: int, offset: int, rope: int) -> nn.Linear:
    """A copy of `linear` whose output rows offset + j (j < rope) of every `period` rows are
    taken in the order even j, then odd j (module docstring: interleaved rotary)."""
    order = torch.arange(linear.out_features).view(-1, period)
    inner = torch.arange(rope)
    order[:, offset : offset + rope] = order[:, offset + torch.cat([inner[0::2], inner[1::2]])]
    order = order.reshape(-1)
    out = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
    out = out.to(dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(linear.weight[order])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[order])
    return out.train(linear.training).requires_grad_(False)


def _deinterleaved(attention: nn.Module) -> nn.ModuleDict | None:
    """Copies of the projections whose rotary rows feed transformers' rotate-half rotary the
    pairs its interleaved one rotates (module docstring), or None when the module does not
    interleave or its layout is not the one this reads."""
    always = type(attention).__name__ in ALWAYS_INTERLEAVED
    if not (always or getattr(attention.config, "rope_interleave", False)):
        return None
    q_name = "q_proj" if getattr(attention, "q_lora_rank", None) is None else "q_b_proj"
    q, kv_a = getattr(attention, q_name, None), getattr(attention, "kv_a_proj_with_mqa", None)
    nope, rope = attention.qk_nope_head_dim, getattr(attention, "qk_rope_head_dim", None)
    rank, heads = attention.kv_lora_rank, attention.num_heads
    fits = isinstance(q, nn.Linear) and isinstance(kv_a, nn.Linear) and rope and rope % 2 == 0
    if not (fits and q.out_features == heads * (nope + rope) and kv_a.out_features == rank + rope):
        return None
    return nn.ModuleDict({
        q_name: _rotary_rows_first(q, nope + rope, nope, rope),
        "kv_a_proj_with_mqa": _rotary_rows_first(kv_a, rank + rope, rank, rope),
    })  # fmt: skip


class AbsorbedMLA(nn.Module):
    """Runs an MLA module's own forward with `expand_kv` passing the latents through and the
    attention interface replaced by `absorbed_attention` (module docstring)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.inner = attention
        self.config = copy.copy(attention.config)
        self.config._attn_implementation_internal = ATTENTION_KEY  # not the setter: no subconfigs
        self.deinterleaved = _deinterleaved(attention)
        kind = type(attention).__name__
        # module-level functions the forward calls that give way while it runs: DeepSeek-V2's
        # complex `apply_rotary_emb` to the real one, LongCat's interleaved rotary to rotate-half
        self.patches = {"apply_rotary_emb": _rotated_pairs} if kind in COMPLEX_ROTARY else {}
        if self.deinterleaved is not None:
            self.config.rope_interleave = False
            if kind in ALWAYS_INTERLEAVED:
                self.patches[ALWAYS_INTERLEAVED[kind]] = _rotate_half_rotary

    def forward(self, *args, **kwargs):
        inner = self.inner
        saved = inner.config
        swapped = dict(self.deinterleaved or {})
        originals = {name: getattr(inner, name) for name in swapped}
        inner.expand_kv, inner.config = _latents, self.config  # instance attributes, undone below
        for name, linear in swapped.items():
            inner._modules[name] = linear
        code = sys.modules[type(inner).__module__]
        own = {name: getattr(code, name) for name in self.patches}
        for name, fn in self.patches.items():
            setattr(code, name, fn)
        try:
            return inner(*args, **kwargs)
        finally:
            del inner.expand_kv
            inner.config = saved
            inner._modules.update(originals)
            for name, fn in own.items():
                setattr(code, name, fn)


def fits(module: nn.Module) -> bool:
    """Whether `absorb_mla` takes this module."""
    kv_b = getattr(module, "kv_b_proj", None)
    need = ("qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "num_heads", "expand_kv", "config")
    return (
        type(module).__name__ in ABSORBED
        and isinstance(kv_b, nn.Linear)
        and kv_b.bias is None
        and all(hasattr(module, a) for a in need)
        and kv_b.weight.shape == (
            module.num_heads * (module.qk_nope_head_dim + module.v_head_dim), module.kv_lora_rank)
        and getattr(module.config, "_attn_implementation", None) == "eager"
    )  # fmt: skip


def absorb_mla(name: str, module: nn.Module, target: str) -> nn.Module | None:
    """Capture rule (listed in `capture.default_rules`): a transformers MLA attention module ->
    AbsorbedMLA; anything else -> None."""
    if not type(module).__module__.startswith("transformers.") or not fits(module):
        return None
    _register()
    return AbsorbedMLA(module).train(module.training)
