"""N:M weight sparsity report (2:4 by default: Ampere+ sparse tensor cores; STEP, Lu et al. 2023).

A weight satisfies N:M when every group of M consecutive elements along its reduction (input)
dimension holds at most N nonzeros — the layout TensorRT's sparse kernels need (2:4 along K).
For each MatMul/Gemm with a constant weight, `report` gives the weight as applied ([K, N]: K the
reduction dim, after undoing Gemm's transposes), the fraction of its M-groups with <= N
nonzeros, and whether all of them do (a K that M does not divide is zero-padded, which is how
the kernels see it, but is reported as `k_divisible: False`). `prune` is the magnitude pruning
that makes a weight N:M (for tests and quick what-ifs; STEP itself is a training recipe).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph.tensors import const


def _groups(w: np.ndarray, m: int) -> np.ndarray:
    """w [..., K, N] -> nonzero counts per group [..., ceil(K / m), N]."""
    k = w.shape[-2]
    pad = (-k) % m
    nz = np.pad(w != 0, [(0, 0)] * (w.ndim - 2) + [(0, pad), (0, 0)])
    return nz.reshape(*w.shape[:-2], (k + pad) // m, m, w.shape[-1]).sum(-2)


def nm_stats(w: np.ndarray, n: int = 2, m: int = 4) -> dict:
    """N:M statistics of w [..., K, N] along K."""
    counts = _groups(w, m)
    frac = float((counts <= n).mean()) if counts.size else 1.0
    return {
        "groups": int(counts.size),
        "nm_fraction": frac,
        "satisfies": bool(frac == 1.0),
        "k_divisible": w.shape[-2] % m == 0,
        "zero_fraction": float((w == 0).mean()) if w.size else 0.0,
    }


def applied_weight(node: gs.Node) -> tuple[str, np.ndarray] | None:
    """(tensor name, weight as [..., K, N] with K the reduction dim) of a MatMul/Gemm node whose
    weight is a constant, else None."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    a, b = node.inputs[0], node.inputs[1]
    trans_a = node.op == "Gemm" and node.attrs.get("transA", 0)
    trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
    wb = const(b)
    if wb is not None and wb.ndim >= 2:
        return b.name, np.swapaxes(wb, -1, -2) if trans_b else wb
    wa = const(a)
    if wa is not None and wa.ndim >= 2:  # y = W @ x: W [M, K] reduces over its last dim
        return a.name, wa if trans_a else np.swapaxes(wa, -1, -2)
    return None


def report(model: onnx.ModelProto, n: int = 2, m: int = 4) -> list[dict]:
    """One entry per MatMul/Gemm with a constant weight, in node order (see the docstring)."""
    graph = gs.import_onnx(model)
    out = []
    for node in graph.nodes:
        found = applied_weight(node)
        if found is None:
            continue
        name, w = found
        out.append(
            {
                "node": node.name,
                "op": node.op,
                "weight": name,
                "shape": list(w.shape),
                "pattern": f"{n}:{m}",
                **nm_stats(w, n, m),
            }
        )
    return out


def prune(w: np.ndarray, n: int = 2, m: int = 4, axis: int = -2) -> np.ndarray:
    """w with the smallest-magnitude elements of each M-group along `axis` zeroed, keeping N."""
    moved = np.moveaxis(np.asarray(w), axis, -1)
    k = moved.shape[-1]
    if k % m:
        raise ValueError(f"dimension {k} along axis {axis} is not a multiple of {m}")
    g = moved.reshape(*moved.shape[:-1], k // m, m)
    order = np.argsort(-np.abs(g), axis=-1, kind="stable")
    keep = np.zeros_like(g, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(np.where(keep, g, 0).reshape(moved.shape), -1, axis)
