"""Capture rule that refuses transformers modules torch's ONNX exporter cannot lower, before the
export runs: one line naming the module path, its class and why, instead of an exporter
traceback about some aten op deep inside it.

Each entry was found by exporting the architecture (tiny random config, `ffnx export hf:DIR`,
transformers 5.24, torch 2.13 dynamo exporter); the reason says what in the module fails.
"""

from __future__ import annotations

from torch import nn

from ffnx.errors import ExportError


def _not_absorbed(m: nn.Module) -> bool:
    from ffnx.export.mla_absorb import fits

    return not fits(m)


def _frequencies_vary(m: nn.Module) -> bool:
    from ffnx.export.mla_absorb import rotary_fits

    return not rotary_fits(m)


def _dbrx_unclipped(m: nn.Module) -> bool:
    return getattr(m, "clip_qkv", 0) is None


# class -> (applies to this instance? None: always, why)
HF_UNEXPORTABLE = {
    # DeepseekV2RotaryEmbedding returns torch.polar(...) and apply_rotary_emb multiplies
    # view_as_complex(q/k) by it: "No decompositions registered for the complex-valued input".
    # The absorbed MLA twin (mla_absorb) rotates in real arithmetic; other modules stay refused.
    "DeepseekV2Attention": (_not_absorbed, "its rotary embedding multiplies complex tensors "
                            "(torch.polar, torch.view_as_complex), which torch's ONNX exporter "
                            "cannot lower, and the absorbed-MLA export that rotates in real "
                            "arithmetic does not take it (kv_b_proj with a bias, or a "
                            "non-eager attention)"),
    # the absorbed twin's real rotary (mla_absorb.RealRotary) reads fixed frequencies only
    "DeepseekV2RotaryEmbedding": (_frequencies_vary, "its complex rotary (torch.polar) is "
                                  "rewritten in real arithmetic only for rope types with fixed "
                                  "frequencies (default, linear, yarn, llama3)"),
    # `qkv.clamp(min=None, max=None)`: torch's exporter rejects it ("clamp called but both min and
    # max are none!"), and torch 2.13's eager forward too ("At least one of 'min' or 'max' must not
    # be None"; older torch returned the input)
    "DbrxAttention": (_dbrx_unclipped, "attn_config.clip_qkv is None, and its qkv.clamp(min=None, "
                      "max=None) is rejected by torch's ONNX exporter (and by torch 2.13's eager "
                      "forward); set clip_qkv in config.json (dbrx-instruct: 8)"),
}  # fmt: skip


def refuse_unexportable(name: str, module: nn.Module, target: str) -> None:
    """Capture rule (listed in `capture.default_rules`): raise ExportError for a module in
    HF_UNEXPORTABLE, else None (it never replaces anything)."""
    cls = type(module).__name__
    if not type(module).__module__.startswith("transformers.") or cls not in HF_UNEXPORTABLE:
        return None
    applies, why = HF_UNEXPORTABLE[cls]
    if applies is None or applies(module):
        raise ExportError(f"cannot export {name} ({cls}): {why}")
    return None
