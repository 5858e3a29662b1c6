"""Structural reparameterization of channel-idle FFNs (RePaViT).

RePaViT (Xu et al. 2025, arXiv 2505.21847) applies the FFN activation to a subset of the hidden
channels only; the "idle" channels pass through linearly. After `fold_batchnorm` has folded
the hidden BatchNorm into fc1, the export reads

    h = x·W1 + b1;  parts = Slice/Split of h on the last axis;
    c = Concat(act(h[:, A]), h[:, I]) (any order, any number of parts);  y = c·W2 + b2

and, with the rows of W2 split the same way (W2a for the active, W2i for the idle channels),

    y = act(x·W1a + b1a)·W2a + x·(W1i·W2i) + (b1i·W2i + b2).

Rewrite: a narrow FFN on the active channels plus one D×D linear on x. When the FFN sits in a
residual r = x + y over the same x, the identity joins the linear: x·(I + W1i·W2i) + c.
Cost per token drops from 2·D·H to 2·D·|A| + D² multiply-adds (H = 4D, 75 % idle: 8D² → 3D²).

Exact in real arithmetic: matrix products are associative and distribute over the sum; the
float result differs only by rounding (products are formed in float64 and cast back). The
conditions checked: constant 2-D weights; hidden h, the concat and every intermediate read
only inside the FFN; the slices cover disjoint known column ranges on the last axis with step 1;
each active part is an elementwise activation (ReLU, GELU, SiLU forms) of one slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import (
    Linear,
    last_axis,
    linear_at,
    linear_from_output,
    match_activation,
    split_sizes,
    used_outside,
)
from ffnx.graph.tensors import const, producer
from ffnx.passes.base import GraphPass, Match, PassContext


@dataclass
class Part:
    """One concat input: columns [lo, hi) of h, through `act` when active (None: idle)."""

    src: gs.Tensor  # the slice/split output
    lo: int
    hi: int
    node: gs.Node  # the Slice or Split producing src
    act: object = None  # ffn_match.Activation


def _slice_range(n: gs.Node, width: int) -> tuple[int, int] | None:
    """[lo, hi) of a Slice over the last axis of a tensor with `width` columns."""
    if len(n.inputs) > 1:  # opset >= 10: starts, ends, [axes], [steps] as inputs
        ins = n.inputs[1:5]
        args = [const(t) if t.name else None for t in ins]
        if any(t.name and v is None for t, v in zip(ins, args)):
            return None  # a non-constant argument
        starts, ends, axes, steps = args + [None] * (4 - len(args))
    else:
        a = n.attrs
        starts, ends = np.array(a.get("starts", [])), np.array(a.get("ends", []))
        axes, steps = (np.array(a["axes"]) if "axes" in a else None), None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1 or axes is None:
        return None
    if not last_axis(int(axes.reshape(-1)[0]), n.inputs[0]):
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    lo, hi = (int(v.reshape(-1)[0]) for v in (starts, ends))
    lo, hi = (min(max(v + width if v < 0 else v, 0), width) for v in (lo, hi))
    return (lo, hi) if hi > lo else None


def _range(t: gs.Tensor, h: gs.Tensor, width: int) -> tuple[int, int, gs.Node] | None:
    p = producer(t)
    if p is None or p.inputs[0] is not h:
        return None
    if p.op == "Slice":
        r = _slice_range(p, width)
        return (*r, p) if r else None
    if p.op == "Split" and last_axis(p.attrs.get("axis", 0), h):
        sizes = split_sizes(p) or (
            [width // len(p.outputs)] * len(p.outputs) if width % len(p.outputs) == 0 else None
        )
        if sizes is None or sum(sizes) != width:
            return None
        i = next(i for i, o in enumerate(p.outputs) if o is t)
        return sum(sizes[:i]), sum(sizes[: i + 1]), p
    return None


@dataclass
class RepaFFN:
    fc1: Linear
    fc2: Linear
    concat: gs.Node
    parts: list[Part]
    residual: gs.Node | None  # Add(x, y) absorbed into the linear path


def match_repa(fc2_node: gs.Node, graph: gs.Graph) -> RepaFFN | str | None:
    fc2 = linear_at(fc2_node, graph)
    cat = producer(fc2.x, "Concat") if fc2 is not None else None
    if cat is None or not last_axis(cat.attrs.get("axis", 0), fc2.x):
        return None
    h, parts = None, []
    for t in cat.inputs:
        act = match_activation(t)
        src = act.x if act is not None else t
        p = producer(src, ("Slice", "Split"))
        if p is None or (h is not None and p.inputs[0] is not h):
            return None
        h = p.inputs[0]
        parts.append(Part(src, 0, 0, p, act))
    fc1 = linear_from_output(h) if h is not None else None
    if fc1 is None or fc1.fused:
        return None
    for part in parts:
        r = _range(part.src, h, fc1.width)
        if r is None:
            return "a slice of the hidden is not a constant last-axis range"
        part.lo, part.hi, _ = r
    if not any(p.act is None for p in parts):
        return None  # every channel is active: a plain FFN
    return _checked(RepaFFN(fc1, fc2, cat, parts, None), graph)


def _checked(f: RepaFFN, graph: gs.Graph) -> RepaFFN | str:
    widths = sum(p.hi - p.lo for p in f.parts)
    cover = sorted((p.lo, p.hi) for p in f.parts)
    if widths != f.fc2.weight.shape[0] or any(a[1] > b[0] for a, b in zip(cover, cover[1:])):
        return "slices overlap or do not match fc2's input width"
    nodes = f.fc1.nodes + [p.node for p in f.parts] + [f.concat] + f.fc2.nodes
    for p in f.parts:
        nodes += p.act.nodes if p.act is not None else []
    keep = [p.src for p in f.parts if p.act is not None] + [f.fc2.y]
    reason = used_outside(_unique(nodes), keep, graph)
    if reason:
        return reason
    if f.fc1.weight.dtype != f.fc2.weight.dtype:
        return "fc1 and fc2 weight dtypes differ"
    y = f.fc2.y
    add = y.outputs[0] if len(y.outputs) == 1 and y not in graph.outputs else None
    if add is not None and add.op == "Add" and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        if other is f.fc1.x and f.fc1.weight.shape[0] == f.fc2.width:
            f.residual = add
    return f


def _unique(nodes: list[gs.Node]) -> list[gs.Node]:
    seen, out = set(), []
    for n in nodes:
        if id(n) not in seen:
            seen.add(id(n))
            out.append(n)
    return out


def rewrite_repa(f: RepaFFN, b: Builder) -> None:
    w1, b1 = f.fc1.weight.astype(np.float64), _bias(f.fc1)
    w2, b2 = f.fc2.weight.astype(np.float64), _bias(f.fc2)
    dt = f.fc1.weight.dtype
    rows, active, lin, c = 0, [], np.zeros((w1.shape[0], w2.shape[1])), b2.copy()
    for p in f.parts:
        r = slice(rows, rows + p.hi - p.lo)
        rows += p.hi - p.lo
        if p.act is None:
            lin += w1[:, p.lo : p.hi] @ w2[r]
            c += b1[p.lo : p.hi] @ w2[r]
        else:
            active.append((p, r))
    out = f.residual.outputs[0] if f.residual is not None else f.fc2.y
    if f.residual is not None:
        lin += np.eye(lin.shape[0])
    for n in f.fc1.nodes + [p.node for p in f.parts] + [f.concat] + f.fc2.nodes:
        n.outputs.clear()
    if f.residual is not None:
        f.residual.outputs.clear()
    x = f.fc1.x
    if not active:
        b.linear(x, lin.astype(dt), c.astype(dt), out=[out])
        return
    linear = b.linear(x, lin.astype(dt), c.astype(dt))
    for p, _ in active:
        b.linear(x, w1[:, p.lo : p.hi].astype(dt), b1[p.lo : p.hi].astype(dt), out=[p.src])
    acts = [p.act.y for p, _ in active]
    a = acts[0] if len(acts) == 1 else b.op("Concat", *acts, axis=-1)
    w2a = np.concatenate([w2[r] for _, r in active]).astype(dt)
    b.op("Add", b.op("MatMul", a, b.const(w2a, "w")), linear, outputs=[out])


def _bias(lin: Linear) -> np.ndarray:
    return lin.bias.astype(np.float64) if lin.bias is not None else np.zeros(lin.width)


class ReparameterizeFFN(GraphPass):
    """Channel-idle FFN (RePaViT) -> narrow FFN on the active channels + one linear on x."""

    name = "reparameterize_ffn"

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for n in graph.nodes:
            if n.op in ("MatMul", "Gemm") and n.outputs:
                f = match_repa(n, graph)
                if f is not None:
                    out.append(Match([n], {"ffn": f}))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        why = m.info["ffn"]
        return why if isinstance(why, str) else None  # match_repa's reason it is not exact

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        rewrite_repa(m.info["ffn"], Builder(graph, self.name))


PASS = ReparameterizeFFN()
