"""Capture rule: MPT's ALiBi attention with its bias built for the keys at hand.

transformers' MptAttention adds the model's ALiBi table position_bias [H, 1, L] (L =
config.max_seq_len, column j = slope_h * (j - (L - 1))) after slicing it by

    q0 = max(0, 1 - query_length),   k0 = max(0, L - key_length)

with query_length = the new tokens + the cache's length. torch.export turns these maxima of
dynamic sizes into shape constraints it reports as inconsistent ("Eq(s70 + Max(0, -s30 - 2*s70
+ 1), 1) is inconsistent"), so MPT did not export with a KV cache. With the table's one row, q0
is 0 for every query_length >= 1, and for K = key_length <= L the sliced bias at key t is
slope_h * (t - (K - 1)). The twin computes exactly that from the table itself,

    bias[h, 0, t] = b_h * ((K - 1) - t),   b_h = position_bias[h, 0, L - 2] = -slope_h,

and otherwise runs MptAttention's own computation (Wqkv, the clip, the cache update, scale, the
boolean mask, softmax in fp32, out_proj). Exact: b_h is -slope_h exactly, and a product's
rounding does not depend on the signs, so (-slope) * (K - 1 - t) equals the table's
(t - (K - 1)) * slope bit for bit. Needs L >= 2; a key longer than L fails in transformers' own
forward too (the bias no longer broadcasts), so the twin is not asked for one.
"""

from __future__ import annotations

import torch
from torch import nn

CLASS = "MptAttention"


class KeyLengthAlibiMPT(nn.Module):
    """MptAttention's forward with the ALiBi bias computed for the key length (module docstring);
    the weights are the wrapped module's."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.inner = attention

    def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        m = self.inner
        batch, seq = hidden_states.shape[:2]
        qkv = m.Wqkv(hidden_states)
        if m.clip_qkv:
            qkv = qkv.clamp(min=-m.clip_qkv, max=m.clip_qkv)
        q, k, v = (t.reshape(batch, seq, m.n_heads, m.head_dim).transpose(1, 2)
                   for t in qkv.chunk(3, dim=2))  # fmt: skip
        if cache is not None:
            k, v = cache.update(k, v, m.layer_idx, kwargs=kwargs)
        scores = torch.matmul(q, k.transpose(-1, -2)) * m.softmax_scale
        if position_bias is not None:
            keys = k.shape[-2]
            table = position_bias.shape[-1]
            b = position_bias[:, :, table - 2 : table - 1]  # -slope_h, [H, 1, 1]
            back = (keys - 1) - torch.arange(keys, device=scores.device, dtype=torch.int32)
            scores = scores + b * back
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, torch.finfo(q.dtype).min)
        weights = nn.functional.softmax(scores.float(), dim=-1).to(v.dtype)
        weights = nn.functional.dropout(weights, p=m.attn_dropout_p, training=m.training)
        context = torch.matmul(weights, v).permute(0, 2, 1, 3).contiguous().view(batch, seq, -1)
        return m.out_proj(context), weights


def _fits(module: nn.Module) -> bool:
    need = ("Wqkv", "out_proj", "n_heads", "head_dim", "softmax_scale", "clip_qkv",
            "attn_dropout_p", "layer_idx", "max_seq_length")  # fmt: skip
    return all(hasattr(module, a) for a in need) and int(module.max_seq_length) >= 2


def key_length_alibi(name: str, module: nn.Module, target: str) -> nn.Module | None:
    """Capture rule (listed in `capture.default_rules`): transformers' MptAttention ->
    KeyLengthAlibiMPT; anything else -> None."""
    if type(module).__name__ != CLASS or not type(module).__module__.startswith("transformers."):
        return None
    return KeyLengthAlibiMPT(module).train(module.training) if _fits(module) else None
