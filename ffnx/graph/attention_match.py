"""Reading a KV-cache decoder's attention, as transformers' eager attention exports it, off an
onnx-graphsurgeon graph: the cache Concats, repeat_kv, Q.K^T * scale + mask, Softmax (with
GPT-OSS's sinks), .V (the rule that uses it: ffnx.passes.group_query_attention)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.tensors import const, producer, unsqueeze_axes


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def only(t: gs.Tensor, op: str | tuple) -> gs.Node | None:
    """The sole node reading `t`, if it is `op`."""
    users = consumers(t)
    if len(users) != 1:
        return None
    ops = (op,) if isinstance(op, str) else op
    return users[0] if users[0].op in ops else None


def perm(n: gs.Node | None) -> list | None:
    return list(n.attrs.get("perm", [])) if n is not None and n.op == "Transpose" else None


def _is_cache_concat(n: gs.Node, graph: gs.Graph) -> bool:
    return (
        n.op == "Concat"
        and n.attrs.get("axis") in (2, -2)
        and len(n.inputs) == 2
        and n.inputs[0] in graph.inputs
        and n.outputs[0] in graph.outputs
    )


def _through_repeat(t: gs.Tensor) -> tuple[gs.Tensor, gs.Node | None, str | None]:
    """From a cache tensor, past transformers' repeat_kv (Unsqueeze(2), Expand, Reshape) if
    there: -> (tensor the attention reads, the first node reading it, reason if unreadable)."""
    users = consumers(t)
    if len(users) != 1:
        return t, None, f"{t.name} is read by {len(users)} nodes, not one attention"
    u = users[0]
    if u.op == "Unsqueeze":
        ex = only(u.outputs[0], "Expand")
        rs = only(ex.outputs[0], "Reshape") if ex is not None else None
        if unsqueeze_axes(u) != [2] or rs is None:
            return t, None, "the cache goes through an Unsqueeze that is not repeat_kv"
        t = rs.outputs[0]
        users = consumers(t)
        if len(users) != 1:
            return t, None, "repeat_kv output read by several nodes"
        u = users[0]
    return t, u, None


def _cache_source(graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
    """The cache Concat `t` is, or is the repeat_kv (Reshape(Expand(Unsqueeze))) of."""
    n = producer(t)
    if n is not None and n.op == "Reshape":
        ex = producer(n.inputs[0], "Expand")
        un = producer(ex.inputs[0], "Unsqueeze") if ex is not None else None
        n = producer(un.inputs[0]) if un is not None else None
    return n if n is not None and _is_cache_concat(n, graph) else None


def is_key_cache(n: gs.Node, graph: gs.Graph) -> bool:
    """A cache Concat read (through repeat_kv) by a Transpose: the keys of Q.K^T; or one read
    in a way this pass cannot follow (a site to report, with the reason, by `check`)."""
    if not _is_cache_concat(n, graph):
        return False
    _, first, why = _through_repeat(n.outputs[0])
    return why is not None or (first is not None and first.op == "Transpose")


def _dim(n: gs.Node, i: int):
    """Axis i of what Expand/Reshape `n` makes: from the inferred shape, else from its shape
    input (a constant, or a Concat of pieces whose i-th is a 1-element constant)."""
    shape = getattr(n.outputs[0], "shape", None)
    if shape is not None and len(shape) > i and isinstance(shape[i], int):
        return shape[i]
    target = n.inputs[1]
    c = const(target)
    if c is not None:
        return int(c.reshape(-1)[i]) if c.size > i else None
    cat = producer(target, "Concat")
    if cat is not None and len(cat.inputs) > i:
        piece = const(cat.inputs[i])
        return int(piece.reshape(-1)[0]) if piece is not None and piece.size == 1 else None
    return None


def _constant_through(t: gs.Tensor) -> np.ndarray | None:
    """A constant reached from `t` back through Expand / Reshape / Unsqueeze / Cast only."""
    for _ in range(6):
        c = const(t)
        if c is not None:
            return c
        n = producer(t, ("Expand", "Reshape", "Unsqueeze", "Cast"))
        if n is None:
            return None
        t = n.inputs[0]
    return None


def _softmax(masked: gs.Tensor) -> tuple[gs.Tensor | None, np.ndarray | None, str | None]:
    """From the masked scores to the probabilities: Softmax over the keys; or GPT-OSS's sinks,
    Concat([scores, sink_h], -1) [- its max] -> Softmax -> Slice(..., :-1), which is GQA's
    head_sink (p_j = exp(x_j) / (sum_i exp(x_i) + exp(sink_h))). -> (probs, sinks, reason)."""
    sinks = None
    users = consumers(masked)
    cat = users[0] if len(users) == 1 and users[0].op == "Concat" else None
    if cat is not None:
        if cat.attrs.get("axis") not in (-1, 3) or len(cat.inputs) != 2 or cat.inputs[0] is not \
                masked:  # fmt: skip
            return None, None, "the masked scores are concatenated with something"
        sinks = _constant_through(cat.inputs[1])
        if sinks is None:
            return None, None, "the scores are concatenated with a non-constant (not sinks)"
        sinks = np.asarray(sinks, np.float32).reshape(-1)
        x = cat.outputs[0]
        users = consumers(x)
        ops = sorted(u.op for u in users)
        if ops == ["ReduceMax", "Sub"]:  # the max subtraction: softmax is shift-invariant
            rm = next(u for u in users if u.op == "ReduceMax")
            sub = next(u for u in users if u.op == "Sub")
            if sub.inputs[0] is not x or sub.inputs[1] is not rm.outputs[0]:
                return None, None, "the sink logits are shifted by something else than their max"
            masked = sub.outputs[0]
        else:
            masked = x
    sm = only(masked, "Softmax")
    if sm is None:
        nxt = consumers(masked)
        return None, None, f"the masked scores go to {nxt[0].op if nxt else 'nothing'} " \
            "before Softmax"  # fmt: skip
    if sm.attrs.get("axis", -1) not in (-1, 3):
        return None, None, "Softmax is not over the key axis"
    if sinks is None:
        return sm.outputs[0], None, None
    sl = only(sm.outputs[0], "Slice")
    if sl is None:
        return None, None, "the sink column is not sliced off after Softmax"
    ins = list(sl.inputs) + [None] * (5 - len(sl.inputs))
    starts, ends, axes, steps = (
        None if t is None or (isinstance(t, gs.Variable) and not t.name) else const(t)
        for t in ins[1:5]
    )
    flat = lambda c: None if c is None else np.asarray(c).reshape(-1).tolist()  # noqa: E731
    ok = (flat(starts) == [0] and flat(ends) == [-1] and flat(axes) in ([-1], [3])
          and flat(steps) in (None, [1]))  # fmt: skip
    if not ok:
        return None, None, "the Slice after Softmax does not drop exactly the sink column"
    return sl.outputs[0], sinks, None


def parse_site(graph: gs.Graph, cat_k: gs.Node) -> tuple[dict | None, str | None]:
    """-> (the site's tensors and sizes, None) or (None, why GQA does not fit it)."""
    kx, first, why = _through_repeat(cat_k.outputs[0])
    if why:
        return None, why
    if perm(first) != [0, 1, 3, 2]:
        return None, f"keys are read by {first.op}, not Transpose(0,1,3,2) into Q.K^T"
    qk = only(first.outputs[0], "MatMul")
    if qk is None or qk.inputs[1] is not first.outputs[0]:
        return None, "transposed keys are not the right operand of one MatMul"
    q, t, scale = qk.inputs[0], qk.outputs[0], 1.0
    sc = only(t, ("Mul", "Div"))
    if sc is not None:
        other = sc.inputs[1] if sc.inputs[0] is t else sc.inputs[0]
        c = const(other)
        if c is None or c.size != 1 or (sc.op == "Div" and sc.inputs[0] is not t):
            return None, f"the scores are scaled by {other.name}, not one constant"
        scale = float(c.reshape(-1)[0]) if sc.op == "Mul" else 1.0 / float(c.reshape(-1)[0])
        t = sc.outputs[0]
    add = only(t, "Add")
    if add is None:
        nxt = consumers(t)
        return None, f"the scores reach Softmax through {nxt[0].op if nxt else 'nothing'} " \
            "(softcap / sinks / no additive mask)"  # fmt: skip
    mask = add.inputs[1] if add.inputs[0] is t else add.inputs[0]
    probs, sinks, why = _softmax(add.outputs[0])
    if why:
        return None, why
    av = only(probs, "MatMul")
    if av is None or av.inputs[0] is not probs:
        return None, "the probabilities are not the left operand of one MatMul"
    cat_v = _cache_source(graph, av.inputs[1])
    if cat_v is None:
        return None, "values are not a cache Concat (through repeat_kv) of a past input"
    _, vfirst, why = _through_repeat(cat_v.outputs[0])
    if why or vfirst is not av:
        return None, why or "the value cache feeds more than this attention"
    tr = only(av.outputs[0], "Transpose")
    if perm(tr) != [0, 2, 1, 3]:
        return None, "the attention output is not transposed back to [B, S, H, D]"
    k, v = cat_k.inputs[1], cat_v.inputs[1]
    qs, ks, vs, ms = (getattr(x, "shape", None) for x in (q, k, v, mask))
    if not (qs and ks and vs and len(qs) == len(ks) == len(vs) == 4):
        return None, "unknown q/k/v ranks"
    H, D, KV, Dk, Dv = qs[1], qs[3], ks[1], ks[3], vs[3]
    if not all(isinstance(x, int) for x in (H, D, KV, Dk, Dv)):
        return None, "head counts or head dims are not static"
    if Dk != Dv:
        return None, f"key dim {Dk} != value dim {Dv} (MLA): GQA needs one head size"
    if D != Dk or H % KV:
        return None, f"{H} query heads over {KV} KV heads of dims {D}/{Dk}"
    if kx is not cat_k.outputs[0]:  # repeat_kv: [B, KV, 1, T, D] -> [B, KV, H/KV, T, D] -> H
        rs = producer(kx)
        ex = producer(rs.inputs[0])
        if (_dim(ex, 1), _dim(ex, 2), _dim(rs, 1)) != (KV, H // KV, H):
            return None, "the cache is expanded other than repeat_kv's [B, KV, H/KV, T, D]"
    if D % 8:
        return None, f"head dim {D} is not a multiple of 8 (ORT's CPU GroupQueryAttention)"
    if ms is None or len(ms) != 4 or ms[1] not in (1, H) or ms[2] != qs[2] or ms[3] == 1:
        return None, "the mask is not [B|1, 1|H, S, total]"
    if sinks is not None and sinks.size != H:
        return None, f"{sinks.size} attention sinks for {H} heads"
    if q.dtype is not None and np.dtype(q.dtype) not in (np.float32, np.float16):
        return None, f"dtype {q.dtype}"
    site = dict(q=q, k=k, v=v, past_k=cat_k.inputs[0], past_v=cat_v.inputs[0],
                present_k=cat_k.outputs[0], present_v=cat_v.outputs[0], cat_k=cat_k,
                cat_v=cat_v, mask=mask, out=tr.outputs[0], out_node=tr, H=H, KV=KV, D=D,
                scale=scale, sinks=sinks)  # fmt: skip
    return site, None
