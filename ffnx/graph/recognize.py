"""Name the FFN variants and norms an ONNX graph contains (for `ffnx inspect`).

Heuristics over op patterns, reported as "what it looks like", never used to rewrite anything.
"""

from __future__ import annotations

from collections import Counter

import onnx


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _trace_to_matmul(name: str, prod: dict, depth: int = 6) -> onnx.NodeProto | None:
    """Follow elementwise ops back to the MatMul/Gemm that produced `name`."""
    for _ in range(depth):
        n = prod.get(name)
        if n is None:
            return None
        if n.op_type in ("MatMul", "Gemm"):
            return n
        if n.op_type in (
            "Add",
            "Sigmoid",
            "Gelu",
            "Relu",
            "Mul",
            "Erf",
            "Div",
            "Tanh",
            "Split",
            "Slice",
            "Reshape",
            "Cast",
        ):
            name = n.input[0]
            continue
        return None
    return None


def _is_silu(mul: onnx.NodeProto, prod: dict) -> bool:
    """x * Sigmoid(x): an activation, not a gate."""
    for i, j in ((0, 1), (1, 0)):
        p = prod.get(mul.input[i])
        if p is not None and p.op_type == "Sigmoid" and p.input[0] == mul.input[j]:
            return True
    return False


def ffn_variants(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of recognised patterns: gated FFNs, MoE forms, norms, BatchNorm, ffnx ops."""
    ops = Counter(n.op_type for n in model.graph.node)
    prod = _producers(model)
    found: Counter = Counter()
    for n in model.graph.node:
        if n.domain == "ffnx":
            found[f"{n.op_type} (ffnx op)"] += 1
        if n.op_type == "Mul" and len(n.input) == 2 and not _is_silu(n, prod):
            a, b = (_trace_to_matmul(i, prod) for i in n.input)
            if a is not None and a is b and prod.get(n.input[0]).op_type != "MatMul":
                found["gated FFN (gate/up fused into one MatMul + Split)"] += 1
            elif a is not None and b is not None and a is not b and a.input[0] == b.input[0]:
                found["gated FFN (two projections of one input multiplied)"] += 1
    if ops.get("NonZero") and (ops.get("ScatterND") or ops.get("ScatterElements")):
        found["MoE exported as per-expert loops (NonZero/Scatter)"] = ops["NonZero"]
    for op, label in (
        ("LayerNormalization", "LayerNorm"),
        ("RMSNormalization", "RMSNorm (ONNX op)"),
        ("SimplifiedLayerNormalization", "RMSNorm (ORT op)"),
        ("BatchNormalization", "BatchNorm"),
        ("MoE", "com.microsoft MoE"),
        ("QMoE", "com.microsoft QMoE"),
        ("MatMulNBits", "low-bit MatMul (MatMulNBits)"),
    ):
        if ops.get(op):
            found[label] += ops[op]
    rms = sum(
        1
        for n in model.graph.node
        if n.op_type == "ReduceMean"
        and (p := prod.get(n.input[0])) is not None
        and p.op_type in ("Pow", "Mul")
        and (p.op_type == "Pow" or p.input[0] == p.input[1])
    )
    if rms:
        found["RMS-style normalisation (mean of squares)"] += rms
    return dict(found)
