"""What every FfnxMoE lowering shares: reading the node, routing, activations, shared experts.

Math (schema `ffnx.plugins.schema.MOE`), on tokens flattened to x [T, D]:
  router:  s = logits [T, E]
    softmax       p = softmax(s);  idx, w = topk(p, k)
    topk_softmax  v, idx = topk(s, k);  w = softmax(v)
    sigmoid       p = sigmoid(s);  idx = topk(p + score_bias, k);  w = p[idx]
                  (softmax takes a score_bias the same way: idx = topk(p + score_bias, k))
    normalize=1   w = w / sum_j w_j;   then  w = w * routed_scaling_factor
    n_group > 1   the top-k above runs over sel (p, s, p + score_bias) with the experts outside
                  the topk_group best groups masked to -inf (`group_mask`); w from unmasked p
  hash:    idx = hash_table[token_ids];  w = routed_scaling_factor / k
  output   y = sum_j w_j * FFN_{idx_j}(x) + shared(x)
  clamped_swiglu (GPT-OSS): g = Min(gate, limit), u = Clip(up, -limit, limit),
           act = g * Sigmoid(alpha * g) * (u + 1), the schema's formula op by op (exact in fp32)
Lowerings compute in float32 (fp16/bf16 models are cast in and out: ORT's CPU kernels for the
ops used here are float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.errors import LoweringError  # re-exported: part of the ffnx error family
from ffnx.graph.builder import Builder, f32, i64
from ffnx.graph.tensors import const
from ffnx.plugins.schema import (
    BASE_ACTIVATION,
    CLAMPED_DEFAULTS,
    CLAMPED_SWIGLU,
    GATED_ACTIVATIONS,
    MOE,
    group_error,
    group_limited,
)


@dataclass
class MoESite:
    """One FfnxMoE node with its attributes (schema defaults filled in) and named inputs."""

    node: gs.Node
    attrs: dict
    inputs: dict[str, gs.Tensor | None]
    E: int
    k: int
    D: int
    H1: int
    H: int
    made: dict = field(default_factory=dict, repr=False, compare=False)

    def constant(self, b: Builder, key: tuple, make, hint: str) -> gs.Constant:
        """One constant per `key` for this site (`make()` its value): the branches of a
        token-count `If` that read the same expert weights share one tensor, which
        `ffnx.graph.export` then stores once."""
        if key not in self.made:
            self.made[key] = b.const(make(), hint)
        return self.made[key]

    @classmethod
    def of(cls, node: gs.Node) -> MoESite:
        attrs = {**MOE.defaults(), **node.attrs}
        names = [p.name for p in MOE.inputs]
        ins = {n: (t if t is not None and t.name else None) for n, t in zip(names, node.inputs)}
        ins.update({n: None for n in names[len(node.inputs) :]})
        fc1, fc2 = ins["fc1_weight"], ins["fc2_weight"]
        shapes = [getattr(t, "shape", None) for t in (fc1, fc2)]
        if any(s is None or len(s) != 3 or not all(isinstance(d, int) for d in s) for s in shapes):
            raise LoweringError(f"{node.name}: expert weights need static 3-D shapes, got {shapes}")
        (E, H1, D), (_, _, H) = shapes
        k = int(attrs["top_k"])
        if attrs["routing_mode"] == "hash" and ins["hash_table"] is not None:
            k = int(ins["hash_table"].shape[1]) if ins["hash_table"].shape else k
        if err := group_error({**attrs, "num_experts": E, "top_k": k}):
            raise LoweringError(f"{node.name}: {err}")
        return cls(node, attrs, ins, E, k, D, H1, H)

    @property
    def activation(self) -> str:
        return str(self.attrs["activation"])

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def dtype(self):
        return self.node.inputs[0].dtype or np.float32

    def value(self, name: str) -> np.ndarray | None:
        """The input's constant value as float32 (int64 for ids), or None (absent or dynamic)."""
        t = self.inputs[name]
        v = None if t is None else const(t)
        if v is None or v.dtype.kind in "iu":
            return v
        return v.astype(np.float32, copy=False)

    def is_const(self, *names: str) -> bool:
        return all(self.inputs[n] is None or self.value(n) is not None for n in names)

    def tensor(self, b: Builder, name: str):
        """The input as a float32 tensor (None when absent)."""
        t = self.inputs[name]
        if t is None:
            return None
        v = self.value(name)
        if v is not None:
            return t if t.dtype == np.float32 and isinstance(t, gs.Constant) else b.const(v, name)
        return t if t.dtype in (None, np.float32) else b.op("Cast", t, to=1)

    def weight_bytes(self) -> int:
        """Bytes of one expert's fc1 + fc2 weights (fp32)."""
        return 4 * (self.H1 * self.D + self.D * self.H)


def activate(b: Builder, h, act: str, axis: int, H: int, attrs: dict | None = None):
    """act(h); gated activations split h along `axis` into [gate; up] halves of width H.
    `attrs`: the node's attributes (clamped_swiglu reads activation_alpha / activation_limit)."""
    if act not in GATED_ACTIVATIONS:
        return plain_act(b, h, act)
    g, u = b.op("Split", h, i64(H, H), axis=axis, n_out=2)
    return gated_act(b, g, u, act, attrs)


def gated_act(b: Builder, g, u, act: str, attrs: dict | None = None):
    """A gated activation of gate g and up u: base(g) * u, or clamped_swiglu (module docstring)."""
    if act == CLAMPED_SWIGLU:
        a = {**CLAMPED_DEFAULTS, **(attrs or {})}
        alpha, limit = float(a["activation_alpha"]), float(a["activation_limit"])
        g = b.op("Min", g, f32(limit))
        u = b.op("Clip", u, f32(-limit), f32(limit))
        return b.mul(b.mul(g, b.op("Sigmoid", b.mul(g, f32(alpha)))), b.add(u, f32(1.0)))
    return b.mul(plain_act(b, g, BASE_ACTIVATION[act]), u)


def plain_act(b: Builder, x, act: str):
    """A non-gated activation of x (relu, silu, gelu)."""
    if act == "relu":
        return b.op("Relu", x)
    if act == "silu":
        return b.mul(x, b.op("Sigmoid", x))
    if act == "gelu":  # erf form: ORT fuses it into one Gelu kernel
        erf = b.op("Erf", b.mul(x, f32(1 / np.sqrt(2.0))))
        return b.mul(b.mul(x, f32(0.5)), b.add(erf, f32(1.0)))
    raise LoweringError(f"unknown activation {act!r}")


def flatten(b: Builder, s: MoESite):
    """hidden [*, D] -> x [T, D] float32."""
    x = b.reshape(s.inputs["hidden"], -1, s.D)
    return x if s.dtype == np.float32 else b.op("Cast", x, to=1)


def router_logits(b: Builder, s: MoESite):
    """The router's logits as [T, E] float32."""
    logits = b.reshape(s.inputs["router_logits"], -1, s.E)
    return logits if s.dtype == np.float32 else b.op("Cast", logits, to=1)


def router_scores(b: Builder, s: MoESite, logits):
    """p [T, E]: the softmax over the experts or each expert's sigmoid (`scoring`)."""
    scoring = s.attrs["scoring"]
    if scoring == "softmax":
        return b.op("Softmax", logits, axis=1)
    if scoring == "sigmoid":
        return b.op("Sigmoid", logits)
    raise LoweringError(f"{s.node.name}: unknown scoring {scoring!r}")


def selection_scores(b: Builder, s: MoESite, logits):
    """-> (p, sel) [T, E]: the scores that weigh (`router_scores`) and those that choose
    (p plus the score_bias, where there is one)."""
    p = router_scores(b, s, logits)
    bias = s.tensor(b, "score_bias")
    return p, (p if bias is None else b.add(p, bias))


def route(b: Builder, s: MoESite):
    """-> idx [T, k] int64, w [T, k] float32 (see the module docstring)."""
    a, k = s.attrs, s.k
    scale = float(a["routed_scaling_factor"])
    if a["routing_mode"] == "hash":
        ids = b.reshape(s.inputs["token_ids"], -1)
        idx = b.op("Gather", s.inputs["hash_table"], ids, axis=0)
        return idx, b.op("Expand", f32(scale / k), b.op("Shape", idx))
    logits = router_logits(b, s)
    scoring, normalize = a["scoring"], int(a["normalize"])
    if group_limited(a):
        idx, w = _group_route(b, s, logits)
        normalize = normalize and scoring != "topk_softmax"
    elif scoring == "topk_softmax":
        v, idx = b.op("TopK", logits, i64(k), axis=1, n_out=2)
        w, normalize = b.op("Softmax", v, axis=1), 0  # already sums to 1
    else:  # softmax or sigmoid: a score_bias moves the choice, not the weights
        p, sel = selection_scores(b, s, logits)
        if sel is p:
            w, idx = b.op("TopK", p, i64(k), axis=1, n_out=2)
        else:
            _, idx = b.op("TopK", sel, i64(k), axis=1, n_out=2)
            w = b.op("GatherElements", p, idx, axis=1)
    if normalize:
        w = b.op("Div", w, b.reduce_sum(w, 1, keepdims=1))
    if scale != 1.0:
        w = b.mul(w, f32(scale))
    return idx, w


def _group_route(b: Builder, s: MoESite, logits):
    """Group-limited routing: -> idx [T, k], w [T, k] (before normalize and scaling)."""
    scoring = s.attrs["scoring"]
    p, sel = (logits, logits) if scoring == "topk_softmax" else selection_scores(b, s, logits)
    _, idx = b.op("TopK", group_mask(b, s, sel), i64(s.k), axis=1, n_out=2)
    w = b.op("GatherElements", p, idx, axis=1)
    return idx, b.op("Softmax", w, axis=1) if scoring == "topk_softmax" else w


def group_mask(b: Builder, s: MoESite, sel):
    """sel [T, E] with the experts outside each token's topk_group best groups set to -inf:
    group scores from TopK(1 or 2) + ReduceSum over [T, n_group, G], the best groups by TopK,
    then OneHot(best, n_group, off = -inf, on = 0) along axis 1 ([T, n_group, topk_group]),
    its max over the chosen ones ([T, n_group, 1]: 0 for a kept group, -inf otherwise) added
    to the scores: x + 0 = x and x + -inf = -inf exactly for finite x (three kernels where a
    compare, cast, sum and select took seven)."""
    a = s.attrs
    n, tg = int(a["n_group"]), int(a["topk_group"])
    g = b.reshape(sel, -1, n, s.E // n)
    top, _ = b.op("TopK", g, i64(2 if a["group_scoring"] == "top2_sum" else 1), axis=2, n_out=2)
    _, best = b.op("TopK", b.reduce_sum(top, 2), i64(tg), axis=1, n_out=2)  # [T, tg]
    values = np.array([-np.inf, 0.0], np.float32)
    hot = b.op("OneHot", best, i64(n).reshape(()), values, axis=1)  # [T, n, tg]
    keep = b.op("ReduceMax", hot, i64(2), keepdims=1)  # [T, n, 1]
    return b.reshape(b.add(g, keep), -1, s.E)


def dense_ffn(b: Builder, x, w1, w2, act: str, H: int, attrs: dict | None = None):
    """act(x @ w1.T) @ w2.T for x [T, D], w1 [H1, D], w2 [D, H] (shared experts)."""
    h = activate(b, b.op("Gemm", x, w1, transB=1), act, axis=1, H=H, attrs=attrs)
    return b.op("Gemm", h, w2, transB=1)


def shared(b: Builder, s: MoESite, x):
    """shared(x) [T, D] or None: dense FFN of the shared experts, times sigmoid(x @ gate.T)."""
    w1 = s.tensor(b, "shared_fc1_weight")
    if w1 is None:
        return None
    shape = s.inputs["shared_fc2_weight"].shape
    if not shape or not isinstance(shape[-1], int):
        raise LoweringError(f"{s.node.name}: shared_fc2_weight needs a static shape")
    w2 = s.tensor(b, "shared_fc2_weight")
    y = dense_ffn(b, x, w1, w2, s.activation, H=shape[-1], attrs=s.attrs)
    gate = s.tensor(b, "shared_gate_weight")
    if gate is not None:
        y = b.mul(y, b.op("Sigmoid", b.op("Gemm", x, gate, transB=1)))
    return y


def finish(b: Builder, s: MoESite, y) -> None:
    """Route y [T, D] into the ffnx node's output (original shape and dtype); detach the node."""
    if s.dtype != np.float32:
        y = b.op("Cast", y, to=int(_onnx_dtype(s.dtype)))
    out = s.node.outputs[0]
    node = gs.Node(
        "Reshape",
        name=b.name("output"),
        inputs=[y, b.op("Shape", s.inputs["hidden"])],
        outputs=[out],
    )
    s.node.outputs.clear()
    s.node.inputs.clear()
    b.graph.nodes.append(node)


def _onnx_dtype(dtype) -> int:
    from onnx.helper import np_dtype_to_tensor_dtype

    return np_dtype_to_tensor_dtype(np.dtype(dtype))
