"""Per-channel affine maps and folding them into linear layers (shared by the BN and norm passes).

An Affine is y = x·s + t per channel (last axis, or axis 1 of (N, C, ...)). Inference
BatchNormalization is one: s = γ/σ, t = β − μ·s, σ = sqrt(var + ε) (`bn_affine`); so is
Mul(x, s) + Add(·, t) with constant channel vectors (`mul_add_affine`).

fold_before (a linear y = W·a(x) + b reading the affine over the axis it contracts):
    W' = W·diag(s), b' = b + W·t (Conv: t summed over the kernel window; exact only without
    padding, a zero-padded border seeing 0, not t).
fold_after (the affine reads a linear z = W·x + b that only it reads):
    W' = W·s over output channels, b' = b·s + t.
Exact up to float rounding: folding runs in float64 and casts back to the weight's dtype; all
parameters must be constant (initializers or Constant nodes); folded weights are new constants,
a weight shared with another node is never changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.ffn_match import linear_at
from ffnx.graph.tensors import const, known_shape, producer, set_input, sole_consumer

FLOATS = (np.float16, np.float32, np.float64)


@dataclass
class Affine:
    """y = x·scale + shift per channel; channel = last axis (axis -1) or axis 1 (N, C, ...)."""

    x: gs.Tensor
    y: gs.Tensor
    scale: np.ndarray  # [C] float64
    shift: np.ndarray  # [C] float64
    axis: int
    rank: int | None
    nodes: list[gs.Node]
    dtype: np.dtype

    @property
    def channels(self) -> int:
        return int(self.scale.size)


def fconst(t: gs.Tensor) -> np.ndarray | None:
    """A floating constant whose stored dtype is its array's dtype (not bfloat16-as-float32)."""
    v = const(t)
    if v is None or v.dtype not in FLOATS:
        return None
    exp = getattr(t, "export_dtype", None) if isinstance(t, gs.Constant) else None
    if exp is not None and np.dtype(exp) != v.dtype:
        return None
    return v


def rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if isinstance(t, gs.Variable) and t.shape is not None else None


def _only_reader(t: gs.Tensor, node: gs.Node, graph: gs.Graph) -> bool:
    return sole_consumer(t, graph) is node


def _view(bn: gs.Node, graph: gs.Graph) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(x, nodes) when view → BN → inverse view makes `bn` a last-axis BN of x, else None.

    The leading view may have other readers (the exporter shares one Transpose between BNs
    of the same tensor); it is then not among the nodes the fold removes."""
    inp, out = bn.inputs[0], bn.outputs[0]
    p, q = producer(inp), sole_consumer(out, graph)
    if p is None or q is None or p.op != q.op or inp in graph.outputs:
        return None
    if p.op == "Transpose":
        if list(p.attrs.get("perm", [])) != [0, 2, 1] or list(q.attrs.get("perm", [])) != [0, 2, 1]:
            return None
    elif p.op == "Reshape" and q.inputs[0] is out:
        shape = const(p.inputs[1])
        src, dst = known_shape(p.inputs[0]), known_shape(q.outputs[0])
        if shape is None or shape.size != 2 or src is None or src != dst:
            return None
        if not (src and isinstance(src[-1], int) and int(shape[-1]) == src[-1]):
            return None
    else:
        return None
    return p.inputs[0], ([p] if len(inp.outputs) == 1 else []) + [bn, q]


def bn_affine(bn: gs.Node, graph: gs.Graph) -> Affine | str:
    """The Affine a BatchNormalization computes (with its view, when it has one), or why not."""
    if bn.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode"
    if any(o.outputs or o in graph.outputs for o in bn.outputs[1:]):
        return "running mean/var outputs are read"
    if len(bn.inputs) != 5:
        return "unexpected BatchNormalization inputs"
    gamma, beta, mean, var = (fconst(t) for t in bn.inputs[1:])
    if any(v is None for v in (gamma, beta, mean, var)):
        return "BN parameters are not constants"
    if len({v.size for v in (gamma, beta, mean, var)}) != 1 or gamma.ndim != 1:
        return "BN parameters are not per-channel vectors (spatial=0)"
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + bn.attrs.get("epsilon", 1e-5))
    t = beta.astype(np.float64) - mean.astype(np.float64) * s
    dtype = bn.inputs[0].dtype or gamma.dtype
    view = _view(bn, graph)
    if view is not None:
        x, nodes = view
        return Affine(x, nodes[-1].outputs[0], s, t, -1, None, nodes, dtype)
    r = rank(bn.inputs[0])
    p = producer(bn.inputs[0])
    axis = -1 if r == 2 or (r is None and p is not None and p.op == "Gemm") else 1
    return Affine(bn.inputs[0], bn.outputs[0], s, t, axis, r, [bn], dtype)


def channel_vector(c: np.ndarray, channels: int) -> np.ndarray | None:
    """c as a [channels] float64 vector when it broadcasts along the last axis only."""
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]))
    if c.size != channels or c.shape[-1] != channels:
        return None
    return c.astype(np.float64).reshape(-1)


def mul_add_affine(mul: gs.Node, graph: gs.Graph) -> Affine | str | None:
    """y = x·s [+ t] by constant last-axis vectors (None: not such a Mul)."""
    if mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    consts = [fconst(t) for t in mul.inputs]
    if (consts[0] is None) == (consts[1] is None):
        return None
    x = mul.inputs[1] if consts[0] is not None else mul.inputs[0]
    shape = known_shape(x)
    if not shape or not isinstance(shape[-1], int):
        return "last dimension of the input is unknown"
    c = shape[-1]
    s = channel_vector(next(v for v in consts if v is not None), c)
    if s is None:
        return None
    nodes, y, t = [mul], mul.outputs[0], np.zeros(c)
    add = sole_consumer(y, graph)
    if add is not None and add.op == "Add" and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        v = fconst(other) if other is not y else None
        tv = channel_vector(v, c) if v is not None else None
        if tv is not None:
            nodes, y, t = [mul, add], add.outputs[0], tv
    if known_shape(y) != shape:
        return "the affine broadcasts its input to another shape"
    return Affine(
        x,
        y,
        s,
        t,
        -1,
        len(shape),
        nodes,
        x.dtype or consts[0 if consts[0] is not None else 1].dtype,
    )


# Linear layers: which nodes read a tensor linearly, and folding an affine into them -------


def linear_reader(n: gs.Node, x: gs.Tensor, axis: int) -> str | None:
    """None when `n` is a linear map of x contracting x's channel axis, else why not."""
    if n.op == "MatMul" or n.op == "Gemm":
        if axis != -1:
            return f"{n.op} contracts the last axis, the BN normalises axis 1"
        if len(n.inputs) < 2 or n.inputs[0] is not x or n.inputs[1] is x:
            return f"{n.op}({n.name}) does not read the tensor as its left operand"
        if n.op == "Gemm" and n.attrs.get("transA", 0):
            return f"Gemm({n.name}) has transA=1"
        w = fconst(n.inputs[1])
        if w is None or w.ndim != 2:
            return f"{n.op}({n.name}) weight is not a constant 2-D matrix"
        if n.op == "Gemm" and not _gemm_ok(n):
            return f"Gemm({n.name}) bias is not constant (or beta = 0)"
        return None
    if n.op == "Conv":
        if axis != 1 or n.inputs[0] is not x:
            return f"Conv({n.name}) does not read the channel axis of the tensor"
        if fconst(n.inputs[1]) is None or len(n.inputs) > 2 and fconst(n.inputs[2]) is None:
            return f"Conv({n.name}) weight or bias is not constant"
        pads = n.attrs.get("pads", [])
        if any(pads) or n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return (f"Conv({n.name}) pads its input with zeros: folding a BN before it is not "
                    "exact at the border")  # fmt: skip
        return None
    return f"{n.op}({n.name}) is not a linear layer"


def _weight_in_out(n: gs.Node) -> np.ndarray:
    w = fconst(n.inputs[1]).astype(np.float64)
    return w.T if n.op == "Gemm" and n.attrs.get("transB", 0) else w


def _set_weight(b: Builder, n: gs.Node, w_in_out: np.ndarray) -> None:
    dt = fconst(n.inputs[1]).dtype
    w = w_in_out.T if n.op == "Gemm" and n.attrs.get("transB", 0) else w_in_out
    n.inputs[1] = b.const(w.astype(dt), "w")


def _add_gemm_bias(b: Builder, n: gs.Node, delta: np.ndarray) -> None:
    """C' = C + delta/β (C absent: C = delta, β = 1)."""
    if len(n.inputs) > 2 and n.inputs[2].name:
        c = fconst(n.inputs[2])
        new = c.astype(np.float64) + delta / n.attrs.get("beta", 1.0)
        n.inputs[2] = b.const(new.astype(c.dtype), "b")
    else:
        n.attrs["beta"] = 1.0
        set_input(n, 2, b.const(delta.astype(fconst(n.inputs[1]).dtype), "b"))


def _add_matmul_bias(b: Builder, graph: gs.Graph, mm: gs.Node, delta: np.ndarray) -> None:
    """y = MatMul + delta: update its constant bias Add, or insert one."""
    dt = fconst(mm.inputs[1]).dtype
    lin = linear_at(mm, graph)
    if lin is not None and lin.bias is not None:
        add = lin.nodes[1]
        i = next(i for i, t in enumerate(add.inputs) if t is not mm.outputs[0])
        old = fconst(add.inputs[i])
        new = old.astype(np.float64) + delta.reshape(old.shape)
        add.inputs[i] = b.const(new.astype(old.dtype), "b")
        return
    y = mm.outputs[0]
    mid = gs.Variable(b.name("matmul"), dtype=y.dtype, shape=y.shape)
    mm.outputs[0] = mid
    b.op("Add", mid, b.const(delta.astype(dt), "b"), outputs=[y])


def fold_before(graph: gs.Graph, b: Builder, a: Affine, n: gs.Node, cache=None) -> None:
    """n(x·s + t) with n linear over the channel axis (checked by `linear_reader`).

    `cache` (one dict per affine) makes readers that shared a weight share the folded one."""
    s, t = a.scale, a.shift
    cache = {} if cache is None else cache
    key = (id(n.inputs[1]), n.op, n.attrs.get("transB", 0), n.attrs.get("group", 1))
    w = fconst(n.inputs[1])
    wf = w.astype(np.float64)
    if n.op == "Conv":
        groups, cin_g = int(n.attrs.get("group", 1)), wf.shape[1]
        idx = (np.arange(wf.shape[0]) // (wf.shape[0] // groups))[:, None] * cin_g
        idx = idx + np.arange(cin_g)
        bshape = (wf.shape[0], cin_g) + (1,) * (wf.ndim - 2)
        if key not in cache:
            cache[key] = b.const((wf * s[idx].reshape(bshape)).astype(w.dtype), "w")
        delta = (wf * t[idx].reshape(bshape)).reshape(wf.shape[0], -1).sum(1)
        old = fconst(n.inputs[2]).astype(np.float64) if len(n.inputs) > 2 else 0.0
        set_input(n, 2, b.const((old + delta).astype(w.dtype), "b"))
        n.inputs[1] = cache[key]
    else:
        w_io = _weight_in_out(n)
        if key not in cache:
            _set_weight(b, n, s[:, None] * w_io)
            cache[key] = n.inputs[1]
        n.inputs[1] = cache[key]
        delta = t @ w_io
        if np.any(delta):
            if n.op == "Gemm":
                _add_gemm_bias(b, n, n.attrs.get("alpha", 1.0) * delta)
            else:
                _add_matmul_bias(b, graph, n, delta)
    n.inputs[0] = a.x


def _gemm_ok(n: gs.Node) -> bool:
    has_c = len(n.inputs) > 2 and bool(n.inputs[2].name)
    return not has_c or (fconst(n.inputs[2]) is not None and n.attrs.get("beta", 1.0) != 0)


def producer_linear(a: Affine, graph: gs.Graph) -> tuple[list[gs.Node], str | None]:
    """The linear whose output the affine alone reads, as (nodes, reason-if-not-foldable)."""
    p = producer(a.x)
    if p is None or not _only_reader(a.x, a.nodes[0], graph):
        return [], "the BN input has other readers or no producer"
    if p.op in ("Conv", "Gemm"):
        w = fconst(p.inputs[1])
        if w is None or (p.op == "Conv" and len(p.inputs) > 2 and fconst(p.inputs[2]) is None):
            return [], f"{p.op} weight/bias not constant"
        if p.op == "Gemm" and not _gemm_ok(p):
            return [], "Gemm bias not constant (or beta = 0)"
        if a.axis != (1 if p.op == "Conv" else -1):
            return [], f"the BN does not normalise the {p.op}'s output channels"
        out = w.shape[0] if p.op == "Conv" else _weight_in_out(p).shape[1]
        return [p], None if out == a.channels else "channel count differs from the weight"
    mm = p if p.op == "MatMul" else None
    if p.op == "Add":
        mm = next((producer(i, "MatMul") for i in p.inputs if producer(i, "MatMul")), None)
    lin = linear_at(mm, graph) if mm is not None else None
    if lin is None or lin.y is not a.x or fconst(mm.inputs[1]) is None:
        return [], "not produced by a linear layer with constant weights"
    if a.axis != -1:
        return [], "MatMul output rank unknown or the BN normalises a non-last axis"
    if lin.width != a.channels:
        return [], "channel count differs from the weight"
    return lin.nodes, None


def fold_after(b: Builder, a: Affine, nodes: list[gs.Node]) -> None:
    """(linear)·s + t: scale output channels and bias; the linear then writes a.y."""
    s, t = a.scale, a.shift
    head, last = nodes[0], nodes[-1]
    w = fconst(head.inputs[1])
    wf = w.astype(np.float64)
    if head.op == "Conv":
        new_w = wf * s.reshape((-1,) + (1,) * (wf.ndim - 1))
        head.inputs[1] = b.const(new_w.astype(w.dtype), "w")
        old = fconst(head.inputs[2]).astype(np.float64) if len(head.inputs) > 2 else 0.0
        set_input(head, 2, b.const((old * s + t).astype(w.dtype), "b"))
    elif head.op == "Gemm":
        _set_weight(b, head, _weight_in_out(head) * s[None, :])
        if len(head.inputs) > 2 and head.inputs[2].name:
            c = fconst(head.inputs[2])
            new = np.broadcast_to(c.astype(np.float64), np.broadcast_shapes(c.shape, s.shape))
            new = new * s + t / head.attrs.get("beta", 1.0)
            head.inputs[2] = b.const(new.astype(c.dtype), "b")
        else:
            _add_gemm_bias(b, head, t)
    else:
        head.inputs[1] = b.const((wf * s[None, :]).astype(w.dtype), "w")
        if len(nodes) == 2:
            i = next(i for i, x in enumerate(last.inputs) if x is not head.outputs[0])
            old = fconst(last.inputs[i])
            new = old.astype(np.float64).reshape(-1) * s + t
            last.inputs[i] = b.const(new.reshape(old.shape).astype(old.dtype), "b")
        elif np.any(t):
            detach(a)
            mid = gs.Variable(b.name("matmul"), dtype=a.x.dtype, shape=a.x.shape)
            head.outputs[0] = mid
            b.op("Add", mid, b.const(t.astype(w.dtype), "b"), outputs=[a.y])
            return
    detach(a)
    last.outputs[0] = a.y


def detach(a: Affine) -> None:
    """Disconnect the affine's nodes (cleanup removes them); a.y then has no producer."""
    for n in a.nodes:
        n.outputs.clear()


def to_mul_add(b: Builder, a: Affine) -> str | None:
    """Replace the affine by Mul(x, s) + Add(·, t) broadcast on its channel axis."""
    if a.axis == 1 and a.rank is None:
        return "input rank unknown: cannot broadcast a per-channel Mul/Add"
    shape = (a.channels,) + ((1,) * (a.rank - 2) if a.axis == 1 else ())
    dt = np.dtype(a.dtype)
    detach(a)
    mid = b.op("Mul", a.x, b.const(a.scale.reshape(shape).astype(dt), "scale"))
    mid.dtype, mid.shape = a.y.dtype, a.y.shape
    b.op("Add", mid, b.const(a.shift.reshape(shape).astype(dt), "shift"), outputs=[a.y])
    return None


def consumers_reason(a: Affine, graph: gs.Graph) -> str | None:
    """None when every reader of a.y is a linear over the channel axis (at least one)."""
    if a.y in graph.outputs:
        return "the affine's output is a graph output"
    if not a.y.outputs:
        return "the affine's output is unused"
    for c in a.y.outputs:
        reason = linear_reader(c, a.y, a.axis)
        if reason:
            return reason
        w = fconst(c.inputs[1])
        width = (
            _weight_in_out(c).shape[0] if c.op != "Conv" else w.shape[1] * c.attrs.get("group", 1)
        )
        if width != a.channels:
            return f"{c.op}({c.name}) input width differs from the channel count"
    return None
