"""group_query_attention: a KV-cache decoder's attention -> one com.microsoft::GroupQueryAttention.

Pattern (per layer, as `ffnx export hf:DIR` writes it from transformers' eager attention):

    K = Concat(past_key, k, axis=2)  -> graph output present.N.key    [B, KV, P+S, D]
    V = Concat(past_value, v, axis=2) -> graph output present.N.value [B, KV, P+S, D]
    A = Softmax(scale * (q @ Transpose(rep(K), [0,1,3,2])) + M)       [B, H, S, P+S]
    O = Transpose(A @ rep(V), [0,2,1,3])                               [B, S, H, D]

with q, k, v in [B, heads, S, D] (rotary and Qwen3's q/k-norm already applied), rep the
repeat_kv of transformers (Unsqueeze(2) -> Expand -> Reshape: query head h reads KV head
h // (H/KV)), or absent when KV == H, and M the model's additive mask [B|1, 1|H, S, P+S]
(0 or -3.4e38: causal, padding, sliding window, exactly transformers' own mask).

Rewrite: GroupQueryAttention(query=[B,S,H*D], key, value [B,S,KV*D], past_key, past_value,
seqlens_k = (P+S) - 1 for every row, total_sequence_length = P+S, attention_bias = M,
query_seqlens = S for every row; num_heads=H, kv_num_heads=KV, scale) writing O (reshaped back
to [B,S,H,D]) and the two presents, which stay the graph outputs: the input/output interface of
the artifact is unchanged. Where q, k and v are the three outputs of one last-axis Split of a
fused QKV projection P [B,S,(H+2KV)*D] (fuse_sibling_linears; Reshapes that keep the shape
looked through), GQA reads P whole as its packed query, key and value empty: GQA splits it in
the same q|k|v order, so the same values with no Split kernel (Llama, Mistral, GPT-OSS; not
Qwen3, whose q/k norms sit between the Split and GQA). P+S is read from M's last axis, so
nothing new is fed. GQA computes
O[b,s,h] = sum_j softmax_j(scale * q[b,h,s].K[b,h//(H/KV),j] + M[b,s,j] + C[s,j]) V[...,j] with
its own causal mask C (key j <= P + s), which M already contains; all rows have seqlens_k + 1 =
P+S keys in the padded cache layout, so left padding is the mask's business, as in transformers.

Exactness: fp32 reordering of the same sums on every query row that has at least one unmasked
key. A row whose keys are all masked (a left-padding position of the prompt) gets the uniform
average of the causal keys instead of transformers' uniform average of all keys; neither is
read (generation reads the last real position, and a masked key gets weight exp(-3.4e38) = 0 in
every other row). Conditions, each a reason when it fails: the caches are Concats of graph
inputs that feed only this attention; the scores are Q.K^T times a constant plus a rank-4 mask
straight into Softmax (softcapping and ALiBi-in-the-graph do not match; GPT-OSS's attention
sinks, Concat([scores, sink_h]) -> Softmax -> drop the sink column, become GQA's head_sink, the
same p_j = exp(x_j) / (sum_i exp(x_i) + exp(sink_h)), when the sinks are constants); key and
value head dims equal (MLA: not) and a multiple of 8 (the CPU kernel's condition); H % KV == 0.
Rotary: when q and k are the `rotary_embedding` pass's RotaryEmbedding nodes, GQA rotates them
itself (do_rotary, rotary fused), fed the graph's position_ids and cos/sin tables of every
position up to the decoder's maximum length (`options["max_length"]`), tabulated from the
graph's own cos/sin (ffnx.passes.gqa_rotary states the math and checks the condition: cos/sin
an elementwise function of position_ids). ORT's GQA reads position_ids per row for prompts
and decode steps, so left-padded rows rotate as transformers rotates them. Otherwise (no
maximum length, a rope that is not per position) the RotaryEmbedding nodes stay before GQA.

Cache buffer: when every past input is read only by these nodes (and by Shape nodes, which are
rewired to read past = total - seq from attention_mask and input_ids), the graph also runs with
past and present bound to one preallocated [B, KV, max, D] buffer (GQA's past_present_share_
buffer: the step writes its S new rows in place, nothing is copied). The runtime does that when
the model's lowering records (metadata `ffnx.lowerings`) say `kv_buffer=shared`
(ffnx.runtime.generate).

Which form an artifact gets is measured (ffnx.passes.gqa_choice): the standard-ops graph, GQA
with Concat-style caches and GQA with the shared buffer, one decode step timed at the options'
threads; the standard graph is kept (byte-unchanged) unless GQA is faster. Target: ORT only.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph import lowering_meta
from ffnx.graph.attention_match import consumers, is_key_cache, only, parse_site, perm
from ffnx.graph.builder import Builder, i64
from ffnx.graph.ffn_match import last_axis, split_sizes
from ffnx.graph.opsets import MS_DOMAIN
from ffnx.graph.tensors import known_shape, producer
from ffnx.passes import gqa_mask, gqa_rotary
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult


def _heads_last(b: Builder, x: gs.Tensor, width: int) -> gs.Tensor:
    """[B, heads, S, D] -> [B, S, heads*D]; where x is itself Transpose(0,2,1,3) of a split
    [B, S, heads, D] (the values: no rotary), the tensor before it, so nothing is copied."""
    tr = producer(x, "Transpose")
    if perm(tr) == [0, 2, 1, 3]:
        y = tr.inputs[0]
        rs = producer(y, "Reshape")
        z = rs.inputs[0] if rs is not None else None
        zs, ys = getattr(z, "shape", None), getattr(y, "shape", None)
        if zs and ys and len(zs) == 3 and zs[2] == width and list(zs[:2]) == list(ys[:2]):
            return z  # the projection's own [B, S, heads*D] output
        return b.op("Reshape", y, i64(0, 0, width))
    return b.op("Reshape", b.op("Transpose", x, perm=[0, 2, 1, 3]), i64(0, 0, width))


def _flat_reader(t: gs.Tensor, width: int) -> gs.Tensor | None:
    """The output of the one Reshape reading `t` [B, S, H, D] into [B, S, H*D], if that is all
    that reads it (the attention module's own reshape before o_proj)."""
    rs = only(t, "Reshape")
    out = rs.outputs[0] if rs is not None else None
    shape = getattr(out, "shape", None)
    return out if shape is not None and len(shape) == 3 and shape[2] == width else None


def _before_reshapes(t: gs.Tensor) -> gs.Tensor:
    """The earliest tensor of the Reshape chain ending in `t` whose shape is t's own (known,
    symbolic dims by name): Reshape keeps element order, so it holds t's values."""
    shape, best, cur = known_shape(t), t, t
    while shape is not None and (r := producer(cur, "Reshape")) is not None:
        cur = r.inputs[0]
        if known_shape(cur) == shape:
            best = cur
    return best


def _packed_qkv(q3: gs.Tensor, k3: gs.Tensor, v3: gs.Tensor, qw: int, kw: int):
    """P when q3, k3, v3 [B, S, .] are (through same-shape Reshapes) the three outputs, in that
    order, of a last-axis Split of P [B, S, qw + 2 kw] into [qw, kw, kw] (a fused QKV
    projection): GQA's packed query input, which it splits in the same order. Else None."""
    q, k, v = (_before_reshapes(t) for t in (q3, k3, v3))
    sp = producer(q, "Split")
    if sp is None or [id(o) for o in sp.outputs] != [id(q), id(k), id(v)]:
        return None
    if len(sp.inputs[0].shape or []) != 3 or not last_axis(sp.attrs.get("axis", 0), sp.inputs[0]):
        return None
    return sp.inputs[0] if split_sizes(sp) == [qw, kw, kw] else None


def _sink_input(b: Builder, s: dict):
    sinks = s.get("sinks")
    return None if sinks is None else b.const(sinks.astype(np.dtype(s["q"].dtype or np.float32)),
                                               "head_sink")  # fmt: skip


def _fused_rotary(graph: gs.Graph, q3: gs.Tensor, k3: gs.Tensor, max_len, shared: dict):
    """-> (q before rotary, k before rotary, cos_cache, sin_cache, position_ids) when both are
    the rotary_embedding pass's RotaryEmbedding of one cos/sin pair and its tables are exact
    (ffnx.passes.gqa_rotary), else None (the reason kept in shared["rotary_why"])."""
    rq, rk = gqa_rotary.rotary_of(q3), gqa_rotary.rotary_of(k3)
    if rq is None or rk is None:
        shared.setdefault("rotary_why", "q/k do not come from one RotaryEmbedding each")
        return None
    if [t.name for t in rq.inputs[2:]] != [t.name for t in rk.inputs[2:]]:
        shared.setdefault("rotary_why", "q and k rotate with different cos/sin")
        return None
    tabs = gqa_rotary.tables(graph, rq, max_len, shared.setdefault("rotary_tables", {}))
    if isinstance(tabs, str):
        shared.setdefault("rotary_why", tabs)
        return None
    consts = shared.setdefault("rotary_consts", {})
    key = rq.inputs[2].name
    if key not in consts:
        b = Builder(graph, "group_query_attention/rotary")
        consts[key] = (b.const(tabs[0], "cos_cache"), b.const(tabs[1], "sin_cache"))
    pos = next(t for t in graph.inputs if t.name == "position_ids")
    return rq.inputs[0], rk.inputs[0], *consts[key], pos


def _bias(graph: gs.Graph, b: Builder, mask: gs.Tensor, max_len, shared: dict, seq: gs.Tensor):
    """-> (GQA's attention_bias, total length [1] int64): the padding-only bias where the
    model's mask adds nothing inside GQA's causal region (ffnx.passes.gqa_mask), else the mask
    itself (the reason kept in shared["mask_why"]); `seq`: S, [1] int64."""
    value = gqa_mask.check(graph, mask, max_len)
    if isinstance(value, str):
        shared.setdefault("mask_why", value)
        return mask, b.op("Shape", mask, start=3, end=4)  # [1] int64: P + S
    shared["mask_replaced"] = shared.get("mask_replaced", 0) + 1
    am = next(t for t in graph.inputs if t.name == "attention_mask")
    return gqa_mask.padding_bias(graph, value, seq), b.op("Shape", am, start=1, end=2)


def rewrite_site(graph: gs.Graph, s: dict, shared: dict, max_len: int | None = None) -> gs.Node:
    """Replace one matched attention by a GroupQueryAttention node (see the module docstring);
    `shared` caches the length tensors built once per mask tensor and the rotary tables;
    `max_len` (the decoder's maximum length) sizes the tables of a fused rotary."""
    b = Builder(graph, f"{s['cat_k'].name}/gqa")
    H, KV, D = s["H"], s["KV"], s["D"]
    q3, k3 = _heads_last(b, s["q"], H * D), _heads_last(b, s["k"], KV * D)
    rotary = _fused_rotary(graph, q3, k3, max_len, shared)
    cos = sin = pos = None
    if rotary is not None:
        q3, k3, cos, sin, pos = rotary
        shared["rotary_fused"] = shared.get("rotary_fused", 0) + 1
    v3 = _heads_last(b, s["v"], KV * D)
    packed = _packed_qkv(q3, k3, v3, H * D, KV * D)
    if packed is not None:  # one fused QKV projection: GQA reads it whole, no Split
        q3, k3, v3 = packed, None, None
        shared["qkv_packed"] = shared.get("qkv_packed", 0) + 1
    key = s["mask"].name
    if key not in shared:  # B and S of the step: from input_ids, so no layer's q is kept for it
        ids = next((t for t in graph.inputs if t.name == "input_ids"), q3)
        batch = b.op("Shape", ids, start=0, end=1)
        seq = b.op("Shape", ids, start=1, end=2)
        bias, total = _bias(graph, b, s["mask"], max_len, shared, seq)
        seqlens = b.op("Expand", b.op("Cast", b.op("Sub", total, i64(1)), to=6), batch)
        qlens = b.op("Expand", b.op("Cast", seq, to=6), batch)
        total32 = b.op("Reshape", b.op("Cast", total, to=6), i64())
        shared[key] = (seqlens, total32, qlens, bias)
    seqlens, total32, qlens, bias = shared[key]
    flat = _flat_reader(s["out"], H * D)
    out3 = flat if flat is not None else gs.Variable(b.name("gqa_out"), dtype=s["q"].dtype)
    for cat in (s["cat_k"], s["cat_v"]):  # the presents are written by GQA now
        cat.outputs.clear()
        cat.inputs.clear()
    attrs = dict(num_heads=H, kv_num_heads=KV, scale=float(s["scale"]))
    if rotary is not None:
        attrs["do_rotary"] = 1
    b.op("GroupQueryAttention", q3, k3, v3, s["past_k"], s["past_v"], seqlens, total32, cos,
         sin, pos, bias, _sink_input(b, s), None, None, None, None, qlens,
         outputs=[out3, s["present_k"], s["present_v"]], domain=MS_DOMAIN, **attrs)  # fmt: skip
    s["out_node"].outputs.clear()
    if flat is not None:  # GQA writes the [B, S, H*D] tensor o_proj reads
        flat.inputs[0].outputs.clear()
    else:
        b.op("Reshape", out3, i64(0, 0, H, D), outputs=[s["out"]])
    return graph.nodes[-2]


def share_buffer(graph: gs.Graph, pasts: list[gs.Tensor], kv_dims: dict) -> str | None:
    """Rewire every Shape of a past input to `total - seq` from attention_mask / input_ids, so
    the pasts may be max-length buffers shared with the presents. -> reason when not possible
    (the graph is left as it is then)."""
    names = {t.name: t for t in graph.inputs}
    if "attention_mask" not in names or "input_ids" not in names:
        return "no attention_mask / input_ids inputs to take the past length from"
    shapes = []
    for p in pasts:
        for u in consumers(p):
            if u.op == "Shape":
                shapes.append((p, u))
            elif u.op != "GroupQueryAttention":
                return f"{p.name} is also read by {u.op} {u.name}"
    if not shapes:
        return None
    b = Builder(graph, "group_query_attention/past_len")
    ids, mask = names["input_ids"], names["attention_mask"]
    past = b.op("Sub", b.op("Shape", mask, start=1, end=2), b.op("Shape", ids, start=1, end=2))
    full = {}
    for p, u in shapes:
        if p.name not in full:
            kv, d = kv_dims[p.name]
            full[p.name] = b.op("Concat", b.op("Shape", ids, start=0, end=1), i64(kv), past,
                                i64(d), axis=0)  # fmt: skip
        start, end = int(u.attrs.get("start", 0)), u.attrs.get("end")
        out = u.outputs[0]
        u.outputs.clear()
        b.op("Slice", full[p.name], i64(start), i64(4 if end is None else int(end)), i64(0),
             outputs=[out])  # fmt: skip
    return None


class GroupQueryAttentionPass(GraphPass):
    """Decoder attention with a KV cache -> com.microsoft::GroupQueryAttention (measured)."""

    name = "group_query_attention"
    targets = ("ort",)

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match([n]) for n in graph.nodes if is_key_cache(n, graph)]

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        if "site" in m.info:  # parsed on the graph before any rewrite (prepare)
            return None
        site, why = parse_site(graph, m.nodes[0])
        if site is not None:
            m.info["site"] = site
        return why

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> dict:
        """Parse every site on the graph as it is, then choose the form for all of them
        (`gqa_choice`: measured on a copy); "standard" skips every site."""
        from ffnx.passes import gqa_choice

        ok = [m for m in matches if self.check(graph, m) is None]
        if not ok:
            return {}
        max_len = ctx.options.get("max_length")
        choice = gqa_choice.choose(graph, ctx.options, partial(gqa_form, max_len=max_len))
        shared, kv_dims = {}, {}
        for m in ok:
            m.info.update(shared=shared, kv_dims=kv_dims, max_len=max_len)
        state = {"choice": choice, "kv_dims": kv_dims, "shared": shared}
        return {**state, "refuse": choice.why} if choice.form == "standard" else state

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        s = m.info["site"]
        rewrite_site(graph, s, m.info["shared"], m.info["max_len"])
        m.info["kv_dims"][s["past_k"].name] = m.info["kv_dims"][s["past_v"].name] = (
            s["KV"],
            s["D"],
        )

    def finish(self, graph, ctx: PassContext, res: PassResult, matches, state) -> None:
        if not state:
            return
        choice = state["choice"]
        res.notes = choice.notes()
        if res.applied == 0:
            return
        shared_why = finish_form(graph, state["kv_dims"])
        kv = "shared" if choice.form == "gqa_shared" and shared_why is None else "concat"
        res.notes["kv_buffer"] = kv
        res.notes.update(_site_notes(state["shared"], res.applied))
        fused = state["shared"].get("rotary_fused", 0)
        if choice.form == "gqa_shared" and shared_why:
            res.notes["kv_buffer_why"] = shared_why
        for m in matches:  # the runtime binds one shared buffer when these say kv_buffer=shared
            if "kv_dims" in m.info:  # the sites prepare parsed (all rewritten)
                layer = m.nodes[0].name if m.nodes else m.describe()
                form = f"{choice.form} kv_buffer={kv}" + (" rotary=fused" if fused else "")
                lowering_meta.record(graph, self.name, layer, form, choice.why)


def _site_notes(shared: dict, applied: int) -> dict:
    """The pass notes on the rotary and the mask of the rewritten sites."""
    fused, masks = shared.get("rotary_fused", 0), shared.get("mask_replaced", 0)
    notes = {"rotary": "fused (do_rotary)" if fused == applied else
             shared.get("rotary_why", "not fused")}  # fmt: skip
    notes["mask"] = f"padding only, {masks} mask(s)" if masks else shared.get("mask_why", "")
    notes["qkv"] = f"packed, {shared['qkv_packed']} layer(s)" if shared.get("qkv_packed") else \
        "separate"  # fmt: skip
    if masks and "mask_why" in shared:  # some masks kept (sliding-window layers)
        notes["mask_kept_why"] = shared["mask_why"]
    return notes


def finish_form(graph: gs.Graph, kv_dims: dict) -> str | None:
    """After the sites are rewritten: the com.microsoft import and the shareable pasts.
    -> why the pasts cannot share a buffer, or None."""
    from onnx import helper

    domains = list(graph.import_domains or [])
    if not any(d.domain == MS_DOMAIN for d in domains):
        domains.append(helper.make_opsetid(MS_DOMAIN, 1))
    graph.import_domains = domains
    pasts = [t for t in graph.inputs if t.name in kv_dims]
    return share_buffer(graph, pasts, kv_dims)


def gqa_form(graph: gs.Graph, sites: list[dict] | None = None,
             max_len: int | None = None) -> tuple[dict, str | None]:  # fmt: skip
    """Rewrite every site (parsed here when not given) in place, then make the pasts shareable.
    -> ({past input: (kv_heads, head_dim)}, why the pasts cannot share a buffer or None)."""

    if sites is None:
        sites = []
        for n in list(graph.nodes):
            site = parse_site(graph, n)[0] if is_key_cache(n, graph) else None
            if site is not None:
                sites.append(site)
    shared: dict = {}
    kv_dims = {}
    for s in sites:
        rewrite_site(graph, s, shared, max_len)
        kv_dims[s["past_k"].name] = kv_dims[s["past_v"].name] = (s["KV"], s["D"])
    return kv_dims, finish_form(graph, kv_dims)


PASS = GroupQueryAttentionPass()
