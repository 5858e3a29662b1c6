"""Matchers for linear, activation and FFN subgraphs (norms: `norm_match`).

Linear: y = x·W + b, as MatMul(x, W) [+ Add(b)], Gemm(x, B, C) (alpha = beta = 1, transA = 0),
    or one output of a Split over the last axis of such a product (the `fuse_gate_up` form);
    W constant, `weight` is always the [in, out] matrix applied to x.
Activation: Relu, Gelu (op), SiLU x·σ(x), erf GELU 0.5·x·(1 + erf(x/√2)), tanh GELU
    0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))); products may be nested and ordered either way.
FFN: fc2(act(fc1(x))) or, gated, fc2(act(fc1(x)) ⊙ up(x)) (act may be the identity: bilinear).

Matchers return None for anything they do not recognise; they never modify the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import GELU_ERF, GELU_TANH
from ffnx.graph.tensors import const, producer

ACTIVATIONS = ("relu", "silu", GELU_ERF, GELU_TANH, "bilinear")
# ops between a MoE router's product and its TopK / MoE router input (int4 keeps such products
# fp32: ffnx.compress.quantize_weights; fuse_sibling_linears never merges them)
ROUTE_THROUGH = frozenset({"Reshape", "Cast", "Softmax", "Sigmoid", "Flatten", "Identity",
                           "Squeeze", "Unsqueeze", "Neg", "Softplus", "Add"})  # fmt: skip


def scalar(t: gs.Tensor) -> float | None:
    v = const(t)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def close(a: float | None, b: float, rtol: float = 1e-4) -> bool:
    return a is not None and abs(a - b) <= rtol * abs(b)


def last_axis(axis: int, t: gs.Tensor) -> bool:
    """True when `axis` is the last axis of `t` (-1, or rank-1 with a known rank)."""
    return axis == -1 or (t.shape is not None and axis == len(t.shape) - 1)


def reduce_axes(n: gs.Node) -> list[int] | None:
    if "axes" in n.attrs:
        return list(n.attrs["axes"])
    v = const(n.inputs[1]) if len(n.inputs) > 1 else None
    return [int(a) for a in v.reshape(-1)] if v is not None else None


def node_set(nodes) -> set[int]:
    return {id(n) for n in nodes}


def used_outside(nodes: list[gs.Node], keep: list[gs.Tensor], graph: gs.Graph) -> str | None:
    """Reason when a tensor produced inside `nodes` (other than `keep`) is read outside them."""
    inside = node_set(nodes)
    outs = {id(o) for o in graph.outputs}
    for n in nodes:
        for t in n.outputs:
            if any(t is k for k in keep):
                continue
            if id(t) in outs or any(id(c) not in inside for c in t.outputs):
                return f"intermediate {t.name} is also used outside the matched subgraph"
    return None


# Linear layers ----------------------------------------------------------------------------


@dataclass
class Linear:
    """y = x·weight + bias over the last axis of x."""

    x: gs.Tensor
    y: gs.Tensor
    weight: np.ndarray  # [in, out]
    bias: np.ndarray | None  # [out]
    nodes: list[gs.Node]
    part: tuple[int, int] | None = None  # (start, stop) columns of a Split product

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    @property
    def fused(self) -> bool:
        return self.part is not None


def _bias(t: gs.Tensor, n_out: int) -> np.ndarray | None:
    b = const(t)
    if b is None or b.size != n_out or (b.ndim and b.shape[-1] != n_out):
        return None
    return b.reshape(-1)


def linear_at(mm: gs.Node, graph: gs.Graph | None = None) -> Linear | None:
    """The Linear starting at MatMul/Gemm `mm`, with its bias Add when that is the sole reader."""
    if mm.op == "Gemm":
        return _gemm(mm)
    if mm.op != "MatMul" or len(mm.inputs) != 2:
        return None
    w = const(mm.inputs[1])
    if w is None or w.ndim != 2:
        return None
    lin = Linear(mm.inputs[0], mm.outputs[0], w, None, [mm])
    t = mm.outputs[0]
    if len(t.outputs) == 1 and (graph is None or t not in graph.outputs):
        add = t.outputs[0]
        if add.op == "Add" and len(add.inputs) == 2:
            other = add.inputs[1] if add.inputs[0] is t else add.inputs[0]
            b = _bias(other, w.shape[1])
            if b is not None and other is not t:
                lin = Linear(lin.x, add.outputs[0], w, b, [mm, add])
    return lin


def _gemm(n: gs.Node) -> Linear | None:
    a = n.attrs
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or len(n.inputs) < 2:
        return None
    w = const(n.inputs[1])
    if w is None or w.ndim != 2:
        return None
    w = w.T if a.get("transB", 0) else w
    b = None
    if len(n.inputs) > 2 and n.inputs[2].name:
        if a.get("beta", 1.0) != 1.0:
            return None
        b = _bias(n.inputs[2], w.shape[1])
        if b is None:
            return None
    return Linear(n.inputs[0], n.outputs[0], w, b, [n])


def linear_from_output(t: gs.Tensor) -> Linear | None:
    """The Linear whose output is `t` (including one output of a last-axis Split of one)."""
    p = producer(t)
    if p is None:
        return None
    if p.op in ("MatMul", "Gemm"):
        lin = linear_at(p)
        return lin if lin is not None and lin.y is t else None
    if p.op == "Add":
        for src in p.inputs:
            mm = producer(src, ("MatMul",))
            lin = linear_at(mm) if mm is not None else None
            if lin is not None and lin.y is t:
                return lin
        return None
    if p.op == "Split":
        return _split_part(p, t)
    return None


def split_sizes(n: gs.Node) -> list[int] | None:
    """Sizes of a Split's outputs when known from its attributes or constant input."""
    if "split" in n.attrs:
        return [int(s) for s in n.attrs["split"]]
    if len(n.inputs) > 1 and n.inputs[1].name:
        v = const(n.inputs[1])
        return [int(s) for s in v.reshape(-1)] if v is not None else None
    return None


def _split_part(sp: gs.Node, t: gs.Tensor) -> Linear | None:
    base = linear_from_output(sp.inputs[0])
    if base is None or base.fused or not last_axis(sp.attrs.get("axis", 0), sp.inputs[0]):
        return None
    sizes, k = split_sizes(sp), len(sp.outputs)
    if sizes is None and base.width % k == 0:  # no sizes: equal parts
        sizes = [base.width // k] * k
    if sizes is None or sum(sizes) != base.width or len(sizes) != len(sp.outputs):
        return None
    i = next(i for i, o in enumerate(sp.outputs) if o is t)
    lo, hi = sum(sizes[:i]), sum(sizes[: i + 1])
    bias = base.bias[lo:hi] if base.bias is not None else None
    return Linear(base.x, t, base.weight[:, lo:hi], bias, base.nodes + [sp], (lo, hi))


# Activations ------------------------------------------------------------------------------


@dataclass
class Activation:
    kind: str
    x: gs.Tensor
    y: gs.Tensor
    nodes: list[gs.Node] = field(default_factory=list)


def _factors(t: gs.Tensor, depth: int = 4):
    """t as c·Πtᵢ through Mul (and Div by a constant): (c, [tᵢ], nodes) with scalar constants
    folded into c; the root node is always expanded, inner ones only when read once."""
    c, leaves, nodes = 1.0, [], []

    def walk(u: gs.Tensor, d: int, root: bool) -> None:
        nonlocal c
        s = scalar(u)
        if s is not None:
            c *= s
            return
        p = producer(u, ("Mul", "Div"))
        if p is None or d == 0 or (not root and len(u.outputs) != 1):
            leaves.append(u)
            return
        if p.op == "Div":
            s = scalar(p.inputs[1])
            if s is None or s == 0:
                leaves.append(u)
                return
            c /= s
            nodes.append(p)
            walk(p.inputs[0], d - 1, False)
            return
        nodes.append(p)
        for inp in p.inputs:
            walk(inp, d - 1, False)

    walk(t, depth, True)
    return c, leaves, nodes


def _power_of(leaves: list[gs.Tensor], x: gs.Tensor) -> tuple[int, list[gs.Node]] | None:
    """k with Πleaves = x^k (leaves are x or Pow(x, k))."""
    k, nodes = 0, []
    for u in leaves:
        if u is x:
            k += 1
            continue
        p = producer(u, "Pow")
        e = scalar(p.inputs[1]) if p is not None else None
        if p is None or p.inputs[0] is not x or e is None or e != int(e):
            return None
        k, nodes = k + int(e), nodes + [p]
    return k, nodes


def _one_plus(t: gs.Tensor, op: str) -> tuple[gs.Node, gs.Node] | None:
    """(Add, inner) for t = Add(op(z), 1) in either order."""
    add = producer(t, "Add")
    if add is None or len(add.inputs) != 2:
        return None
    for a, b in (add.inputs, add.inputs[::-1]):
        inner = producer(a, op)
        if inner is not None and close(scalar(b), 1.0):
            return add, inner
    return None


def match_activation(t: gs.Tensor) -> Activation | None:
    """The activation producing `t` (see the module docstring for the forms)."""
    p = producer(t)
    if p is None:
        return None
    if p.op == "Relu":
        return Activation("relu", p.inputs[0], t, [p])
    if p.op == "Gelu":
        kind = GELU_TANH if p.attrs.get("approximate", "none") == "tanh" else GELU_ERF
        return Activation(kind, p.inputs[0], t, [p])
    if p.op != "Mul":
        return None
    c, leaves, nodes = _factors(t)
    if len(leaves) != 2:
        return None
    for x, other in (leaves, leaves[::-1]):
        sig = producer(other, "Sigmoid")
        if close(c, 1.0) and sig is not None and sig.inputs[0] is x:
            return Activation("silu", x, t, nodes + [sig])
        if not close(c, 0.5):
            continue
        erf = _one_plus(other, "Erf")
        if erf is not None:
            ci, li, ni = _factors(erf[1].inputs[0])
            if li == [x] and close(ci, 1 / math.sqrt(2)):
                return Activation(GELU_ERF, x, t, nodes + list(erf) + ni)
        tanh = _one_plus(other, "Tanh")
        if tanh is not None:
            inner = _tanh_inner(tanh[1].inputs[0], x)
            if inner is not None:
                return Activation(GELU_TANH, x, t, nodes + list(tanh) + inner)
    return None


def _tanh_inner(u: gs.Tensor, x: gs.Tensor) -> list[gs.Node] | None:
    """Nodes of √(2/π)·(x + 0.044715·x³) = u, else None."""
    c, leaves, nodes = _factors(u)
    add = producer(leaves[0], "Add") if len(leaves) == 1 else None
    if add is None or not close(c, math.sqrt(2 / math.pi)):
        return None
    for a, b in (add.inputs, add.inputs[::-1]):
        if a is not x:
            continue
        cc, lc, nc = _factors(b)
        pw = _power_of(lc, x) if close(cc, 0.044715) else None
        if pw is not None and pw[0] == 3:
            return nodes + [add] + nc + pw[1]
    return None


# FFNs -------------------------------------------------------------------------------------


@dataclass
class FFN:
    """y = fc2(act(fc1(x))), or gated y = fc2(act(fc1(x)) ⊙ up(x))."""

    kind: str  # one of ACTIVATIONS ("bilinear" only when gated)
    x: gs.Tensor
    fc1: Linear
    act: Activation | None  # None for bilinear
    up: Linear | None
    mul: gs.Node | None
    fc2: Linear

    @property
    def gated(self) -> bool:
        return self.up is not None

    @property
    def y(self) -> gs.Tensor:
        return self.fc2.y

    @property
    def hidden(self) -> int:
        return self.fc1.width

    @property
    def nodes(self) -> list[gs.Node]:
        out = list(self.fc1.nodes) + (self.act.nodes if self.act else [])
        if self.up is not None:
            out += [n for n in self.up.nodes if id(n) not in node_set(out)] + [self.mul]
        return out + self.fc2.nodes

    def check_internal(self, graph: gs.Graph) -> str | None:
        return used_outside(self.nodes, [self.y], graph)


def match_gated(mul: gs.Node) -> tuple[Linear, Activation | None, Linear] | None:
    """(fc1, act, up) for Mul(act(fc1(x)), up(x)) in either operand order; act None: bilinear."""
    if mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    a, b = mul.inputs
    for g, u in ((a, b), (b, a)):
        act = match_activation(g)
        up = linear_from_output(u)
        fc1 = linear_from_output(act.x) if act is not None and up is not None else None
        if fc1 is not None and fc1.x is up.x and fc1.y is not up.y:
            return fc1, act, up
    la, lb = linear_from_output(a), linear_from_output(b)
    if la is not None and lb is not None and la.x is lb.x and la.y is not lb.y:
        return la, None, lb
    return None


def match_ffn_at(fc2_node: gs.Node, graph: gs.Graph) -> FFN | None:
    """The FFN whose down projection is MatMul/Gemm `fc2_node`."""
    fc2 = linear_at(fc2_node, graph)
    if fc2 is None:
        return None
    h = fc2.x
    act = match_activation(h)
    fc1 = linear_from_output(act.x) if act is not None else None
    if fc1 is not None and fc1.width == fc2.weight.shape[0]:
        return FFN(act.kind, fc1.x, fc1, act, None, None, fc2)
    mul = producer(h, "Mul")
    gated = match_gated(mul) if mul is not None else None
    if gated is None:
        return None
    fc1, act, up = gated
    if fc1.width != up.width or fc1.width != fc2.weight.shape[0]:
        return None
    return FFN(act.kind if act else "bilinear", fc1.x, fc1, act, up, mul, fc2)


def find_ffns(graph: gs.Graph) -> list[FFN]:
    """Every FFN in the graph, in node order."""
    out = []
    for n in list(graph.nodes):
        if n.op in ("MatMul", "Gemm"):
            f = match_ffn_at(n, graph)
            if f is not None:
                out.append(f)
    return out
