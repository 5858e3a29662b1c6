"""Self-attention written op by op -> one com.microsoft Attention node (ONNX Runtime CPU/CUDA).

Pattern (BERT, ViT and other encoders as torch.onnx's dynamo exporter writes them):

    q = x·W_q + b_q, k = x·W_k + b_k, v = x·W_v + b_v              3 linears on one x [B, S, D]
    Q = (q.reshape(B, S, N, h)).transpose(0, 2, 1, 3)                 likewise K, V; K as
    K^T = (k.reshape(B, S, N, h)).transpose(0, 2, 3, 1)               [B, N, h, S]
    P = softmax(c · (Q·K^T) [+ M], axis=-1)                           c: a scalar (Mul or Div)
    y = (P·V).transpose(0, 2, 1, 3).reshape(...)                      [B, S, N·h] -> its reader

Rewrite: y' = Attention(x, [W_q | W_k | W_v], [b_q; b_k; b_v], attention_bias = M expanded to
[B|1, N|1, S, S]; num_heads = N, scale = c), then the final Reshape reads y' ([B, S, N·h] holds
the elements of [B, S, N, h] in the same order, so the Reshape gives the same tensor).
ORT runs one packed GEMM for Q, K and V and its attention kernel for the rest, instead of ~15
kernels and 6 layout copies per layer; the residual Add + LayerNorm and the GELU after it are
left to ORT's SkipLayerNormalization / BiasGelu fusions (see `canonical_gelu`).

Exact in real arithmetic: the same products, the same scale, the same additive bias M (any mask
already turned into additive form, e.g. 0 / finfo.min), the same softmax over the last axis.
fp32 rounding differs (ORT's kernel scales inside the GEMM and fuses the softmax), within the
verification tolerance. Conditions: W_q, W_k, W_v constant [D, N·h] of one dtype, biases
constant (a missing one is zeros), x of rank 3, the reshapes split the last axis into (N, h) with
B, S kept (from the inferred shapes), K's sequence equal to Q's (self-attention), M of rank 4
broadcastable to [B, N, S, S], and every intermediate read only inside the pattern.

Targets ORT only (TensorRT has its own attention fusions and does not parse com.microsoft ops).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.ffn_match import Linear, linear_from_output, scalar, used_outside
from ffnx.graph.opsets import MS_DOMAIN
from ffnx.graph.tensors import producer, sole_consumer
from ffnx.passes.base import GraphPass, Match, PassContext


def _perm(n: gs.Node | None) -> list[int] | None:
    return list(n.attrs.get("perm", [])) if n is not None and n.op == "Transpose" else None


def _heads(t: gs.Tensor, perm: list[int]):
    """t = Transpose(perm)(Reshape(lin.y)): -> (linear, [reshape, transpose]) or None."""
    tr = producer(t, "Transpose")
    if tr is None or _perm(tr) != perm:
        return None
    rs = producer(tr.inputs[0], "Reshape")
    lin = linear_from_output(rs.inputs[0]) if rs is not None else None
    return (lin, [rs, tr]) if lin is not None and not lin.fused else None


def _k_heads(t: gs.Tensor):
    """K^T: Transpose(0,2,3,1)(Reshape(k)) or Transpose(0,1,3,2)(Transpose(0,2,1,3)(...))."""
    got = _heads(t, [0, 2, 3, 1])
    if got is not None:
        return got
    tr = producer(t, "Transpose")
    if tr is None or _perm(tr) != [0, 1, 3, 2]:
        return None
    inner = _heads(tr.inputs[0], [0, 2, 1, 3])
    return (inner[0], inner[1] + [tr]) if inner is not None else None


def _scores(t: gs.Tensor):
    """t = c·(A·B) (Mul or Div by a scalar constant) or A·B: -> (c, Mul/Div or None, MatMul)."""
    sc = producer(t, ("Mul", "Div"))
    if sc is None:
        qk = producer(t, "MatMul")
        return (1.0, None, qk) if qk is not None else None
    consts = [scalar(i) for i in sc.inputs]
    if len(sc.inputs) != 2 or sum(c is not None for c in consts) != 1:
        return None
    if sc.op == "Div" and consts[1] is None:
        return None  # c / (A·B)
    j = 0 if consts[0] is None else 1
    c = consts[1 - j]
    qk = producer(sc.inputs[j], "MatMul")
    if qk is None or c == 0:
        return None
    return (c if sc.op == "Mul" else 1.0 / c), sc, qk


class FuseAttention(GraphPass):
    """Op-by-op self-attention (Q/K/V linears, scaled scores, softmax) -> com.microsoft
    Attention."""

    name = "fuse_attention"
    targets = ("ort",)

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for sm in [n for n in graph.nodes if n.op == "Softmax"]:
            info = self._site(sm, graph)
            if info is not None:
                out.append(Match(info.pop("nodes"), info))
        return out

    def _site(self, sm: gs.Node, graph: gs.Graph) -> dict | None:
        nodes = [sm]
        pv = sole_consumer(sm.outputs[0], graph)
        if pv is None or pv.op != "MatMul" or pv.inputs[0] is not sm.outputs[0]:
            return None
        v = _heads(pv.inputs[1], [0, 2, 1, 3])
        back = sole_consumer(pv.outputs[0], graph)
        final = back and _perm(back) == [0, 2, 1, 3] and sole_consumer(back.outputs[0], graph)
        if v is None or not final or final.op != "Reshape":
            return None
        t, bias = sm.inputs[0], None
        add = producer(t, "Add")
        if add is not None:  # scores + M: the scaled product is the input with the QK chain
            side = next((i for i, c in enumerate(add.inputs) if _scores(c) is not None), None)
            if side is None:
                return None
            t, bias = add.inputs[side], add.inputs[1 - side]
            nodes.append(add)
        got = _scores(t)
        if got is None:
            return None
        scale, sc, qk = got
        nodes += [sc] if sc is not None else []
        q = _heads(qk.inputs[0], [0, 2, 1, 3])
        k = qk and _k_heads(qk.inputs[1])
        if not q or not k:
            return None
        nodes += [qk, pv, back]
        lins = {"q": q[0], "k": k[0], "v": v[0]}
        for lin, extra in (q, k, v):
            nodes += lin.nodes + extra
        return {"nodes": nodes, "linears": lins, "scale": float(scale), "bias": bias,
                "final": final, "y": pv.outputs[0], "q_heads": qk.inputs[0]}  # fmt: skip

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        lins: dict[str, Linear] = m.info["linears"]
        x = lins["q"].x
        if any(lin.x is not x for lin in lins.values()):
            return "Q, K and V are not projections of one tensor (cross-attention)"
        ws = [lin.weight for lin in lins.values()]
        if len({w.shape for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
            return "Q, K and V weights differ in shape or dtype"
        if x.shape is None or len(x.shape) != 3:
            return "the projected input is not of rank 3 [batch, seq, hidden]"
        qh = m.info["q_heads"].shape
        width = ws[0].shape[1]
        if qh is None or len(qh) != 4 or not all(isinstance(d, int) for d in qh[1::2]):
            return "head count and size are not known from the inferred shapes"
        n_heads, head = int(qh[1]), int(qh[3])
        if n_heads * head != width:
            return f"{n_heads} heads x {head} != projection width {width}"
        for lin in lins.values():  # the Reshape keeps B, S and splits the last axis
            rs_out = lin.y.outputs[0].outputs[0].shape
            if (
                rs_out is None
                or list(rs_out[:2]) != list(x.shape[:2])
                or rs_out[2:]
                != [
                    n_heads,
                    head,
                ]
            ):
                return "a Q/K/V reshape is not [batch, seq, heads, head_size] of its input"
        bias = m.info["bias"]
        if bias is not None:
            bs = bias.shape
            if bs is None or len(bs) != 4:
                return "the additive attention mask is not of rank 4"
            if bs[0] not in (1, x.shape[0]) or bs[1] not in (1, n_heads):
                return f"the attention mask of shape {bs} does not broadcast to [B, N, S, S]"
        keep = [m.info["y"].outputs[0].outputs[0]]
        return used_outside([n for n in m.nodes if n is not m.info["final"]], keep, graph)

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        lins: dict[str, Linear] = m.info["linears"]
        x, (q, k, v) = lins["q"].x, lins.values()
        name = m.nodes[0].name or "attention"
        w = np.concatenate([q.weight, k.weight, v.weight], axis=1)
        zeros = np.zeros(q.width, q.weight.dtype)
        b = np.concatenate([lin.bias if lin.bias is not None else zeros for lin in (q, k, v)])
        wc = gs.Constant(f"{name}/qkv_weight", w)
        inputs = [x, wc, gs.Constant(f"{name}/qkv_bias", b.astype(w.dtype))]
        bias = m.info["bias"]
        if bias is not None:
            inputs += [gs.Variable.empty(), gs.Variable.empty(), self._expanded(graph, bias, x)]
        heads = int(m.info["q_heads"].shape[1])
        y = gs.Variable(f"{name}/attention", dtype=x.dtype, shape=list(x.shape[:2]) + [q.width])
        graph.nodes.append(
            gs.Node("Attention", f"{name}/Attention", domain=MS_DOMAIN,
                    attrs={"num_heads": heads, "scale": m.info["scale"]},
                    inputs=inputs, outputs=[y])
        )  # fmt: skip
        m.info["final"].inputs[0] = y  # the old nodes are now dead (the driver's cleanup)

    def _expanded(self, graph: gs.Graph, bias: gs.Tensor, x: gs.Tensor) -> gs.Tensor:
        """bias broadcast to [B|1, N|1, S, S], S = x.shape[1] (one Expand per mask tensor):
        ORT's attention_bias needs both sequence axes and broadcasts only dims 0 and 1. (Not
        taken from the inferred shape: a mask built by broadcasting ops is often [B, 1, 1, S]
        at run time where inference says [B, 1, S, S].)"""
        key = f"{bias.name}/expanded_to_seq"
        have = graph.tensors().get(key)
        if have is not None:
            return have
        shape = gs.Variable(f"{key}/x_shape", dtype=np.int64, shape=[1])
        tgt = gs.Variable(f"{key}/shape", dtype=np.int64, shape=[4])
        seq = [x.shape[1]] * 2
        out = gs.Variable(key, dtype=bias.dtype, shape=list(bias.shape[:2]) + seq)
        ones = gs.Constant(f"{key}/ones", np.ones(2, np.int64))
        graph.nodes += [
            gs.Node("Shape", f"{key}/Shape", attrs={"start": 1, "end": 2}, inputs=[x],
                    outputs=[shape]),
            gs.Node("Concat", f"{key}/Concat", attrs={"axis": 0},
                    inputs=[ones, shape, shape], outputs=[tgt]),
            gs.Node("Expand", f"{key}/Expand", inputs=[bias, tgt], outputs=[out]),
        ]  # fmt: skip
        return out


PASS = FuseAttention()
