"""ONNX Runtime lowerings of `ffnx::FfnxSparseFFN` (schema `ffnx.plugins.schema.SPARSE_FFN`).

Math, on tokens flattened to x [T, D] (W_up, W_gate [H, D]; W_down [D, H]):
  gated:      a = act(x W_gate^T)          non-gated:  a = act(x W_up^T + b_up)
  threshold:  m = |a| > thresholds          topk:       m = |a| >= k-th largest |a| of the token
  gated:      y = (m a (x W_up^T)) W_down^T + b_down
  non-gated:  y = (m a) W_down^T + b_down
(topk keeps more than k channels only when |a| ties at the k-th value.)

Forms, by name (`FORMS`); every one computes the math above, they differ in what they read:
  dense     all H channels, a zeroed where the mask is off. Reads every weight. The plain
            decomposition verification runs, and the fastest form at low sparsity.
  gather    kept channels only: u = any_t m[t] (their union over the T tokens, as
            max_t margin passing the test), idx = Compress(arange(H), u), Gather rows idx of
            W_down^T [H, D] (stored transposed so each row is contiguous) and, gated, of
            W_up [H, D]; then GEMMs on k = |idx| rows, the per-token mask applied on [T, k].
            The gate (gated) or up (non-gated) projection stays dense: the mask depends on it.
  compress  as gather, with Compress(W, u) in place of Gather(W, idx).
Cost at batch 1 (benchmarks/sparsity.py): the dense gate GEMV plus two row gathers. Gathered rows
come from DRAM in 4 KB pieces at ~6 GB/s on the development machine against ~16-24 GB/s
streaming, so a gated FFN at 90 % sparsity runs ~2x dense there (bound 3 / (1 + 0.2 * 16/6)),
a non-gated one ~1.5x (its up projection is dense too: bound 1 / (0.5 + 0.05) = 1.8x).
Lowerings compute in float32 (other float dtypes are cast in and out).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.errors import LoweringError
from ffnx.graph.builder import Builder, f32, i64
from ffnx.graph.export import export_model
from ffnx.graph.opsets import set_opsets
from ffnx.graph.tensors import const
from ffnx.plugins.schema import (
    BASE_ACTIVATION,
    DOMAIN,
    DOMAIN_VERSION,
    GATED_ACTIVATIONS,
    SPARSE_FFN,
)

FORMS = ("dense", "gather", "compress")
PLAIN = "dense"


class SparseLoweringError(LoweringError):
    """An FfnxSparseFFN node cannot be lowered (names the node and the reason)."""


def lower_sparse_ffn_nodes(model: onnx.ModelProto, variant: str | None = None) -> onnx.ModelProto:
    """The model with every FfnxSparseFFN node replaced by the `variant` form (default dense)."""
    graph = gs.import_onnx(model)
    nodes = [n for n in graph.nodes if n.domain == DOMAIN and n.op == SPARSE_FFN.op_type]
    if not nodes:
        return model
    for node in nodes:
        lower_sparse_ffn(graph, node, variant or PLAIN)
    graph.cleanup().toposort()
    out = export_model(graph)
    out.ir_version = model.ir_version
    return set_opsets(out, model.opset_import)


def lower_sparse_ffn(graph: gs.Graph, node: gs.Node, variant: str = PLAIN) -> str:
    """Replace one FfnxSparseFFN node in `graph` by the `variant` form; returns the variant."""
    if variant not in FORMS:
        raise SparseLoweringError(f"{node.name}: unknown form {variant!r}; known: {FORMS}")
    attrs = {**SPARSE_FFN.defaults(), **node.attrs}
    ins = dict(zip([p.name for p in SPARSE_FFN.inputs], node.inputs))
    ins = {k: v for k, v in ins.items() if v is not None and v.name}
    act = str(attrs["activation"])
    gated = act in GATED_ACTIVATIONS
    if gated and "w_gate" not in ins:
        raise SparseLoweringError(f"{node.name}: gated activation {act} needs w_gate")
    w_down = _value(ins["w_down"], node)
    D, H = w_down.shape
    b = Builder(graph, f"{node.name}/{variant}")
    hidden = ins["hidden"]
    x = b.reshape(hidden, -1, D)
    dtype = hidden.dtype or np.float32
    if dtype != np.float32:
        x = b.op("Cast", x, to=onnx.TensorProto.FLOAT)
    w_up = _value(ins["w_up"], node)
    if gated:
        a = activation(b, b.matmul(x, b.const(_value(ins["w_gate"], node).T, "w_gate_t")), act)
    else:
        pre = b.matmul(x, b.const(w_up.T, "w_up_t"))
        if "b_up" in ins:
            pre = b.add(pre, b.const(_value(ins["b_up"], node), "b_up"))
        a = activation(b, pre, act)
    margin, keeps = _margin(b, a, attrs, ins, node, H)
    w_down_t = np.ascontiguousarray(w_down.T)  # [H, D]: row c is channel c's output vector
    if variant == "dense":
        am = b.op("Where", keeps(margin), a, f32(0.0))
        if gated:
            am = b.mul(am, b.matmul(x, b.const(w_up.T, "w_up_t")))
        y = b.matmul(am, b.const(w_down_t, "w_down_t"))
    else:
        # Channels kept by any token: max_t margin passes the test. Everything after reads
        # only those k channels; per-token masking then acts on [T, k] tensors.
        union = keeps(b.op("ReduceMax", margin, i64(0), keepdims=0))
        pick = _picker(b, union, H, variant)
        ak = b.op("Where", keeps(pick(margin, 1)), pick(a, 1), f32(0.0))
        if gated:
            ak = b.mul(ak, b.op("Gemm", x, pick(b.const(w_up, "w_up"), 0), transB=1))
        y = b.matmul(ak, pick(b.const(w_down_t, "w_down_t"), 0))
    if "b_down" in ins:
        y = b.add(y, b.const(_value(ins["b_down"], node), "b_down"))
    _finish(b, node, y, hidden, dtype)
    return variant


def activation(b: Builder, h, act: str):
    """The (gate) activation of `act`: relu, silu or erf-GELU (which ORT fuses into one op)."""
    base = BASE_ACTIVATION.get(act, act)
    if base == "relu":
        return b.op("Relu", h)
    if base == "silu":
        return b.mul(h, b.op("Sigmoid", h))
    if base == "gelu":
        erf = b.op("Erf", b.mul(h, f32(1 / np.sqrt(2.0))))
        return b.mul(b.mul(h, f32(0.5)), b.add(erf, f32(1.0)))
    raise SparseLoweringError(f"unknown activation {act!r}")


def _margin(b: Builder, a, attrs: dict, ins: dict, node: gs.Node, H: int):
    """(margin, keeps): margin [T, H] = |a| - per-channel threshold (threshold mode) or - the
    token's k-th largest |a| (topk mode); keeps(t) is the bool test of a margin (> 0, resp. >= 0)
    (see the module docstring)."""
    mag = b.op("Abs", a)
    if attrs["mode"] == "threshold":
        thr = ins.get("thresholds")
        if thr is None:
            raise SparseLoweringError(f"{node.name}: mode 'threshold' needs thresholds")
        v = const(thr)  # a graph input is allowed too (benchmarks sweep it)
        margin = b.op("Sub", mag, thr if v is None else b.const(v.astype(np.float32), "thr"))
        return margin, lambda t: b.op("Greater", t, f32(0.0))
    if attrs["mode"] == "topk":
        k = min(int(attrs["k"]), H)
        if k <= 0:
            raise SparseLoweringError(f"{node.name}: mode 'topk' needs k >= 1, got {k}")
        vals, _ = b.op("TopK", mag, i64(k), axis=1, n_out=2)
        kth = b.op("Slice", vals, i64(k - 1), i64(k), i64(1))
        return b.op("Sub", mag, kth), lambda t: b.op("GreaterOrEqual", t, f32(0.0))
    raise SparseLoweringError(f"{node.name}: unknown mode {attrs['mode']!r}")


def _picker(b: Builder, keep, H: int, variant: str):
    """`pick(t, axis)`: t restricted along `axis` to the channels where `keep` [H] is true."""
    if variant == "compress":
        return lambda t, axis: b.op("Compress", t, keep, axis=axis)
    idx = b.op("Compress", b.const(np.arange(H, dtype=np.int64), "channels"), keep, axis=0)
    return lambda t, axis: b.op("Gather", t, idx, axis=axis)


def _value(t: gs.Tensor, node: gs.Node) -> np.ndarray:
    v = const(t)
    if v is None:
        raise SparseLoweringError(f"{node.name}: input {t.name} must be a constant initializer")
    return v.astype(np.float32)


def _finish(b: Builder, node: gs.Node, y, hidden: gs.Tensor, dtype) -> None:
    """Route y [T, D] into the node's output (original shape and dtype); detach the node."""
    if dtype != np.float32:
        y = b.op("Cast", y, to=int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))))
    out = node.outputs[0]
    shape = b.op("Shape", hidden)
    b.graph.nodes.append(gs.Node("Reshape", b.name("output"), inputs=[y, shape], outputs=[out]))
    node.outputs.clear()
    node.inputs.clear()


def sparse_ffn_node(
    hidden: gs.Tensor,
    output: gs.Tensor,
    weights: dict[str, np.ndarray | gs.Tensor],
    name: str,
    **attrs,
) -> gs.Node:
    """One FfnxSparseFFN node; `weights` by schema input name (arrays become constants; absent
    optional inputs are omitted)."""
    ins: list[gs.Tensor] = [hidden]
    for port in SPARSE_FFN.inputs[1:]:
        v = weights.get(port.name)
        if v is None:
            v = gs.Variable.empty()
        elif not isinstance(v, gs.Tensor):
            v = gs.Constant(f"{name}/{port.name}", np.ascontiguousarray(v))
        ins.append(v)
    while not ins[-1].name:
        ins.pop()
    attrs = {**{a.name: a.default for a in SPARSE_FFN.attributes}, **attrs}
    return gs.Node(SPARSE_FFN.op_type, name, attrs, ins, [output], domain=DOMAIN)


def sparse_ffn_model(
    weights: dict[str, np.ndarray], lead: tuple = ("T",), opset: int = 18, **attrs
) -> onnx.ModelProto:
    """A one-node model `hidden [*lead, D] -> output [*lead, D]` (tests and benchmarks)."""
    D = weights["w_down"].shape[0]
    x = gs.Variable("hidden", np.float32, [*lead, D])
    y = gs.Variable("output", np.float32, [*lead, D])
    node = sparse_ffn_node(x, y, weights, "sparse_ffn", **attrs)
    model = gs.export_onnx(gs.Graph([node], [x], [y], opset=opset))
    del model.opset_import[:]
    model.opset_import.extend(
        [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    )
    return model


# The schema's math in numpy: the reference tests and the sparsify pass compare against.


def erf(x: np.ndarray) -> np.ndarray:
    """Element-wise math.erf (numpy has no erf; references run on small arrays)."""
    from math import erf as _erf

    return np.vectorize(_erf, otypes=[np.float64])(x)


def act_numpy(h: np.ndarray, act: str) -> np.ndarray:
    base = BASE_ACTIVATION.get(act, act)
    if base == "relu":
        return np.maximum(h, 0)
    if base == "silu":
        return h / (1 + np.exp(-h))
    if base == "gelu":
        return 0.5 * h * (1 + erf(h / np.sqrt(2.0)))
    raise SparseLoweringError(f"unknown activation {act!r}")
