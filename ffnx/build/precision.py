"""fp16 graph conversion for strongly typed TensorRT (11.x builds only strongly typed networks).

TensorRT 11 takes each layer's precision from its ONNX tensor types, so "build in fp16" means
"give TensorRT an fp16 graph". `convert_to_fp16` rewrites float32 tensors to float16 except
where fp16 is numerically fragile:

- KEEP_FP32_OPS (normalizations, softmax, reductions, and the elementwise ops of decomposed
  norms/softmax: Pow, Sqrt, Reciprocal, Exp, Log) compute in fp32: their float inputs are cast
  up and their outputs stay fp32. Their sums and x^2 overflow fp16 (max 65504) long before the
  surrounding matmuls lose accuracy.
- ffnx plugin ports whose schema dtype is float32 only (score_bias, thresholds) stay fp32.
- The ops that carry the FLOPs (HALF_OPS: MatMul, Gemm, Conv, Einsum, ..., and the ffnx plugins)
  compute in fp16. Every other op follows its inputs: it stays fp32 when all its computed
  (non-constant) float inputs are fp32, so values coming out of a kept op (a variance, a
  softmax) are not squeezed into fp16 by the Add/Div that finishes the norm, and no cast is
  inserted just to move data; with any fp16 input it runs in fp16.
- Graph inputs and outputs keep their types (keep_io_types): a Cast sits at each boundary, so
  the manifest's I/O dtypes stay true and feeds need no change.
- Control-flow nodes (If/Loop/Scan) and tensors their bodies read from the outer scope stay fp32.

Initializers and Constant values are converted where an fp16 consumer needs them (not cast at
run time), clipped to the fp16 range. TensorRT 10.x
does not need this: there `BuilderFlag.FP16` lets the builder choose per layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ffnx.build.trt_graph_check import elem_types, is_ffnx
from ffnx.plugins import schema

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

KEEP_FP32_OPS = frozenset(
    {
        "LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization",
        "MeanVarianceNormalization", "LpNormalization", "Softmax", "LogSoftmax",
        "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
        "ReduceLogSumExp", "ReduceProd", "ReduceMax", "ReduceMin", "CumSum",
        "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
        "QuantizeLinear", "DequantizeLinear", "Resize", "Range",
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
        "If", "Loop", "Scan",
    }
)  # fmt: skip
HALF_OPS = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "LSTM", "GRU", "RNN"}
)
SHAPE_OPS = frozenset({"Shape", "Size"})


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names that subgraph bodies read from an enclosing scope."""
    names: set[str] = set()

    def scan(g: onnx.GraphProto, bound: set[str]) -> None:
        bound = bound | {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            names.update(i for i in n.input if i and i not in bound)
            bound |= set(n.output)
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    scan(sub, bound)

    for n in graph.node:
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                scan(sub, set())
    return names


def _to_half(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)
    return numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), name)


class _Converter:
    def __init__(self, model: onnx.ModelProto, keep_ops: frozenset[str]):
        self.g = model.graph
        self.keep_ops = keep_ops
        self.orig = elem_types(model)
        self.inits = {t.name: t for t in self.g.initializer}  # plus float Constant values
        self.cur = dict(self.orig)  # tensor -> dtype in the converted graph
        self.nodes: list[onnx.NodeProto] = []
        self.cache: dict[tuple[str, int], str] = {}
        self.taken = set(self.orig) | {o for n in self.g.node for o in n.output}
        self.pinned = _outer_names(self.g)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def is_float(self, name: str) -> bool:
        return bool(name) and self.cur.get(name) in (FLOAT, HALF)

    def as_dtype(self, name: str, want: int) -> str:
        """`name` in dtype `want`: a converted initializer copy or a Cast (one per tensor)."""
        if not self.is_float(name) or self.cur[name] == want:
            return name
        key = (name, want)
        if key not in self.cache:
            new = self.fresh(f"{name}_{'fp16' if want == HALF else 'fp32'}")
            if name in self.inits and want == HALF:
                self.g.initializer.append(_to_half(self.inits[name], new))
            else:
                self.nodes.append(helper.make_node("Cast", [name], [new], to=want, name=new))
            self.cur[new] = want
            self.cache[key] = new
        return self.cache[key]

    def set_outputs(self, node: onnx.NodeProto, dtype: int) -> None:
        for o in node.output:
            before = self.orig.get(o)
            self.cur[o] = dtype if before in (FLOAT, None) else before

    def mode(self, node: onnx.NodeProto) -> str:
        if is_ffnx(node):
            return "ffnx"
        if node.op_type in self.keep_ops or any(o in self.pinned for o in node.output):
            return "keep"
        if node.op_type in ("Cast", "Constant", "ConstantOfShape"):
            return node.op_type
        if node.op_type in SHAPE_OPS:
            return "shape"
        return "half" if node.op_type in HALF_OPS else "follow"

    def convert_node(self, node: onnx.NodeProto) -> None:
        mode = self.mode(node)
        ins = list(node.input)
        if mode == "ffnx":
            ports = schema.OPS[node.op_type].inputs if node.op_type in schema.OPS else ()
            if self.orig.get(ins[0]) not in (FLOAT, None):
                return  # bf16/fp16 plugin nodes are already low precision
            for i, name in enumerate(ins):
                fp32_only = i < len(ports) and ports[i].dtypes == ("float32",)
                ins[i] = self.as_dtype(name, FLOAT if fp32_only else HALF)
            self.set_outputs(node, HALF)
        elif mode == "keep":
            ins = [self.as_dtype(n, FLOAT) for n in ins]
            for o in node.output:
                self.cur[o] = self.orig.get(o, FLOAT)
        elif mode == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type == FLOAT:
                self.inits[node.output[0]] = value  # converted on demand, like an initializer
        elif mode == "ConstantOfShape":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_to_half(a.t, a.t.name))
            self.set_outputs(node, HALF)
        elif mode in ("shape", "Cast"):
            pass  # Cast keeps its target type: int -> fp32 positions must not round to fp16
        else:
            computed = {self.cur[n] for n in ins if self.is_float(n) and n not in self.inits}
            want = FLOAT if mode == "follow" and computed == {FLOAT} else HALF
            ins = [self.as_dtype(n, want) for n in ins]
            self.set_outputs(node, want)
        del node.input[:]
        node.input.extend(ins)

    def fix_outputs(self) -> None:
        """Graph outputs keep their declared dtype: rename the producer's tensor, cast back."""
        for out in self.g.output:
            want = out.type.tensor_type.elem_type
            if self.cur.get(out.name) in (None, want):
                continue
            inner = self.fresh(f"{out.name}_{'fp16' if self.cur[out.name] == HALF else 'x'}")
            for n in self.nodes:
                n.input[:] = [inner if i == out.name else i for i in n.input]
                n.output[:] = [inner if o == out.name else o for o in n.output]
            self.nodes.append(helper.make_node("Cast", [inner], [out.name], to=want, name=inner))


def convert_to_fp16(
    model: onnx.ModelProto, keep_ops: frozenset[str] = KEEP_FP32_OPS
) -> onnx.ModelProto:
    """A copy of `model` computing in fp16 except `keep_ops` (see module doc); I/O types kept."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv = _Converter(out, keep_ops)
    for node in out.graph.node:
        conv.convert_node(node)
        conv.nodes.append(node)
    conv.fix_outputs()
    g = out.graph
    used = {i for n in conv.nodes for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(n for n in conv.nodes if n.op_type != "Constant" or n.output[0] in used)
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]  # dtypes changed; TensorRT and ORT re-infer
    return out


def dtype_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer element counts by dtype name (for reports and tests)."""
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        key = helper.tensor_dtype_to_np_dtype(t.data_type).name
        counts[key] = counts.get(key, 0) + int(np.prod(t.dims, dtype=np.int64))
    return counts
