"""MLA weight absorption (`ffnx.export.mla_absorb`): the captured model gives transformers'
logits over a prefill and decode steps on its own latent cache, for every class in ABSORBED;
modules it cannot absorb are left to the expanded export."""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ffnx.export.capture import captured  # noqa: E402
from ffnx.export.mla_absorb import (  # noqa: E402
    ALWAYS_INTERLEAVED,
    AbsorbedMLA,
    RealRotary,
    absorb_mla,
    real_rotary,
)

MLA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, vocab_size=256, kv_lora_rank=16, q_lora_rank=24,
           qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, n_routed_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
           n_group=1, topk_group=1)  # fmt: skip


# configs whose keys differ from DeepSeek-V3's
OWN = {"longcat_flash": dict(num_layers=2, head_dim=8, moe_topk=2, zero_expert_num=2,
                             expert_ffn_hidden_size=32, ffn_hidden_size=96)}  # fmt: skip


def _model(model_type: str, **overrides):
    cfg = transformers.AutoConfig.for_model(
        model_type, **{**MLA, **OWN.get(model_type, {}), **overrides}
    )
    cfg._attn_implementation = "eager"
    # Mistral 4's text model ships inside Mistral 3's VLM: the Auto class does not list it
    auto = (
        transformers.Mistral4ForCausalLM
        if model_type == "mistral4"
        else transformers.AutoModelForCausalLM
    )
    model = (
        auto.from_config(cfg) if auto is transformers.AutoModelForCausalLM else auto(cfg)
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fan-in scale: transformers' std 0.02 leaves attention nearly uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def _logits(model, steps: int = 4) -> list[torch.Tensor]:
    """Prefill 7 tokens of two rows (the first left-padded by 2), then `steps` decode steps on
    the model's own DynamicCache: the logits of every call."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[0, :2] = 0
    cache = transformers.DynamicCache()
    out = []
    with torch.no_grad():
        for _ in range(steps + 1):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
            r = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      **{CACHE_ARG: cache})  # fmt: skip
            out.append(r.logits)
            ids = r.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1)
    return out


CACHE_ARG = "cache" if "cache" in inspect.signature(
    transformers.DeepseekV3ForCausalLM.forward).parameters else "past_key_values"  # fmt: skip


TESTED = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minicpm3", "youtu", "axk1",
          "longcat_flash", "mistral4")  # fmt: skip


@pytest.mark.parametrize("model_type", TESTED)
def test_absorbed_logits_equal_expanded_over_prefill_and_decode(model_type):
    model = _model(model_type)
    ref = _logits(model)
    with captured(model, rules=(absorb_mla,)) as ops:
        swapped = [m for m in model.modules() if isinstance(m, AbsorbedMLA)]
        got = _logits(model)
    assert len(swapped) == MLA["num_hidden_layers"] and ops == set()  # no plugin needed
    assert not any(isinstance(m, AbsorbedMLA) for m in model.modules())  # put back
    # interleaved rotary: the twin ran de-interleaved copies of the projections and put the
    # module's own back (MiniCPM3 rotates halves already: nothing to copy; LongCat interleaves
    # whatever its config says)
    always = any(type(m.inner).__name__ in ALWAYS_INTERLEAVED for m in swapped)
    interleaved = always or bool(getattr(model.config, "rope_interleave", False))
    assert all((m.deinterleaved is not None) == interleaved for m in swapped)
    for m in swapped:
        for name, linear in (m.deinterleaved or {}).items():
            assert getattr(m.inner, name) is not linear
            assert always or m.inner.config.rope_interleave
    for r, o in zip(ref, got, strict=True):
        err, scale = float((o - r).abs().max()), float(r.abs().max())
        assert err <= 1e-5 * scale, f"max abs error {err:.3g} at scale {scale:.3g}"


def test_every_absorbed_class_is_tested():
    from ffnx.export.mla_absorb import ABSORBED

    tested = {type(a).__name__ for m in map(_model, TESTED) for a in m.modules()}
    assert set(ABSORBED) <= tested


def test_modules_it_cannot_absorb_are_left_alone():
    model = _model("deepseek_v3")
    attn = model.model.layers[0].self_attn
    assert isinstance(absorb_mla("a", attn, "ort"), AbsorbedMLA)
    attn.config._attn_implementation = "sdpa"  # another mask layout: not this rule's
    assert absorb_mla("a", attn, "ort") is None
    attn.config._attn_implementation = "eager"
    attn.kv_b_proj.bias = torch.nn.Parameter(torch.zeros(attn.kv_b_proj.out_features))
    assert absorb_mla("a", attn, "ort") is None  # a key bias is not absorbed
    llama = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=256))  # fmt: skip
    assert all(absorb_mla(n, m, "ort") is None for n, m in llama.named_modules())


def test_deepseek_v2_rotary_in_real_arithmetic():
    """DeepSeek-V2 rotates q and the cached key as complex pairs (torch.polar,
    view_as_complex), which torch's exporter cannot lower: with its rotary module returning
    [cos; sin] and the pairs rotated in real arithmetic, the captured model gives transformers'
    logits over a prefill and decode steps (its cache layout unchanged)."""
    model = _model("deepseek_v2")
    ref = _logits(model)
    with captured(model, rules=(absorb_mla, real_rotary)):
        assert isinstance(model.model.rotary_emb, RealRotary)
        got = _logits(model)
    assert not isinstance(model.model.rotary_emb, RealRotary)  # put back
    for r, o in zip(ref, got, strict=True):
        err, scale = float((o - r).abs().max()), float(r.abs().max())
        assert err <= 1e-5 * scale, f"max abs error {err:.3g} at scale {scale:.3g}"
    # frequencies that change with the length are not this rule's (hf_refusals says why)
    dynamic = _model("deepseek_v2", rope_parameters=dict(rope_type="dynamic", factor=2.0,
                                                         rope_theta=10000.0))  # fmt: skip
    assert real_rotary("r", dynamic.model.rotary_emb, "ort") is None
    assert real_rotary("r", model.model.rotary_emb, "ort") is not None
