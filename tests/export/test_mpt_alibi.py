"""MPT's ALiBi attention (`ffnx.export.mpt_alibi`): the twin builds the bias for the key length
and gives transformers' logits bit for bit over a left-padded prefill and decode steps on the
model's own cache; only MptAttention is swapped."""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ffnx.export.capture import captured  # noqa: E402
from ffnx.export.mpt_alibi import KeyLengthAlibiMPT, key_length_alibi  # noqa: E402

CONFIG = dict(d_model=64, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64,
              vocab_size=256)  # fmt: skip


def _model(**overrides):
    cfg = transformers.AutoConfig.for_model("mpt", **{**CONFIG, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def _logits(model, steps: int = 4) -> list[torch.Tensor]:
    """Prefill 7 tokens of two rows (the first left-padded by 2), then `steps` decode steps."""
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[0, :2] = 0
    cache, out = transformers.DynamicCache(), []
    with torch.no_grad():
        for _ in range(steps + 1):
            r = model(input_ids=ids, attention_mask=mask, use_cache=True, **{arg: cache})
            out.append(r.logits)
            ids = r.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1)
    return out


@pytest.mark.parametrize(
    "overrides", [{}, {"d_model": 96, "n_heads": 6, "attn_config": {"clip_qkv": 0.5}}]
)
def test_twin_gives_transformers_logits_bit_for_bit(overrides):
    model = _model(**overrides)
    ref = _logits(model)
    with captured(model, rules=(key_length_alibi,)) as ops:
        swapped = [m for m in model.modules() if isinstance(m, KeyLengthAlibiMPT)]
        got = _logits(model)
    assert len(swapped) == 2 and ops == set()
    assert not any(isinstance(m, KeyLengthAlibiMPT) for m in model.modules())  # put back
    for r, o in zip(ref, got, strict=True):
        assert torch.equal(r, o), float((r - o).abs().max())


def test_only_mpt_attention_is_swapped():
    llama = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=256))  # fmt: skip
    assert all(key_length_alibi(n, m, "ort") is None for n, m in llama.named_modules())
    attn = _model().transformer.blocks[0].attn
    assert isinstance(key_length_alibi("a", attn, "ort"), KeyLengthAlibiMPT)
