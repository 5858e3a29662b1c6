"""torch-facing launchers of the ffnx CUDA kernels (GPU tests and benchmarks/cuda_kernels.py).

They fill the C ABI structs of `ffnx.plugins.build` from torch CUDA tensors and call the
library loaded by `build.load_kernels()`; the package itself never imports torch for this.
"""

from __future__ import annotations

import ctypes

from ffnx.errors import BackendError
from ffnx.plugins.build import (
    ACTIVATION,
    DTYPES,
    GROUP_SCORING,
    ROUTING,
    SCORING,
    SPARSE_MODE,
    MoEParams,
    MoETensors,
    SparseFFNParams,
    SparseFFNTensors,
    check_status,
)


def _ptr(t) -> int | None:
    if t is None:
        return None
    if not (t.is_cuda and t.is_contiguous()):
        raise BackendError("ffnx kernels take contiguous CUDA tensors")
    return t.data_ptr()


def _workspace(size: int, like, workspace):
    import torch

    if workspace is not None and workspace.numel() >= size:
        return workspace
    return torch.empty(max(size, 1), dtype=torch.uint8, device=like.device)


def _stream(t) -> int:
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream


def moe_forward(lib, hidden, router_logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                score_bias, token_ids, hash_table, shared_fc1_weight, shared_fc2_weight,
                shared_gate_weight, *, num_experts, top_k, routing_mode="router",
                scoring="softmax", normalize=0, routed_scaling_factor=1.0, activation="swiglu",
                n_group=1, topk_group=0, group_scoring="top2_sum", activation_alpha=1.702,
                activation_limit=7.0, out=None, workspace=None):  # fmt: skip
    """`ffnx_moe_launch` on CUDA tensors, on the current stream; arguments as `moe_reference`."""
    import torch

    D = hidden.shape[-1]
    p = MoEParams(
        hidden.numel() // D, D, fc2_weight.shape[2], num_experts, top_k,
        0 if shared_fc1_weight is None else shared_fc2_weight.shape[1], ROUTING[routing_mode],
        SCORING[scoring], int(normalize), ACTIVATION[activation], routed_scaling_factor,
        DTYPES[str(hidden.dtype).removeprefix("torch.")], fc1_bias is not None,
        fc2_bias is not None, score_bias is not None, shared_gate_weight is not None, n_group,
        topk_group, GROUP_SCORING[group_scoring], activation_alpha, activation_limit,
    )  # fmt: skip
    out = torch.empty_like(hidden) if out is None else out
    t = MoETensors(*map(_ptr, (hidden, router_logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                               score_bias, token_ids, hash_table, shared_fc1_weight,
                               shared_fc2_weight, shared_gate_weight, out)))  # fmt: skip
    size = lib.ffnx_moe_workspace_size(ctypes.byref(p))
    ws = _workspace(size, hidden, workspace)
    status = lib.ffnx_moe_launch(ctypes.byref(p), ctypes.byref(t), ws.data_ptr(), ws.numel(),
                                 _stream(hidden))  # fmt: skip
    check_status(lib, status, "ffnx_moe_launch")
    return out


def sparse_ffn_params(hidden, w_gate, w_up, b_up, b_down, *, mode, k, activation):
    D = hidden.shape[-1]
    return SparseFFNParams(
        hidden.numel() // D, D, w_up.shape[0], k, w_gate is not None, SPARSE_MODE[mode],
        ACTIVATION[activation], DTYPES[str(hidden.dtype).removeprefix("torch.")],
        b_up is not None, b_down is not None,
    )  # fmt: skip


def sparse_ffn_forward(lib, hidden, w_gate, w_up, b_up, w_down, b_down, thresholds, *,
                       mode="threshold", k=0, activation="relu", w_down_t=None, out=None,
                       workspace=None):  # fmt: skip
    """`ffnx_sparse_ffn_launch` on CUDA tensors (arguments as `sparse_ffn_reference`; w_down_t
    from `pack_down`, or None)."""
    import torch

    p = sparse_ffn_params(hidden, w_gate, w_up, b_up, b_down, mode=mode, k=k,
                          activation=activation)  # fmt: skip
    out = torch.empty_like(hidden) if out is None else out
    t = SparseFFNTensors(*map(_ptr, (hidden, w_gate, w_up, b_up, w_down, b_down, thresholds, out,
                                     w_down_t)))  # fmt: skip
    size = lib.ffnx_sparse_ffn_workspace_size(ctypes.byref(p))
    ws = _workspace(size, hidden, workspace)
    status = lib.ffnx_sparse_ffn_launch(ctypes.byref(p), ctypes.byref(t), ws.data_ptr(),
                                        ws.numel(), _stream(hidden))  # fmt: skip
    check_status(lib, status, "ffnx_sparse_ffn_launch")
    return out


def pack_down(lib, w_down):
    """w_down [D, H] -> w_down_t [H, D] via ffnx_sparse_ffn_pack_down."""
    import torch

    D, H = w_down.shape
    p = SparseFFNParams(0, D, H, 0, 0, 0, 0, DTYPES[str(w_down.dtype).removeprefix("torch.")], 0, 0)
    out = torch.empty(H, D, dtype=w_down.dtype, device=w_down.device)
    status = lib.ffnx_sparse_ffn_pack_down(ctypes.byref(p), _ptr(w_down), _ptr(out),
                                           _stream(w_down))  # fmt: skip
    check_status(lib, status, "ffnx_sparse_ffn_pack_down")
    return out
