"""Run the token-wise parts of a transformer on [tokens, D] instead of [B, N, D].

ONNX Runtime fuses MatMul + bias Add into one Gemm only when the MatMul's input is 2-D; a
[B, N, D] activation keeps every linear layer's bias (and the sum of two linears, such as
RePaViT's FFN and its idle branch) as a separate Add kernel. This pass finds the region of
token-wise nodes (each output row depends only on the same row of its inputs):

  MatMul(x, W) with W a constant matrix; Add / Sub / Mul / Div of region tensors and constants
  over the channel axis (scalar or [D]); LayerNormalization over the last axis; Split over the
  last axis; element-wise unary ops (Relu, Erf, Sigmoid, Tanh, Gelu, ...)

whose rank-3 tensors share the token dims (B, N), and rewrites it on [B·N, D]: a Reshape to
[-1, D] where the region is entered (or the entering Reshape's constant target rewritten to
[-1, D]), a Reshape back to [B, N, D] where a node outside reads it (none before a Reshape with
a constant target, which reads the rows the same either way). ORT then fuses each MatMul + Add
into Gemm.

Exact: a Reshape only relabels the same row-major elements, and every region node computes the
same values per row. Conditions: at most one of B, N dynamic (the Reshape back uses a constant
target with -1 for it); every constant operand broadcasts over the channel axis only.

Speed, hence applied only where it pays: where it removes more Add kernels than the Reshapes it
adds, and where the region's widest activation has at most MAX_ELEMENTS per sample, where a
kernel launch costs about as much as an Add's work (zoo tiny ViTs, [16, 256]: vit-repa
1.24x -> 1.34x the plain export at batch 1, vit-mlp 1.13x -> 1.16x). On larger activations the
fused Gemm gains nothing and measured 2-4 % slower (zoo base ViTs, [197, 2048], batch 1 and 8).

For ONNX Runtime only (`targets`): TensorRT handles the 3-D MatMul + bias itself.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.tensors import const
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult

MAX_ELEMENTS = 1 << 16  # per sample, in the region's widest activation (see the docstring)
UNARY = {"Relu", "Erf", "Sigmoid", "Tanh", "Gelu", "Sqrt", "Neg", "Abs", "Softplus", "Identity"}
BINARY = {"Add", "Sub", "Mul", "Div"}


def _tokens(t: gs.Tensor) -> tuple | None:
    """(B, N, D) of a rank-3 float tensor with a static D, else None."""
    s = t.shape
    if isinstance(t, gs.Constant) or s is None or len(s) != 3 or not isinstance(s[2], int):
        return None
    if t.dtype not in (np.float32, np.float16):
        return None
    return tuple(s)


def _channel_const(t: gs.Tensor) -> bool:
    """A constant that broadcasts over the channel axis only (scalar or [..1.., D])."""
    v = const(t)
    return v is not None and (v.size == 1 or (v.ndim >= 1 and all(d == 1 for d in v.shape[:-1])))


def _last_axis(n: gs.Node, default: int) -> bool:
    return int(n.attrs.get("axis", default)) in (-1, 2)


def tokenwise(n: gs.Node) -> bool:
    """Whether each output row of `n` depends only on the same row of its rank-3 inputs."""
    if n.domain:
        return False
    if n.op == "MatMul":
        w = const(n.inputs[1])
        return w is not None and w.ndim == 2 and _tokens(n.inputs[0]) is not None
    if n.op in BINARY:
        return all(_tokens(i) is not None or _channel_const(i) for i in n.inputs)
    if n.op == "LayerNormalization":
        return _last_axis(n, -1) and len([o for o in n.outputs if o.name]) == 1
    if n.op == "Split":
        return _last_axis(n, 0)
    return n.op in UNARY


class FlattenTokens(GraphPass):
    """Token-wise regions on [B·N, D] so ORT fuses every MatMul + bias Add into Gemm."""

    name = "flatten_tokens"
    targets = ("ort",)

    def match(self, graph: gs.Graph) -> list[Match]:
        groups: dict[tuple, list[gs.Node]] = {}
        for n in graph.nodes:
            if not tokenwise(n):
                continue
            shapes = [_tokens(t) for t in [*n.inputs, *n.outputs] if const(t) is None and t.name]
            dims = {s[:2] if s else None for s in shapes}
            if len(dims) == 1 and None not in dims:
                groups.setdefault(next(iter(dims)), []).append(n)
        return [Match(nodes, {"dims": dims}) for dims, nodes in groups.items()]

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        dims = m.info["dims"]
        if sum(not isinstance(d, int) for d in dims) > 1:
            return f"token dims {dims}: more than one dynamic (the Reshape back needs a shape)"
        widest = max(_per_sample(t) for t in _region_tensors(m.nodes))
        if widest > MAX_ELEMENTS:
            return f"activations of {widest} elements per sample: no launch-bound Adds to save"
        plan = _plan(graph, m.nodes)
        fused, added = _fusable_adds(m.nodes), plan["new_reshapes"]
        if fused <= added:
            return f"{fused} bias Adds would fuse, {added} Reshapes would be added"
        m.info.update(plan=plan, fused=fused)
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        _flatten(graph, m.nodes, m.info["plan"], m.info["dims"])

    def note(self, res: PassResult, m: Match) -> None:
        res.notes.setdefault("regions", []).append(
            {"nodes": len(m.nodes), "adds_fusable": m.info["fused"],
             "reshapes_added": m.info["plan"]["new_reshapes"]}
        )  # fmt: skip


def _per_sample(t: gs.Tensor) -> int:
    """Elements of a [B, N, D] tensor per unit of its dynamic dim (all of it when static)."""
    return int(np.prod([d for d in t.shape if isinstance(d, int)]))


def _region_tensors(nodes: list[gs.Node]) -> list[gs.Tensor]:
    seen, out = set(), []
    for n in nodes:
        for t in [*n.inputs, *n.outputs]:
            if _tokens(t) is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def _reshape_target(n: gs.Node) -> np.ndarray | None:
    """The constant target of a Reshape that reads rows the same from any input rank (no 0 in
    it: with or without allowzero, the result does not depend on the input's shape)."""
    if n.op != "Reshape":
        return None
    v = const(n.inputs[1])
    return v if v is not None and 0 not in v.tolist() else None


def _plan(graph: gs.Graph, nodes: list[gs.Node]) -> dict:
    inside = {id(n) for n in nodes}
    entries, exits, retarget, new = [], [], [], 0
    for t in _region_tensors(nodes):
        producer = t.inputs[0] if t.inputs else None
        outside = [c for c in t.outputs if id(c) not in inside]
        if producer is None or id(producer) not in inside:  # the region reads t: entry
            target = _reshape_target(producer) if producer is not None else None
            if target is not None and not outside and t not in graph.outputs:
                retarget.append(t)  # its Reshape writes [-1, D] directly
            else:
                entries.append(t)
                new += 1
        elif outside or t in graph.outputs:  # produced inside, read outside: exit
            needs = t in graph.outputs or any(_reshape_target(c) is None for c in outside)
            exits.append((t, needs))
            new += needs
    return {"entries": entries, "exits": exits, "retarget": retarget, "new_reshapes": new}


def _fusable_adds(nodes: list[gs.Node]) -> int:
    """MatMul outputs read only by an Add in the region: each Add becomes part of a Gemm."""
    inside = {id(n) for n in nodes}
    count = 0
    for n in nodes:
        if n.op == "MatMul":
            readers = n.outputs[0].outputs
            if len(readers) == 1 and readers[0].op == "Add" and id(readers[0]) in inside:
                count += 1
    return count


def _flatten(graph: gs.Graph, nodes: list[gs.Node], plan: dict, dims: tuple) -> None:
    inside = {id(n) for n in nodes}
    for t in plan["retarget"]:
        r = t.inputs[0]
        r.inputs[1] = gs.Constant(
            f"{r.name}/flatten_tokens/shape", np.array([-1, t.shape[2]], np.int64)
        )
    for t in plan["entries"]:
        flat = gs.Variable(f"{t.name}/flat", dtype=t.dtype)
        shape = gs.Constant(f"{t.name}/flat/shape", np.array([-1, t.shape[2]], np.int64))
        graph.nodes.append(
            gs.Node("Reshape", f"{t.name}/flatten", inputs=[t, shape], outputs=[flat])
        )
        for n in nodes:
            _replace_input(n, t, flat)
    back = np.array([d if isinstance(d, int) else -1 for d in dims], np.int64)
    for t, needs in plan["exits"]:
        if not needs:
            continue
        outside = [c for c in t.outputs if id(c) not in inside and _reshape_target(c) is None]
        full = gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape))
        t.name = f"{t.name}/flat"
        target = gs.Constant(f"{t.name}/unflat/shape", np.append(back, t.shape[2]))
        graph.nodes.append(
            gs.Node("Reshape", f"{t.name}/unflatten", inputs=[t, target], outputs=[full])
        )
        for c in outside:
            _replace_input(c, t, full)
        graph.outputs[:] = [full if o is t else o for o in graph.outputs]
    for n in nodes:
        if n.op in ("LayerNormalization", "Split"):
            n.attrs["axis"] = -1
        for o in n.outputs:
            if _tokens(o) is not None:
                o.shape = None  # shape inference fills in [B*N, D]
    for t in plan["retarget"]:
        t.shape = None


def _replace_input(n: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, x in enumerate(n.inputs):
        if x is old:
            n.inputs[i] = new


PASS = FlattenTokens()
