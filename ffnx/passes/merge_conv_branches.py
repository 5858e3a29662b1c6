"""Structural reparameterization: parallel conv branches on one input, summed -> one Conv.

Pattern: a sum tree of Adds y = Σ terms (RepVGG, MobileOne, ACNet, RepViT/FastViT mixers) whose
terms all read one input x and are each one of
- Conv(x, Wᵢ, bᵢ) (BN after it already folded by `fold_batchnorm` / the export): k×k, 1×1,
  depthwise or grouped;
- BatchNormalization(x) (inference): the identity branch with scale s and shift t;
- Mul(x, s) (a BN turned into Mul+Add; its Add(·, t) is part of the tree): identity scaled by s;
- x itself: the identity branch with s = 1;
- a constant c broadcast per channel (shape 1 except the channel axis): a bias.
At least one term is a Conv and at least two terms read x.

Rewrite: one Conv(x, W, b) with kernel K = the largest branch kernel, groups g = gcd of the
branch groups, W = Σᵢ expand_g(pad_K(Wᵢ)) + Σ_identity diag(s) at the kernel centre, b = Σ bᵢ +
Σ t + Σ c. pad_K zero-pads a kᵢ kernel to K around its centre; expand_g rewrites a g'-group
kernel as a g-group one (g divides g': zero blocks off the g'-block diagonal); the identity is
W[c, c mod (C/g), centre] = s_c.

Exact (up to the order of float additions; merged in float64) because convolution is linear in
its kernel: Σᵢ conv(x, Wᵢ) = conv(x, Σᵢ Wᵢ) when every branch samples x at the same positions:
equal strides, dilations 1, odd kernels, and the same centre offset pad_begin − (k−1)/2 and
pad_end − (k−1)/2 on every axis (same output shape, kernel centres on the same input pixel);
an identity branch needs stride 1, offset 0 and as many output as input channels. Weights and
biases constant, one float dtype, auto_pad NOTSET, and every branch and inner Add read only by
the sum. Sites that fail a condition are skipped with the reason.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.algebra import sum_terms
from ffnx.graph.tensors import const, producer
from ffnx.passes.base import GraphPass, Match, PassContext


def _channel_vec(v: np.ndarray, rank: int, c: int) -> np.ndarray | None:
    """v as a [C] vector when it broadcasts per channel on a rank-`rank` (N, C, ...) tensor."""
    if v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, c):
        return None
    return np.broadcast_to(v.reshape(-1) if v.size > 1 else v.reshape(1), (c,)).astype(np.float64)


def _sole(t: gs.Tensor, graph: gs.Graph) -> bool:
    return len(t.outputs) == 1 and t not in graph.outputs


class MergeConvBranches(GraphPass):
    """Parallel Conv / identity / BN-only branches on one input, summed -> one Conv."""

    name = "merge_conv_branches"

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for n in graph.nodes:
            if n.op != "Add" or len(n.outputs) != 1:
                continue
            t = n.outputs[0]
            if _sole(t, graph) and t.outputs[0].op == "Add":
                continue  # not a root: part of a larger tree
            terms, adds = sum_terms(n, graph, constant_adds=True)
            convs = [producer(t, "Conv") for t in terms]
            if any(c is not None and len(c.inputs) >= 2 for c in convs):
                out.append(Match(adds, {"terms": terms}))
        return out

    def _branches(self, graph: gs.Graph, m: Match):
        """-> (x, convs, identities [(s, t)], biases) or the reason the site is skipped."""
        x, convs, idents, biases = None, [], [], []
        for t in m.info["terms"]:
            c = const(t)
            if c is not None:
                biases.append(c)
                continue
            p = producer(t)
            kind, src = "x", t
            if p is not None and p.op == "Conv" and _sole(t, graph):
                kind, src = "conv", p.inputs[0]
            elif p is not None and p.op == "BatchNormalization" and _sole(t, graph):
                kind, src = "bn", p.inputs[0]
            elif p is not None and p.op == "Mul" and _sole(t, graph):
                ins = [i for i in p.inputs if const(i) is None]
                if len(ins) == 1:
                    kind, src = "mul", ins[0]
            if x is None and kind != "x":
                x = src
            if kind == "x":
                idents.append(("x", t))
            elif src is not x:
                return "the branches read different inputs"
            elif kind == "conv":
                convs.append(p)
            else:
                idents.append((kind, p))
        for kind, t in idents:
            if kind == "x" and t is not x:
                return "a summed term is not a branch on the convolution's input"
        if x is None or not convs or len(convs) + len(idents) < 2:
            return "fewer than two branches on one input"
        return x, convs, idents, biases

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        b = self._branches(graph, m)
        if isinstance(b, str):
            return b
        plan = self._plan(*b)
        m.info["plan"] = plan
        return plan if isinstance(plan, str) else None

    def _plan(self, x, convs, idents, biases):
        ws, specs = [], []
        for c in convs:
            w = const(c.inputs[1])
            bias = const(c.inputs[2]) if len(c.inputs) > 2 and c.inputs[2].name else None
            if w is None or (len(c.inputs) > 2 and c.inputs[2].name and bias is None):
                return "a branch weight is not constant"
            if c.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                return "auto_pad is set"
            nd = w.ndim - 2
            ks = list(w.shape[2:])
            if any(k % 2 == 0 for k in ks):
                return "even kernel (no centre)"
            if any(d != 1 for d in c.attrs.get("dilations", [1] * nd)):
                return "dilation > 1"
            pads = list(c.attrs.get("pads", [0] * 2 * nd))
            off = tuple(pads[i] - ks[i % nd] // 2 for i in range(2 * nd))
            stride = tuple(c.attrs.get("strides", [1] * nd))
            specs.append((stride, off, int(c.attrs.get("group", 1))))
            ws.append((w, bias))
        if len({s for s, _, _ in specs}) > 1:
            return "branch strides differ"
        if len({o for _, o, _ in specs}) > 1:
            return "branch paddings do not align the kernel centres"
        if len({w.dtype for w, _ in ws}) > 1 or ws[0][0].dtype.kind != "f":
            return "branch weights differ in dtype or are not float"
        cout = {w.shape[0] for w, _ in ws}
        if len(cout) > 1:
            return "branches differ in output channels"
        cout = cout.pop()
        cin = {w.shape[1] * g for (w, _), (_, _, g) in zip(ws, specs)}
        if len(cin) > 1:
            return "branches differ in input channels"
        cin = cin.pop()
        stride, off, _ = specs[0]
        nd = ws[0][0].ndim - 2
        if idents and (cin != cout or any(s != 1 for s in stride) or any(off)):
            return "identity branch needs stride 1, centred padding and Cin == Cout"
        ident = []
        for kind, p in idents:
            if kind == "x":
                ident.append((np.ones(cout), np.zeros(cout)))
            elif kind == "mul":
                s = const(next(i for i in p.inputs if const(i) is not None))
                s = _channel_vec(s, nd + 2, cout)
                if s is None:
                    return "the Mul scale is not per channel"
                ident.append((s, np.zeros(cout)))
            else:
                if int(p.attrs.get("training_mode", 0)) or len(p.outputs) > 1:
                    return "BatchNormalization in training mode"
                vals = [const(i) for i in p.inputs[1:5]]
                if any(v is None for v in vals):
                    return "BatchNormalization parameters are not constant"
                g_, b_, mu, var = (v.astype(np.float64) for v in vals)
                s = g_ / np.sqrt(var + float(p.attrs.get("epsilon", 1e-5)))
                ident.append((s, b_ - mu * s))
        consts = []
        for c in biases:
            v = _channel_vec(c, nd + 2, cout)
            if v is None:
                return "a summed constant is not a per-channel bias"
            consts.append(v)
        return {"ws": ws, "specs": specs, "ident": ident, "consts": consts, "x": x,
                "cin": cin, "cout": cout}  # fmt: skip

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        p = m.info["plan"]
        ws, specs, cin, cout = p["ws"], p["specs"], p["cin"], p["cout"]
        nd = ws[0][0].ndim - 2
        K = [max(w.shape[2 + i] for w, _ in ws) for i in range(nd)]
        g = math.gcd(*[s[2] for s in specs])
        ci, co = cin // g, cout // g  # per-group input / output channels of the merged conv
        W = np.zeros((cout, ci, *K))
        B = np.zeros(cout)
        o = np.arange(cout)
        for (w, bias), (_, _, gi) in zip(ws, specs):
            pad = [(0, 0), (0, 0)] + [((K[i] - w.shape[2 + i]) // 2,) * 2 for i in range(nd)]
            w = np.pad(w.astype(np.float64), pad)
            # branch group of output o covers input channels grp·(cin/gi) + j; local in g-groups
            base = (o // (cout // gi)) * (cin // gi) - (o // co) * ci
            for j in range(cin // gi):
                W[o, base + j] += w[:, j]
            if bias is not None:
                B += bias.astype(np.float64)
        centre = (o, o % ci, *[np.full(cout, k // 2) for k in K])
        for s, t in p["ident"]:
            W[centre] += s
            B += t
        for c in p["consts"]:
            B += c
        dtype = ws[0][0].dtype
        stride, off, _ = specs[0]
        pads = [off[i] + K[i % nd] // 2 for i in range(2 * nd)]
        root = m.nodes[0]
        y = root.outputs[0]
        root.outputs = []
        node = gs.Node(
            "Conv",
            name=f"{root.name}_merged_conv",
            attrs={
                "kernel_shape": K,
                "strides": list(stride),
                "pads": pads,
                "dilations": [1] * nd,
                "group": g,
            },  # fmt: skip
            inputs=[
                p["x"],
                gs.Constant(f"{root.name}_merged_w", W.astype(dtype)),
                gs.Constant(f"{root.name}_merged_b", B.astype(dtype)),
            ],  # fmt: skip
            outputs=[y],
        )
        graph.nodes.append(node)


PASS = MergeConvBranches()
