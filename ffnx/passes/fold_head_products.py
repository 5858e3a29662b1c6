"""Fold a constant per-head product into the linear beside it, where that stores fewer bytes.

Multi-head latent attention exported in its absorbed form (`ffnx.export.mla_absorb`) keeps two
per-head products, U [H, d, R] (W_uk, the softmax scale folded in) and V [H, R, Vd] (W_uv^T), as
batched MatMuls. With W a linear's weight:

Query side: q = x·W (+ b), W [K, H*D], viewed [B, S, H, D] (Reshape), heads first (Transpose
0,2,1,3), split along the last axis into parts of which part i (width d) meets U:
    q_i[h]·U[h] = x·(W_i[h]·U[h]) + b_i[h]·U[h]
so the linear's columns of part i of head h become W_i[h]·U[h] (width R), the view becomes
[B, S, H, D - d + R] and the head Split's part i is the product itself: the MatMul goes.
Value side: o = Reshape(Transpose(a·V), [B, S, H*Vd])·Wo (+ b) with a [B, H, S, R]:
    o = sum_h a[h]·V[h]·Wo[h] = Reshape(Transpose(a), [B, S, H*R])·Wo'   Wo'[h] = V[h]·Wo[h]
where Wo[h] are the rows h*Vd .. (h+1)*Vd: the MatMul goes and Wo' [H*R, N] replaces Wo.

Exact in real arithmetic (associativity); in fp32 the sums are taken in another order.

When: a batched product stays fp32 (MatMulNBits takes a 2-D weight), while the linear is
stored at `bytes_per_weight` (PassContext.options; 4 for fp32 in the pass pipeline, the
scheme's under --quantize, where `ffnx.commands.quantize.fold_for_scheme` runs it right before
the linears are quantized: 0.625 for int4 with block-32 fp32 scales). A site folds only when the
folded linear stores fewer bytes than the linear and the product together:
    query  K*H*R*b < K*H*d*b + bytes(U)        value  H*R*N*b < H*Vd*N*b + bytes(V)
It also saves the product's kernel. In fp32 that needs R <= d (or K < d*R / (R - d)), which
no DeepSeek-style config has (R = 512, d = 128); at int4 it holds for narrow models (the
hidden-512 benchmark decoders: K = N = 512, d = Vd = 64, R = 128) and not for DeepSeek-V2-Lite
(K = N = 2048, d = Vd = 128, R = 512), where the sites are reported skipped with both byte
counts.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.ffn_match import Linear, last_axis, linear_at, linear_from_output, split_sizes
from ffnx.graph.tensors import const, producer, set_input, sole_consumer, swap
from ffnx.passes.base import GraphPass, Match, PassContext

HEADS_FIRST = [0, 2, 1, 3]


def _perm(n: gs.Node | None) -> bool:
    return n is not None and n.op == "Transpose" and list(n.attrs.get("perm", [])) == HEADS_FIRST


def _query_site(mm: gs.Node, graph: gs.Graph) -> dict | None:
    """U's MatMul reading part i of a head Split of a viewed linear (the module docstring)."""
    sp = producer(mm.inputs[0], "Split")
    tr = producer(sp.inputs[0]) if sp is not None else None
    rs = producer(tr.inputs[0], "Reshape") if _perm(tr) else None
    if rs is None or not last_axis(sp.attrs.get("axis", 0), sp.inputs[0]):
        return None
    shape, sizes = const(rs.inputs[1]), split_sizes(sp)
    lin = linear_from_output(rs.inputs[0])
    if shape is None or shape.size != 4 or sizes is None or lin is None:
        return None
    i = next(k for k, o in enumerate(sp.outputs) if o is mm.inputs[0])
    heads, width = int(shape[2]), int(shape[3])
    if width != sum(sizes) or lin.width != heads * width:
        return None
    return dict(side="query", mm=mm, split=sp, view=rs, through=tr, linear=lin, part=i,
                sizes=sizes, heads=heads)  # fmt: skip


def _value_site(mm: gs.Node, graph: gs.Graph) -> dict | None:
    """V's MatMul read by Transpose(0,2,1,3) -> Reshape [B, S, H*Vd] -> a linear."""
    tr = sole_consumer(mm.outputs[0], graph)
    rs = sole_consumer(tr.outputs[0], graph) if _perm(tr) else None
    if rs is None or rs.op != "Reshape":
        return None
    shape, out = const(rs.inputs[1]), sole_consumer(rs.outputs[0], graph)
    lin = linear_at(out, graph) if out is not None else None
    if shape is None or shape.size != 3 or lin is None or lin.x is not rs.outputs[0]:
        return None
    return dict(side="value", mm=mm, view=rs, through=tr, linear=lin)


def _readers_only(t: gs.Tensor, graph: gs.Graph, *nodes: gs.Node) -> bool:
    return t not in graph.outputs and all(any(c is n for n in nodes) for c in t.outputs)


class FoldHeadProducts(GraphPass):
    """Per-head weight product (MLA's W_uk, W_uv) folded into the adjacent linear when the
    folded linear stores fewer bytes."""

    name = "fold_head_products"
    targets = ("ort", "trt")

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for mm in list(graph.nodes):
            u = const(mm.inputs[1]) if mm.op == "MatMul" and len(mm.inputs) == 2 else None
            if u is None or u.ndim != 3:
                continue
            site = _query_site(mm, graph) or _value_site(mm, graph)
            if site is not None:
                out.append(Match([mm], {**site, "product": u}))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        s, u = m.info, m.info["product"]
        lin: Linear = s["linear"]
        if s["side"] == "query":
            heads, d, r = u.shape
            sp = s["split"]
            if heads != s["heads"] or d != s["sizes"][s["part"]]:
                return f"product {list(u.shape)} does not fit {heads} heads of part width {d}"
            if not _readers_only(lin.y, graph, s["view"]) or not _readers_only(
                s["view"].outputs[0], graph, s["through"]
            ) or not _readers_only(s["through"].outputs[0], graph, sp):  # fmt: skip
                return "the viewed projection is read elsewhere"
            if not _readers_only(sp.outputs[s["part"]], graph, s["mm"]):
                return "the product's input part is read elsewhere"
            k = lin.weight.shape[0]
            before, after = k * heads * d, k * heads * r
        else:
            heads, r, vd = u.shape
            n = lin.weight.shape[1]
            rows = lin.weight.shape[0]
            if rows != heads * vd or const(s["view"].inputs[1])[2] not in (-1, rows):
                return f"product {list(u.shape)} does not fit the linear's {rows} rows"
            if not _readers_only(s["through"].outputs[0], graph, s["view"]):
                return "the product's transpose is read elsewhere"
            before, after = heads * vd * n, heads * r * n
        if s["mm"].outputs[0] in graph.outputs:
            return "the product is a graph output"
        b = float(s.get("bytes_per_weight", 4.0))
        kept = u.nbytes if len(s["mm"].inputs[1].outputs) == 1 else 0
        s["bytes"] = (int(before * b + kept), int(after * b))
        if after * b >= before * b + kept:
            return (f"folded linear would store {int(after * b)} bytes against "
                    f"{int(before * b + kept)} for linear + product")  # fmt: skip
        return None

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> dict:
        for m in matches:
            m.info["bytes_per_weight"] = ctx.options.get("bytes_per_weight", 4.0)
        return {}

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        s = m.info
        (self._query if s["side"] == "query" else self._value)(graph, s, s["product"])

    def _query(self, graph: gs.Graph, s: dict, u: np.ndarray) -> None:
        lin: Linear = s["linear"]
        heads, d, r = u.shape
        sizes, i = list(s["sizes"]), s["part"]
        lo, width = sum(sizes[:i]), sum(sizes)
        w = lin.weight.reshape(lin.weight.shape[0], heads, width)
        parts = [w[:, :, :lo], np.einsum("khd,hdr->khr", w[:, :, lo : lo + d], u),
                 w[:, :, lo + d :]]  # fmt: skip
        new_w = np.concatenate(parts, axis=2).reshape(w.shape[0], -1).astype(lin.weight.dtype)
        new_b = None
        if lin.bias is not None:
            b = lin.bias.reshape(heads, width)
            mid = np.einsum("hd,hdr->hr", b[:, lo : lo + d], u)
            new_b = np.concatenate([b[:, :lo], mid, b[:, lo + d :]], 1).reshape(-1)
        _replace_columns(graph, self.name, lin, new_w, new_b)
        sizes[i] = r
        view = const(s["view"].inputs[1]).copy()
        view[3] = sum(sizes)
        s["view"].inputs[1] = gs.Constant(f"{self.name}/{s['view'].name}/shape", view)
        _resize_split(s["split"], sizes, self.name)
        for t in (lin.y, s["view"].outputs[0], s["through"].outputs[0], *s["split"].outputs):
            t.shape = None
        part, product = s["split"].outputs[i], s["mm"].outputs[0]
        for c in list(product.outputs):
            swap(c.inputs, product, part)
        s["mm"].outputs.clear()

    def _value(self, graph: gs.Graph, s: dict, v: np.ndarray) -> None:
        lin: Linear = s["linear"]
        heads, r, vd = v.shape
        wo = lin.weight.reshape(heads, vd, -1)
        new_w = np.einsum("hrv,hvn->hrn", v, wo).reshape(heads * r, -1).astype(lin.weight.dtype)
        _set_weight(lin.nodes[0], new_w, self.name)
        view = const(s["view"].inputs[1]).copy()
        if view[2] != -1:
            view[2] = heads * r
        s["view"].inputs[1] = gs.Constant(f"{self.name}/{s['view'].name}/shape", view)
        s["through"].inputs[0] = s["mm"].inputs[0]
        for t in (s["through"].outputs[0], s["view"].outputs[0]):
            t.shape = None
        s["mm"].outputs.clear()


def _replace_columns(graph, prefix: str, lin: Linear, w: np.ndarray, b: np.ndarray | None):
    """The linear computing `lin.y` (a whole MatMul [+ Add], or columns lo:hi of one that a
    last-axis Split divides) now computes x·w (+ b): its weight (and bias) columns replaced, the
    Split's size for that part updated."""
    mm = lin.nodes[0]
    full, bias = lin.weight, lin.bias
    if lin.part is not None:
        base = linear_at(mm, graph)
        lo, hi = lin.part
        full = np.concatenate([base.weight[:, :lo], w, base.weight[:, hi:]], axis=1)
        if base.bias is not None:
            bias = np.concatenate([base.bias[:lo], b, base.bias[hi:]])
        sp = lin.nodes[-1]
        sizes = split_sizes(sp) or [base.width // len(sp.outputs)] * len(sp.outputs)
        k = next(j for j, o in enumerate(sp.outputs) if o is lin.y)
        sizes[k] = w.shape[1]
        _resize_split(sp, sizes, prefix)
    else:
        full, bias = w, b
    for n in lin.nodes:  # their outputs' recorded widths are stale
        for t in n.outputs:
            t.shape = None
    _set_weight(mm, full, prefix)
    if bias is not None:
        add = next((n for n in lin.nodes if n.op == "Add"), None)
        if add is not None:
            j = next(j for j, t in enumerate(add.inputs) if isinstance(t, gs.Constant))
            add.inputs[j] = gs.Constant(f"{prefix}/{add.name}/b", bias.astype(full.dtype))
        elif mm.op == "Gemm":
            mm.inputs[2] = gs.Constant(f"{prefix}/{mm.name}/b", bias.astype(full.dtype))


def _set_weight(mm: gs.Node, w: np.ndarray, prefix: str) -> None:
    """The MatMul / Gemm `mm` multiplies by w [K, N] (stored transposed for a transB Gemm)."""
    w = w.T if mm.op == "Gemm" and mm.attrs.get("transB", 0) else w
    mm.inputs[1] = gs.Constant(f"{prefix}/{mm.name}/w", np.ascontiguousarray(w))


def _resize_split(sp: gs.Node, sizes: list[int], prefix: str) -> None:
    """Give Split `sp` the part sizes `sizes` (as its second input: opset >= 13)."""
    set_input(sp, 1, gs.Constant(f"{prefix}/{sp.name}/split", np.array(sizes, np.int64)))
    sp.attrs.pop("num_outputs", None)
    sp.attrs.pop("split", None)


PASS = FoldHeadProducts()
