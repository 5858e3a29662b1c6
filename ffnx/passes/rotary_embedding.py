"""rotary_embedding: transformers' rotate-half rotary -> one com.microsoft::RotaryEmbedding.

transformers applies rotary position embeddings to q and k of every layer as

    y = x * cos4 + rotate_half(x) * sin4,   rotate_half(x) = Concat(-x[..., h:], x[..., :h])

with x [B, H, S, D] (h = D/2), cos4 = Unsqueeze(cos, 1) and sin4 = Unsqueeze(sin, 1) from the
model's cos/sin [Bc, S, D] (Bc = B or 1), computed once per step from the positions: seven
kernels per tensor, fourteen per layer, each a pass over q or k. ONNX Runtime's RotaryEmbedding
(CPU: one loop) computes, per (b, s, head),

    y[i] = x[i] * C[p, i mod h] + sign_i * x[(i + h) mod D] * S[p, i mod h]   (sign_i = -1, i < h)

from cos/sin caches C, S [rows, h] and position ids p [B, S]. The rewrite keeps cos and sin as
the graph computes them (any rope scaling the model applies stays in the graph) and feeds

    C = Reshape(cos[..., :h], [Bc*S, h]),  S likewise,  p[b, s] = (b if Bc = B else 0) * S + s

(built once per cos/sin pair: Range, Reshape, Expand), so row p of C is cos[b, s, :h]. When
x = Transpose(y, [0, 2, 1, 3]) of a [B, S, H, D] tensor, the op reads Reshape(y, [B, S, H*D])
and its output is reshaped and transposed back: the same per-(b, s, head) map, and a following
group_query_attention then reads the [B, S, H*D] tensor without another transpose.

Exact when cos[..., i] = cos[..., i + h] and likewise sin (the op reads one half): shown on the
graph, cos and sin are Cos/Sin (then optionally Mul by a constant scalar or Cast) of
Concat(f, f) along the last axis, transformers' emb = cat(freqs, freqs). Then both graphs
compute x*c + (-x')*s per element with the same operands (bit-equal up to the kernel's
fused multiply-add). A partial rotary (GPT-NeoX, Phi: x[..., :rot] rotated, the rest passed) is
the same pattern on its slice.

GPT-OSS writes the same rotation on halves (a, b) = Split(x, 2, last axis) with half-width
cos/sin c, s [Bc, S, h] (no Concat(freqs, freqs)):

    y = Concat(a * c4 - b * s4,  b * c4 + a * s4)

which is the op's formula with C = c and S = s directly (y[i] = x[i] C - x[i+h] S for i < h,
y[i+h] = x[i+h] C + x[i] S), so no half-equality condition is needed; the same tables and
position ids are built from c and s.

DeepSeek-V2 (exported through `ffnx.export.mla_absorb`) rotates interleaved pairs (a, b) =
(x[2i], x[2i+1]) of Reshape(x, [..., h, 2]) with half-width c, s:

    y = Reshape(Concat(Unsqueeze(a * c4 - b * s4, -1), Unsqueeze(a * s4 + b * c4, -1)), [.., D])

which is the op with interleaved = 1 (y[2i] = x[2i] C - x[2i+1] S, y[2i+1] = x[2i+1] C +
x[2i] S), from the same tables. Not matched (left unchanged, with the reason): cos/sin not of
these forms, x of unknown rank or head dim. Target: ORT only.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder, i64
from ffnx.graph.ffn_match import split_sizes
from ffnx.graph.opsets import MS_DOMAIN
from ffnx.graph.tensors import const, other_input, producer, unsqueeze_axes
from ffnx.passes.base import GraphPass, Match, PassContext

HALF_PRESERVING = ("Cos", "Sin", "Cast", "Mul")  # elementwise after emb = Concat(f, f)


def _slice_range(n: gs.Node | None) -> tuple[int, int] | None:
    """(start, end) of a last-axis, step-1 Slice with constant bounds, else None."""
    if n is None or n.op != "Slice" or len(n.inputs) < 4:
        return None
    vals = [const(t) if t.name else None for t in list(n.inputs[1:5])]
    starts, ends, axes = vals[:3]
    steps = vals[3] if len(vals) > 3 else None
    rank = len(n.inputs[0].shape) if getattr(n.inputs[0], "shape", None) is not None else None
    if starts is None or ends is None or axes is None or starts.size != 1 or axes.size != 1:
        return None
    ax = int(axes.reshape(-1)[0])
    if ax != -1 and (rank is None or ax != rank - 1):
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


def _halves_equal(t: gs.Tensor) -> str | None:
    """None when t[..., i] = t[..., i + D/2] is shown by the graph (see the docstring)."""
    for _ in range(6):
        n = producer(t)
        if n is None:
            return f"{t.name} is not computed from emb = Concat(freqs, freqs)"
        if n.op == "Concat":
            ok = len(n.inputs) == 2 and n.inputs[0] is n.inputs[1] and n.attrs.get("axis") in (
                -1, len(n.inputs[0].shape or []) - 1)  # fmt: skip
            return None if ok else f"{t.name} is a Concat of two different halves"
        if n.op not in HALF_PRESERVING:
            return f"{t.name} comes from {n.op}, not Cos/Sin of Concat(freqs, freqs)"
        if n.op == "Mul":
            x = next((i for i in n.inputs if producer(i) is not None), None)
            c = const(other_input(n, x)) if x is not None else None
            if c is None or c.size != 1:
                return f"{t.name} is scaled by a non-scalar"
            t = x
        else:
            t = n.inputs[0]
    return f"{t.name}: no Concat(freqs, freqs) within six ops"


def _cos_sin(t4: gs.Tensor) -> gs.Tensor | None:
    """cos [Bc, S, D] from cos4 = Unsqueeze(cos, 1)."""
    un = producer(t4, "Unsqueeze")
    if un is None:
        return None
    x = un.inputs[0]
    if unsqueeze_axes(un) != [1] or len(x.shape or []) != 3:
        return None
    return x


def parse_rotary(add: gs.Node) -> tuple[dict | None, str | None]:
    """From the final Add of x*cos4 + rotate_half(x)*sin4: -> (site, None) or (None, why);
    (None, None) when `add` is not a rotary at all."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None, None
    for m1, m2 in (add.inputs, add.inputs[::-1]):
        a, b = producer(m1, "Mul"), producer(m2, "Mul")
        if a is None or b is None:
            continue
        for r, sin4 in ((b.inputs[0], b.inputs[1]), (b.inputs[1], b.inputs[0])):
            cat = producer(r, "Concat")
            if cat is None or len(cat.inputs) != 2:
                continue
            neg = producer(cat.inputs[0], "Neg")
            s1 = producer(cat.inputs[1], "Slice")
            s2 = producer(neg.inputs[0], "Slice") if neg is not None else None
            if s1 is None or s2 is None or s1.inputs[0] is not s2.inputs[0]:
                continue
            x = s1.inputs[0]
            cos4 = other_input(a, x)
            if cos4 is None:
                continue
            return _check_site(add, x, cos4, sin4, cat, s1, s2, neg, a, b)
    return None, None


def _mul_of(n: gs.Node | None, t: gs.Tensor, u: gs.Tensor) -> bool:
    """n is Mul(t, u) in either order."""
    return n is not None and n.op == "Mul" and len(n.inputs) == 2 and {id(i) for i in n.inputs} \
        == {id(t), id(u)}  # fmt: skip


def parse_split_rotary(cat: gs.Node) -> tuple[dict | None, str | None]:
    """From the Concat of GPT-OSS's Concat(a*c4 - b*s4, b*c4 + a*s4), (a, b) = Split(x): ->
    (site, None) or (None, why); (None, None) when `cat` is not such a rotary."""
    if cat.op != "Concat" or len(cat.inputs) != 2:
        return None, None
    sub, add = producer(cat.inputs[0], "Sub"), producer(cat.inputs[1], "Add")
    if sub is None or add is None:
        return None, None
    m1, m2 = producer(sub.inputs[0], "Mul"), producer(sub.inputs[1], "Mul")
    split = next((producer(t, "Split") for t in (m1.inputs if m1 else []) if producer(t, "Split")),
                 None)  # fmt: skip
    if m2 is None or split is None or len(split.outputs) != 2:
        return None, None
    a, b = split.outputs
    c4, s4 = other_input(m1, a), other_input(m2, b)
    if c4 is None or s4 is None:
        return None, None
    m3, m4 = (producer(t, "Mul") for t in add.inputs)
    if not (_mul_of(m3, b, c4) and _mul_of(m4, a, s4) or _mul_of(m3, a, s4) and _mul_of(m4, b, c4)):
        return None, "the second half is not b*cos + a*sin"
    x = split.inputs[0]
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int) or shape[3] % 2:
        return None, "rotary input of unknown rank or odd head dim"
    D, h = shape[3], shape[3] // 2
    sizes = split_sizes(split)
    if split.attrs.get("axis") not in (-1, 3) or (sizes is not None and sizes != [h, h]):
        return None, "the halves are not a last-axis split at D/2"
    cos, sin = _cos_sin(c4), _cos_sin(s4)
    if cos is None or sin is None:
        return None, "cos/sin are not Unsqueeze(cos, 1) of [B, S, D/2] tensors"
    if any(t.shape[-1] != h for t in (cos, sin)):
        return None, "cos/sin width is not half the head dim"
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return None, f"dtype {x.dtype} (ORT's CPU RotaryEmbedding is float32)"
    if any(len(t.outputs) != 2 for t in (a, b)) or any(
            len(n.outputs[0].outputs) != 1 for n in (m1, m2, m3, m4, sub, add)):  # fmt: skip
        return None, "an intermediate of the rotary is read elsewhere"
    return dict(x=x, cos=cos, sin=sin, D=D, out=cat.outputs[0], H=shape[1],
                nodes=[split, m1, m2, m3, m4, sub, add, cat]), None  # fmt: skip


def _pair_part(t: gs.Tensor, index: int) -> gs.Node | None:
    """The Gather node when t = Gather(P, index) over the last axis of P [..., h, 2]."""
    n = producer(t, "Gather")
    if n is None or const(n.inputs[1]) is None:
        return None
    rank = len(getattr(n.inputs[0], "shape", None) or [])
    idx = np.asarray(const(n.inputs[1]))
    if rank < 2 or idx.shape != () or int(idx) != index:
        return None
    return n if n.attrs.get("axis", 0) in (-1, rank - 1) else None


def parse_pair_rotary(out: gs.Node) -> tuple[dict | None, str | None]:
    """From the final Reshape of DeepSeek-V2's interleaved-pair rotary (module docstring): ->
    (site, None) or (None, why); (None, None) when `out` is not such a rotary."""
    cat = producer(out.inputs[0], "Concat") if out.op == "Reshape" else None
    if cat is None or len(cat.inputs) != 2:
        return None, None
    u1, u2 = (producer(t, "Unsqueeze") for t in cat.inputs)
    sub = producer(u1.inputs[0], "Sub") if u1 is not None else None
    add = producer(u2.inputs[0], "Add") if u2 is not None else None
    if sub is None or add is None:
        return None, None
    m1, m2 = producer(sub.inputs[0], "Mul"), producer(sub.inputs[1], "Mul")
    if m1 is None or m2 is None:
        return None, None
    ga = next(filter(None, (_pair_part(t, 0) for t in m1.inputs)), None)
    gb = next(filter(None, (_pair_part(t, 1) for t in m2.inputs)), None)
    if ga is None or gb is None or ga.inputs[0] is not gb.inputs[0]:
        return None, None
    a, b = ga.outputs[0], gb.outputs[0]
    c4, s4 = other_input(m1, a), other_input(m2, b)
    m3, m4 = (producer(t, "Mul") for t in add.inputs)
    if not (_mul_of(m3, a, s4) and _mul_of(m4, b, c4) or _mul_of(m3, b, c4) and _mul_of(m4, a, s4)):
        return None, "the second of each pair is not a*sin + b*cos"
    pairs_view = producer(ga.inputs[0], "Reshape")
    x = pairs_view.inputs[0] if pairs_view is not None else None
    shape, y_shape = getattr(x, "shape", None), getattr(out.outputs[0], "shape", None)
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int) or shape[3] % 2:
        return None, "rotary input of unknown rank or odd head dim"
    D, h = shape[3], shape[3] // 2
    if list(ga.inputs[0].shape[-2:]) != [h, 2] or not y_shape or y_shape[-1] != D:
        return None, "the pairs are not x viewed as [..., D/2, 2] and back"
    if cat.attrs.get("axis") not in (-1, 4) or any(unsqueeze_axes(u) not in ([-1], [4])
                                                   for u in (u1, u2)):  # fmt: skip
        return None, "the pair is not stacked on a new last axis"
    cos, sin = _cos_sin(c4), _cos_sin(s4)
    if cos is None or sin is None or any(t.shape[-1] != h for t in (cos, sin)):
        return None, "cos/sin are not Unsqueeze(cos, 1) of [B, S, D/2] tensors"
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return None, f"dtype {x.dtype} (ORT's CPU RotaryEmbedding is float32)"
    inner = [m1, m2, m3, m4, sub, add, u1, u2, cat]
    if len(ga.inputs[0].outputs) != 2 or any(len(t.outputs) != 2 for t in (a, b)) or any(
            len(n.outputs[0].outputs) != 1 for n in inner):  # fmt: skip
        return None, "an intermediate of the rotary is read elsewhere"
    return dict(x=x, cos=cos, sin=sin, D=D, out=out.outputs[0], H=shape[1], interleaved=1,
                nodes=[pairs_view, ga, gb, *inner, out]), None  # fmt: skip


def _check_site(add, x, cos4, sin4, cat, s1, s2, neg, mul_c, mul_s):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int):
        return None, "rotary input of unknown rank or head dim"
    D = shape[3]
    h = D // 2
    r1, r2 = _slice_range(s1), _slice_range(s2)
    if r1 is None or r2 is None or r1[0] != 0 or r2[0] != r1[1] or r2[1] < D:
        return None, "the rotated halves are not x[..., :h] and x[..., h:]"
    if r1[1] != h or D % 2:
        return None, f"the halves split at {r1[1]}, not at D/2 = {D / 2}"
    if cat.attrs.get("axis") not in (-1, 3):
        return None, "rotate_half concatenates along another axis"
    cos, sin = _cos_sin(cos4), _cos_sin(sin4)
    if cos is None or sin is None:
        return None, "cos/sin are not Unsqueeze(cos, 1) of [B, S, D] tensors"
    for t in (cos, sin):
        why = _halves_equal(t)
        if why:
            return None, why
    if any(getattr(t, "shape", None) and t.shape[-1] != D for t in (cos, sin)):
        return None, "cos/sin width differs from the head dim"
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return None, f"dtype {x.dtype} (ORT's CPU RotaryEmbedding is float32)"
    internal = [s1.outputs[0], s2.outputs[0], neg.outputs[0], cat.outputs[0],
                mul_c.outputs[0], mul_s.outputs[0]]  # fmt: skip
    if any(len(t.outputs) != 1 for t in internal):
        return None, "an intermediate of the rotary is read elsewhere"
    return dict(x=x, cos=cos, sin=sin, D=D, out=add.outputs[0], H=shape[1],
                nodes=[s1, s2, neg, cat, mul_c, mul_s, add]), None  # fmt: skip


def _tables(b: Builder, x: gs.Tensor, cos: gs.Tensor, sin: gs.Tensor, h: int) -> tuple:
    """(position ids [B, S], cos cache, sin cache [Bc*S, h]) for x [B, ., S, .]."""
    bs = b.op("Shape", cos, start=0, end=2)  # [Bc, S]
    rows = b.op("ReduceProd", bs, keepdims=0)
    ids = b.op("Reshape", b.op("Range", i64(0).reshape(()), rows, i64(1).reshape(())), bs)
    target = b.op("Concat", b.op("Shape", x, start=0, end=1), b.op("Shape", cos, start=1, end=2),
                  axis=0)  # fmt: skip
    pos = b.op("Expand", ids, target)
    caches = [b.op("Reshape", b.op("Slice", t, i64(0), i64(h), i64(-1)), i64(-1, h))
              for t in (cos, sin)]  # fmt: skip
    return pos, caches[0], caches[1]


def rewrite_site(graph: gs.Graph, s: dict, shared: dict) -> None:
    b = Builder(graph, f"{s['out'].name}/rotary")
    x, D, h = s["x"], s["D"], s["D"] // 2
    key = (s["cos"].name, s["sin"].name)
    if key not in shared:
        shared[key] = _tables(b, x, s["cos"], s["sin"], h)
    pos, c, sn = shared[key]
    for n in s["nodes"]:
        n.outputs.clear()
        n.inputs.clear()
    out, attrs = s["out"], {"interleaved": s["interleaved"]} if s.get("interleaved") else {}
    tr = producer(x, "Transpose")
    y = tr.inputs[0] if tr is not None and list(tr.attrs.get("perm", [])) == [0, 2, 1, 3] else None
    H = s["H"]
    if y is not None and isinstance(H, int):  # rotate in [B, S, H*D]: GQA reads it as it is
        flat = gs.Variable(b.name("rotary_bsd"), dtype=x.dtype,
                           shape=[*(y.shape or ["B", "S"])[:2], H * D])  # fmt: skip
        b.op("RotaryEmbedding", b.op("Reshape", y, i64(0, 0, H * D)), pos, c, sn,
             outputs=[flat], domain=MS_DOMAIN, **attrs)  # fmt: skip
        back = b.op("Reshape", flat, i64(0, 0, H, D))
        b.op("Transpose", back, perm=[0, 2, 1, 3], outputs=[out])
    else:
        b.op("RotaryEmbedding", x, pos, c, sn, outputs=[out], domain=MS_DOMAIN, **attrs)


class RotaryEmbeddingPass(GraphPass):
    """x*cos + rotate_half(x)*sin (transformers' rotary; GPT-OSS's split-halves form;
    DeepSeek-V2's interleaved pairs) -> com.microsoft::RotaryEmbedding."""

    name = "rotary_embedding"
    targets = ("ort",)

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        parse = {"Add": parse_rotary, "Concat": parse_split_rotary, "Reshape": parse_pair_rotary}
        for n in graph.nodes:
            site, why = parse[n.op](n) if n.op in parse else (None, None)
            if site is not None or why is not None:
                out.append(Match([n], {"site": site, "why": why}))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        return m.info["why"]

    def prepare(self, graph, ctx: PassContext, matches) -> dict:
        shared: dict = {}
        for m in matches:
            m.info["shared"] = shared
        return {}

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        rewrite_site(graph, m.info["site"], m.info["shared"])


PASS = RotaryEmbeddingPass()
