"""The pass registry: every pass, in the order the default pipeline runs them.

`ffnx optimize --list-passes` prints this list. Exact passes run by default; approximate ones
(`exact = False`) only when named with --passes and given calibration inputs.
"""

from __future__ import annotations

import importlib

from ffnx.passes.base import GraphPass, Match, PassContext, PassResult

ORDER = [
    "cleanup",
    "static_reshape",
    "shared_dims",
    "fold_batchnorm",
    "merge_conv_branches",
    "fold_prepbn",
    "reparameterize_ffn",
    "merge_linear_branches",
    "layernorm_to_rmsnorm",
    "fold_norm_affine",
    "fuse_gate_up",
    "fuse_parallel_ffn",
    "fuse_attention",
    "fuse_sibling_linears",
    "fold_head_products",
    "canonical_gelu",
    "canonical_norm",
    "rotary_embedding",
    "lower_moe",
    "group_query_attention",
    "flatten_tokens",
    "residual_sum",
    "ffn_fusion",
    "sparsify_ffn",
    "remove_layernorm",
    "skip_norm",
]


def registry() -> list[GraphPass]:
    """Instances of every pass in ORDER (each module defines `PASS`); imported on first use so
    importing the package stays cheap."""
    return [importlib.import_module(f"ffnx.passes.{name}").PASS for name in ORDER]


def by_name() -> dict[str, GraphPass]:
    return {p.name: p for p in registry()}


__all__ = ["GraphPass", "Match", "PassContext", "PassResult", "ORDER", "registry", "by_name"]
