"""Pre-LN -> Pre-RMSNorm by re-centring the residual stream (Jiang et al., NeurIPS 2023).

LN(x) = γ ⊙ (x − μ(x)) / √(var(x) + ε) + β equals RMSNorm(x) = γ ⊙ x / √(mean(x²) + ε) + β
whenever μ(x) = 0 over the normalised (last) axis. A pre-LN residual stream h is a sum of
writers: token/position tables, the output projections of attention and FFN blocks (and any
constant added to it). Subtracting each writer's mean over the last axis,

    table rows:  E ← E − mean_cols(E)         projections: W ← W − mean_cols(W), b ← b − mean(b)

makes every writer, hence h, zero-mean, and changes nothing a LayerNorm reads, because
LN(h − μ(h)) = LN(h). Every LayerNorm reading the stream then becomes an RMSNorm with the same
γ, β (ONNX RMSNormalization at opset ≥ 23, else Pow/ReduceMean/Add/Sqrt/Div/Mul, which ONNX
Runtime fuses). Exact up to float rounding.

The stream is the closure of tensors under Add, from each LayerNorm's input. Conditions, all
or nothing per stream: every term is re-centrable — a Linear with constant weights, a Conv with
constant weights whose output channels become the stream's last axis (ViT patch embedding:
W ← W − mean over output channels), a Gather from a constant table (not along the feature
axis), a constant, or Concat/Slice/Gather/Expand/Identity/Transpose/Reshape of those that keep
the feature axis whole (followed through permutations and reshapes); every reader of a stream
tensor is a last-axis LayerNorm or another Add of the stream; no stream tensor is a graph
output. Re-centred weights are new constants (a table tied to an LM head keeps its original
there). The pass also applies to "streams" of one writer, e.g. Peri-LN's output norms, which
read a projection directly.

Opt-in (default = False): on ONNX Runtime CPU a LayerNormalization is already one kernel (and
fuses with the residual Add into SkipLayerNormalization), while the decomposition becomes one
SimplifiedLayerNormalization only while its γ Mul is present (`fold_norm_affine` removes it).
Measured on the zoo's gpt-mlp (base, 1 thread) the export, this pass alone and the default
pipeline with it ran within noise of each other (3.6-3.9 ms per token); the rewrite pays off
where RMSNorm has a cheaper kernel than LayerNorm, or as the first step of `remove_layernorm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import Linear, linear_from_output, used_outside
from ffnx.graph.norm_match import Norm, find_norms
from ffnx.graph.tensors import const, producer
from ffnx.passes.base import GraphPass, Match, PassContext


@dataclass
class Stream:
    readers: list[Norm] = field(default_factory=list)
    linears: list[Linear] = field(default_factory=list)
    convs: list[gs.Node] = field(default_factory=list)  # channel axis = the stream's last axis
    consts: list[tuple[gs.Node, int, int]] = field(default_factory=list)  # (node, input, axis)
    tensors: set[int] = field(default_factory=set)
    problem: str | None = None

    def fail(self, reason: str) -> None:
        self.problem = self.problem or reason


def _rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def _reshape_axis(n: gs.Node, axis: int) -> int | None:
    """The input axis of Reshape `n` that becomes output axis `axis` (< 0) element for element:
    equal size and an equal product of the (static) dims after it."""
    i, o = n.inputs[0].shape, n.outputs[0].shape
    if i is None or o is None or -axis > len(o):
        return None
    tail = o[len(o) + axis + 1 :]
    if not all(isinstance(d, int) for d in tail):
        return None
    want, prod = int(np.prod(tail)), 1
    for k in range(len(i) - 1, -1, -1):
        if prod == want and i[k] == o[len(o) + axis]:
            return k - len(i)
        if not isinstance(i[k], int) or prod > want:
            return None
        prod *= i[k]
    return None


def _data_axis(p: gs.Node, axis: int) -> int | None:
    """The axis (< 0) of p's data input(s) that p maps onto output axis `axis`, if p moves whole
    vectors along it (Concat/Slice/Gather on other axes, Expand, Identity, Transpose, Reshape)."""
    rank = _rank(p.outputs[0]) or max((_rank(t) or 0 for t in p.inputs), default=0) or None
    if p.op == "Transpose":
        perm = p.attrs.get("perm")
        return perm[len(perm) + axis] - len(perm) if perm and -axis <= len(perm) else None
    if p.op == "Reshape":
        return _reshape_axis(p, axis)
    if p.op in ("Expand", "Identity"):
        return axis
    if rank is None:
        return None
    if p.op == "Concat":
        return axis if p.attrs.get("axis", 0) % rank != rank + axis else None
    if p.op == "Gather":
        table = _rank(p.inputs[0])
        g = p.attrs.get("axis", 0) % table if table else None
        return axis if g is not None and -axis <= table - 1 - g else None
    if p.op == "Slice":
        axes = const(p.inputs[3]) if len(p.inputs) > 3 and p.inputs[3].name else None
        starts = const(p.inputs[1])
        if axes is None and starts is not None:
            axes = np.arange(starts.size)
        ok = axes is not None and all(int(a) % rank != rank + axis for a in axes.reshape(-1))
        return axis if ok else None
    return None


def _add_writer(s: Stream, t: gs.Tensor, graph: gs.Graph, axis: int = -1, depth: int = 0):
    """Record the writers producing t, re-centrable along `axis`: None, else the tensor (and its
    producer) that is not."""
    lin = linear_from_output(t) if axis == -1 else None
    if lin is not None and not lin.fused:
        reason = used_outside(lin.nodes, [lin.y], graph)
        if reason:
            s.fail(reason)
        s.linears.append(lin)
        return None
    p = producer(t)
    what = (
        f"{t.name} (from {p.op} {p.name})".replace(" )", ")")
        if p
        else f"{t.name} (from a graph input)"
    )
    if p is None or depth > 8:
        return what
    if p.op == "Conv":
        w, b = const(p.inputs[1]), const(p.inputs[2]) if len(p.inputs) > 2 else None
        has_b = len(p.inputs) > 2 and p.inputs[2].name
        if w is None or (has_b and b is None) or axis != 1 - w.ndim:
            return what
        s.convs.append(p)
        return None
    a = _data_axis(p, axis)
    if a is None:
        return what
    data = p.inputs if p.op == "Concat" else p.inputs[:1]
    for i, d in enumerate(data):
        if const(d) is not None:
            s.consts.append((p, i, a))
            continue
        bad = _add_writer(s, d, graph, a, depth + 1) if len(d.outputs) == 1 else what
        if bad:
            return bad
    return None


def find_stream(seed: gs.Tensor, graph: gs.Graph, readers: dict[int, Norm]) -> Stream:
    """Everything connected to `seed` through residual Adds, with the first problem found."""
    s, todo, outputs = Stream(), [seed], {id(o) for o in graph.outputs}
    while todo:
        t = todo.pop()
        if id(t) in s.tensors:
            continue
        s.tensors.add(id(t))
        if id(t) in outputs:
            s.fail(f"stream tensor {t.name} is a graph output")
        p = producer(t)
        if const(t) is not None:
            continue  # a constant term, re-centred where it is read (see _term)
        bad = _add_writer(s, t, graph)
        if bad and p is not None and p.op == "Add" and len(p.inputs) == 2:
            for i in p.inputs:
                _term(s, p, i, todo)
        elif bad:
            s.fail(f"{bad} writes to the stream and cannot be re-centred")
        for c in t.outputs:
            norm = readers.get(id(c))
            if norm is not None and norm.kind == "layernorm" and norm.x is t:
                if all(r is not norm for r in s.readers):
                    s.readers.append(norm)
            elif c.op == "Add" and len(c.inputs) == 2:
                todo.append(c.outputs[0])
                for i in c.inputs:
                    _term(s, c, i, todo)
            else:
                what = "RMSNorm" if norm is not None else f"{c.op} {c.name}"
                s.fail(f"{what} reads the stream at {t.name} (needs a last-axis LayerNorm)")
    return s


def _term(s: Stream, add: gs.Node, t: gs.Tensor, todo: list) -> None:
    if const(t) is not None:
        s.consts.append((add, next(i for i, x in enumerate(add.inputs) if x is t), -1))
    else:
        todo.append(t)


class LayerNormToRMSNorm(GraphPass):
    """Re-centre every writer of a pre-LN residual stream; its LayerNorms become RMSNorms."""

    name = "layernorm_to_rmsnorm"
    default = False  # exact, but no faster on ONNX Runtime CPU (see the module docstring)

    def match(self, graph: gs.Graph) -> list[Match]:
        norms = find_norms(graph)
        readers = {}
        for n in norms:
            for node in n.nodes:
                if any(i is n.x for i in node.inputs):
                    readers[id(node)] = n
        out, seen = [], set()
        for n in norms:
            if n.kind != "layernorm" or id(n.x) in seen:
                continue
            s = find_stream(n.x, graph, readers)
            seen |= s.tensors
            out.append(Match([r.nodes[0] for r in s.readers] or n.nodes[:1], {"stream": s}))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        s: Stream = m.info["stream"]
        if s.problem:
            return s.problem
        widths = {r.gamma.size for r in s.readers if r.gamma is not None}
        widths |= {lin.width for lin in s.linears}
        if len(widths) > 1:
            return f"stream widths disagree: {sorted(widths)}"
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        s: Stream = m.info["stream"]
        b = Builder(graph, self.name)
        for lin in s.linears:
            _recentre_linear(b, lin)
        for conv in s.convs:
            _recentre(b, conv, 1, 0)
            if len(conv.inputs) > 2 and conv.inputs[2].name:
                _recentre(b, conv, 2, 0)
        done = set()
        for node, i, axis in s.consts:
            if (id(node), i) not in done:
                done.add((id(node), i))
                _recentre(b, node, i, axis)
        for r in s.readers:
            dt = r.gamma.dtype if r.gamma is not None else np.float32
            y = r.y
            r.nodes[-1].outputs.clear()
            b.redirect(b.norm("rmsnorm", r.x, r.eps, r.gamma, r.beta, dt), y)


def _centred(v: np.ndarray, axis: int) -> np.ndarray:
    """v minus its mean along `axis`; zeros when v is broadcast along it (has no such axis)."""
    v64 = v.astype(np.float64)
    if v64.ndim < (-axis if axis < 0 else axis + 1):
        return np.zeros_like(v64)
    return v64 - v64.mean(axis=axis, keepdims=True)


def _recentre(b: Builder, node: gs.Node, i: int, axis: int) -> None:
    """Replace constant input i of `node` by a copy centred along `axis`."""
    v = const(node.inputs[i])
    node.inputs[i] = b.const(_centred(v, axis).astype(v.dtype), "centred")


def _recentre_linear(b: Builder, lin: Linear) -> None:
    """W ← W − mean over output columns, b ← b − mean(b), as new constants."""
    dt = lin.weight.dtype
    head = lin.nodes[0]
    if head.op == "Gemm":
        axis = 0 if head.attrs.get("transB", 0) else 1
        w = const(head.inputs[1])
        head.inputs[1] = b.const(_centred(w, axis).astype(w.dtype), "w_centred")
        if len(head.inputs) > 2 and head.inputs[2].name:
            c = const(head.inputs[2])
            head.inputs[2] = b.const((c - c.astype(np.float64).mean()).astype(c.dtype), "b")
        return
    head.inputs[1] = b.const(_centred(lin.weight, 1).astype(dt), "w_centred")
    if len(lin.nodes) > 1:
        add = lin.nodes[1]
        i = next(i for i, t in enumerate(add.inputs) if t is not head.outputs[0])
        c = const(add.inputs[i])
        add.inputs[i] = b.const((c - c.astype(np.float64).mean()).astype(c.dtype), "b_centred")


PASS = LayerNormToRMSNorm()
