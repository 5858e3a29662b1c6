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
query rows meet the one cached c and r in one GEMM each, softmax (scale and mask unchanged), and
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
DeepSeek-V3.2, GLM-MoE-DSA, HY-V4 and Mistral-Large-4 build their mask from the expanded key's
shape), and the rest are not tested here yet (Mistral 4, Kimi-Linear, Bailing-Hybrid, LongCat).
So do a kv_b_proj with a bias and a config whose attention implementation is not eager (the masks
differ). The export is verified against the original modules either way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

ATTENTION_KEY = "ffnx_mla_absorbed"
# transformers classes whose forward hands `expand_kv`'s key and value to the attention interface
ABSORBED = ("DeepseekV3Attention", "Glm4MoeLiteAttention", "MiniCPM3Attention", "YoutuAttention",
            "AXK1Attention")  # fmt: skip


def absorbed_attention(module: nn.Module, query, key, value, attention_mask, scaling: float,
                       dropout: float = 0.0, **kwargs):  # fmt: skip
    """transformers' attention-interface signature, with key = c [B, 1, T, R] and value = r
    [B, 1, T, P] (the latents `expand_kv` passes through): returns (out [B, S, H, V], probs)."""
    batch, heads, seq, _ = query.shape
    nope, v_dim, rank = module.qk_nope_head_dim, module.v_head_dim, module.kv_lora_rank
    q_nope, q_rot = torch.split(query, [nope, query.shape[-1] - nope], dim=-1)
    w = module.kv_b_proj.weight.view(heads, nope + v_dim, rank)
    w_uk, w_uv = torch.split(w, [nope, v_dim], dim=1)  # [H, N, R], [H, V, R]
    q_lat = torch.matmul(q_nope, w_uk)  # [B, H, S, R]
    # all H*S query rows against the one latent head: one GEMM each, no per-head copy of c
    rows = (batch, 1, heads * seq)
    scores = torch.matmul(q_lat.reshape(*rows, rank), key.transpose(2, 3)) + torch.matmul(
        q_rot.reshape(*rows, q_rot.shape[-1]), value.transpose(2, 3)
    )
    scores = scores.reshape(batch, heads, seq, -1) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    o_lat = torch.matmul(probs.reshape(*rows, -1), key).reshape(batch, heads, seq, rank)
    out = torch.matmul(o_lat, w_uv.transpose(1, 2))  # [B, H, S, V]
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_KEY, absorbed_attention)


def _latents(c, r):
    return c, r


class AbsorbedMLA(nn.Module):
    """Runs an MLA module's own forward with `expand_kv` passing the latents through and the
    attention interface replaced by `absorbed_attention` (module docstring)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.inner = attention
        self.config = copy.copy(attention.config)
        self.config._attn_implementation_internal = ATTENTION_KEY  # not the setter: no subconfigs

    def forward(self, *args, **kwargs):
        inner = self.inner
        saved = inner.config
        inner.expand_kv, inner.config = _latents, self.config  # instance attributes, undone below
        try:
            return inner(*args, **kwargs)
        finally:
            del inner.expand_kv
            inner.config = saved


def _fits(module: nn.Module) -> bool:
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
    if not type(module).__module__.startswith("transformers.") or not _fits(module):
        return None
    _register()
    return AbsorbedMLA(module).train(module.training)
